# nixosModules.worker: a NixOS host that runs Procurator microVMs (services.procurator.*, docs/worker.md).
# Options apart from implementation, one file a concern; see docs/worker.md.
#
#   options.nix      services.procurator.* (pkgs only in defaults)
#   common.nix       not a module: the worker configuration JSON, command lines, unit sandboxes
#   service.nix      /etc/procurator/worker.json, the VM user, procurator-worker (the daemon) and
#                    procurator-shutdown (stops the VMs with the host)
#   deployment.nix   services.procurator.deployment: procurator-apply, applied on every change
#   pull.nix         services.procurator.pull: procurator-pull, a timer building a flake attribute
#   network.nix      firewall (trusted bridge, forwarding rules) and ip_forward
#   assertions.nix   checks whose messages start with "procurator worker: "
{
  imports = [
    ./options.nix
    ./service.nix
    ./deployment.nix
    ./pull.nix
    ./network.nix
    ./assertions.nix
  ];
}
