{
  description = "Procurator: build microVMs with Nix, run them on worker hosts with cloud-hypervisor";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = lib.genAttrs systems;
      pkgsFor = system: nixpkgs.legacyPackages.${system};

      # The bundle of one NixOS microVM: { system | pkgs, modules, specialArgs ? { } } -> procurator-vm-<name>.
      # The guest module is included; `modules` configure procurator.vm.* and the rest of the system.
      mkVm =
        {
          system ? null,
          pkgs ? null,
          modules,
          specialArgs ? { },
        }:
        import ./nix/make-vm.nix (
          {
            inherit
              system
              pkgs
              modules
              specialArgs
              ;
          }
          # A given package set brings its own nixpkgs source (pkgs.path); otherwise this flake's pin.
          // lib.optionalAttrs (pkgs == null) { inherit nixpkgs; }
        );

      # The deployment of one worker host: { system | pkgs, host, vms } -> procurator-deployment-<host>,
      # vms = { <name> = <bundle>; }.
      mkDeployment =
        {
          system ? null,
          pkgs ? null,
          host,
          vms,
        }:
        import ./nix/make-deployment-pkgs.nix {
          pkgs =
            if pkgs != null then
              pkgs
            else if system != null then
              pkgsFor system
            else
              throw "procurator lib.mkDeployment: give `system` (e.g. \"x86_64-linux\") or `pkgs`";
          inherit host vms;
        };

      # The worker hosts of a fleet for `procurator deploy` / `nix run .#deploy`: { system | pkgs,
      # hosts, defaults ? { } } -> { hosts.<name> (settings and deployment); inventory (settings only) }.
      # Each host gives `deployment` (a mkDeployment) or `vms` (made into one here). See nix/hosts.nix.
      mkHosts =
        {
          system ? null,
          pkgs ? null,
          hosts,
          defaults ? { },
        }:
        import ./nix/hosts.nix {
          inherit hosts defaults;
          mkDeployment = { host, vms }: mkDeployment { inherit system pkgs host vms; };
        };

      # The template's VMs, built here as checks so the template keeps building.
      templateVms = system: {
        web = mkVm {
          inherit system;
          modules = [ ./templates/default/vms/web.nix ];
        };
        files = mkVm {
          inherit system;
          modules = [ ./templates/default/vms/files.nix ];
        };
      };
    in
    {
      lib = {
        inherit mkVm mkDeployment mkHosts;
        # The pure helpers (mkSpec, vmConfig, procuratorJson, deploymentJson, predicates): nix/lib.
        spec = import ./nix/lib;
      };

      # Modules as attribute sets importing the files: error messages keep the file names, and a
      # configuration that imports the same file directly gets it once.
      nixosModules = {
        guest.imports = [ ./modules/guest ];
        worker.imports = [ ./modules/worker ];
      };

      packages = forAllSystems (
        system:
        let
          procurator = (pkgsFor system).callPackage ./nix/package.nix { };
        in
        {
          inherit procurator;
          default = procurator;
        }
      );

      # `nix run .#deploy -- [REF] [--on HOST,@TAG] [--dry-run] ...` is `procurator deploy` (docs/deploy.md).
      apps = forAllSystems (system: {
        deploy = {
          type = "app";
          program = "${(pkgsFor system).writeShellScript "procurator-deploy" ''
            exec ${self.packages.${system}.procurator}/bin/procurator deploy "$@"
          ''}";
        };
      });

      checks = forAllSystems (
        system:
        let
          vms = templateVms system;
        in
        {
          procurator = self.packages.${system}.procurator;
          template-web = vms.web;
          template-files = vms.files;
          template-deployment = mkDeployment {
            inherit system vms;
            host = "worker1";
          };
          ${if system == "x86_64-linux" then "worker-vm-test" else null} = import ./tests/nixos/worker.nix { inherit self; pkgs = pkgsFor system; };
        }
      );

      templates.default = {
        path = ./templates/default;
        description = "Two NixOS microVMs (nginx; a file server with a volume) and a deployment of both";
      };
    };
}
