# Two example VMs built with the nixpkgs-free builder (nix/minimal), and a deployment of both.
# They share the kernel and the initrd; each bundle is only its JSON files and symlinks.
#
#   nix-build examples/minimal.nix -A web          the bundle procurator-vm-web
#   nix-build examples/minimal.nix -A deployment   procurator-deployment-<host> referring to both
#
# Arguments:
#   hostCache  where scripts/setup.sh unpacked the kernel (default /var/cache/procurator;
#              --argstr hostCache /some/dir works too)
#   host       the deployment's host name (default "local")
#   overrides  per-VM attributes merged (//) over that VM's spec, to change one VM, e.g.
#                --arg overrides '{ web = { memoryMiB = 256; }; }'
#                --arg overrides '{ web.cmdline = "procurator.release=2"; }'
#              (the minimal guest shows procurator.release= on its page: a new release, a new bundle)
{
  hostCache ? /var/cache/procurator,
  host ? "local",
  overrides ? { },
}:
let
  minimal = import ../nix/minimal { inherit hostCache; };
  makeDeployment = import ../nix/make-deployment.nix;

  specs = {
    web = {
      name = "web";
      vcpus = 1;
      memoryMiB = 192;
      volumes = [
        {
          name = "data";
          sizeMiB = 64;
        }
      ];
      health = [
        {
          type = "http";
          port = 80;
          path = "/health";
        }
      ];
      restart = {
        policy = "always";
      };
      shutdownTimeout = 20;
    };
    api = {
      name = "api";
      vcpus = 2;
      memoryMiB = 256;
      health = [
        {
          type = "tcp";
          port = 80;
        }
      ];
      restart = {
        policy = "on-failure";
        maxRestarts = 3;
      };
    };
  };

  unknown = builtins.filter (n: !(specs ? ${n})) (builtins.attrNames overrides);
  vms =
    if unknown == [ ] then
      builtins.mapAttrs (name: spec: minimal.mkVm (spec // (overrides.${name} or { }))) specs
    else
      throw (
        "examples/minimal.nix: overrides for unknown VM ${builtins.concatStringsSep ", " unknown} "
        + "(known: ${builtins.concatStringsSep ", " (builtins.attrNames specs)})"
      );
in
vms
// {
  deployment = makeDeployment { inherit host vms; };
}
