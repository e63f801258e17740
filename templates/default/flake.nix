{
  description = "Procurator microVMs (web, files) and the worker host worker1 that runs them";

  inputs = {
    # Where Procurator comes from. To use your own nixpkgs instead of Procurator's pin, add an input
    # `nixpkgs` and procurator.inputs.nixpkgs.follows = "nixpkgs";
    procurator.url = "git+file:///src/procurator";
  };

  outputs =
    { self, procurator }:
    let
      system = "x86_64-linux";
      # One bundle per VM: nix build .#<name>
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
        # What worker1 runs: nix build .#deployment, nix copy it there, and there
        # `procurator up <deployment store path>` (or the worker: services.procurator.deployment).
        deployment = procurator.lib.mkDeployment {
          inherit system vms;
          host = "worker1";
        };
        default = self.packages.${system}.deployment;
      };

      # The fleet for `nix run .#deploy` (procurator deploy): set the SSH target of worker1.
      procuratorHosts = procurator.lib.mkHosts {
        inherit system;
        hosts.worker1 = {
          target = "root@worker1";
          inherit vms;
        };
      };

      apps.${system}.deploy = procurator.apps.${system}.deploy;
    };
}
