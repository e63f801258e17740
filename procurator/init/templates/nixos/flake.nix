{
  description = "Procurator microVMs ({{ vms | join(", ") }}) and the worker host {{ host }} that runs them";

  inputs = {
    # Where Procurator comes from. To use your own nixpkgs instead of Procurator's pin, add an input
    # `nixpkgs` and procurator.inputs.nixpkgs.follows = "nixpkgs";
    procurator.url = {{ procurator_url | nix_string }};
  };

  outputs =
    { self, procurator }:
    let
      system = "x86_64-linux";
      # One bundle per VM: nix build .#<name>
      vms = {
{% for vm in vms %}
        {{ vm }} = procurator.lib.mkVm {
          inherit system;
          modules = [ ./vms/{{ vm }}.nix ];
        };
{% endfor %}
      };
    in
    {
      packages.${system} = vms // {
        # What {{ host }} runs: nix build .#deployment, nix copy it there, and there
        # `procurator up <deployment store path>` (or the worker: services.procurator.deployment).
        deployment = procurator.lib.mkDeployment {
          inherit system vms;
          host = "{{ host }}";
        };
        default = self.packages.${system}.deployment;
      };

      # The fleet for `nix run .#deploy` (procurator deploy): set the SSH target of {{ host }}.
      procuratorHosts = procurator.lib.mkHosts {
        inherit system;
        hosts.{{ host }} = {
          target = "root@{{ host }}";
          inherit vms;
        };
      };

      apps.${system}.deploy = procurator.apps.${system}.deploy;
    };
}
