# The guest's network: the host chooses the address at each start and passes it on the kernel command
# line (procurator.ip=, procurator.gw=, procurator.dns=); the unit below applies it to the first virtio
# NIC. Nothing in the guest asks DHCP, and the ports the host's health checks probe are open.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.procurator.vm;
  inherit (lib) mkDefault optional optionals unique;

  resolved = config.services.resolved.enable;
  resolvconf = config.networking.resolvconf.enable;
  dnsMode =
    if resolved then
      "resolved"
    else if resolvconf then
      "resolvconf"
    else
      "none";

  procuratorNetwork = pkgs.writeShellApplication {
    name = "procurator-network";
    runtimeInputs =
      [
        pkgs.iproute2
        pkgs.coreutils
      ]
      ++ optional resolved config.systemd.package
      ++ optional (!resolved && resolvconf) pkgs.openresolv;
    text = builtins.readFile ./procurator-network.sh;
  };
in
{
  config = {
    # Interfaces are named eth0, eth1, ... in PCI order, which is the order of procurator.vm.interfaces.
    networking.usePredictableInterfaceNames = mkDefault false;
    networking.useDHCP = mkDefault false;

    networking.firewall.allowedTCPPorts = unique (map (check: check.port) cfg.health);

    systemd.services.procurator-network = {
      description = "Address of the first virtio NIC from the kernel command line (procurator.ip=)";
      wantedBy = [
        "network-online.target"
        "multi-user.target"
      ];
      wants = [ "network.target" ];
      before = [
        "network.target"
        "network-online.target"
      ];
      # After resolvconf.service, whose `resolvconf -u` would otherwise drop what this unit adds.
      after =
        [ "network-pre.target" ]
        ++ optionals resolvconf [ "resolvconf.service" ]
        ++ optionals resolved [ "systemd-resolved.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${procuratorNetwork}/bin/procurator-network ${dnsMode}";
      };
    };
  };
}
