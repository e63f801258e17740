{
  description = "Two Procurator microVMs and the deployment that runs both on one worker host";

  inputs = {
    # Where Procurator comes from: its git repository, or a local checkout ("path:/src/procurator").
    # To use your own nixpkgs instead of Procurator's pin, add an input `nixpkgs` and
    # procurator.inputs.nixpkgs.follows = "nixpkgs";
    procurator.url = "git+file:///src/procurator";
  };

  outputs =
    { self, procurator }:
    let
      system = "x86_64-linux";
      # One bundle per VM: nix build .#web, nix build .#files
      vms = {
        web = procurator.lib.mkVm {
          inherit system;
          modules = [ ./vms/web.nix ];
        };
        files = procurator.lib.mkVm {
          inherit system;
          modules = [ ./vms/files.nix ];
        };
      };
    in
    {
      packages.${system} = vms // {
        # What the worker host "worker1" runs: nix build .#deployment, nix copy it to the worker,
        # and there `procurator up <deployment store path>` boots both VMs.
        deployment = procurator.lib.mkDeployment {
          inherit system vms;
          host = "worker1";
        };
        default = self.packages.${system}.deployment;
      };
    };
}
