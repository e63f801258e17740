# The host side of VM networking (docs/worker.md) that belongs to NixOS: the firewall and forwarding.
# The bridge, the TAPs and the NAT itself are the worker's: it creates them at run time and keeps them
# in its own nftables table, `inet procurator`, with the `nft` command.
#
# networking.nftables.enable is left to the operator. Procurator's table needs the nf_tables kernel
# module and the nft command, not the NixOS nftables service, and works next to either firewall
# backend. Enabling it here would blacklist the ip_tables module (breaking Docker, libvirt and other
# iptables users on the host) and switch the host's whole firewall to nftables: a host-wide choice
# that is not the worker's to make. Hosts that do enable it should keep
# networking.nftables.flushRuleset off (assertions.nix warns).
{ config, lib, ... }:
let
  cfg = config.services.procurator;
  net = cfg.network;
  inherit (lib)
    concatLines
    mkDefault
    mkIf
    mkMerge
    optional
    ;
in
{
  config = mkIf cfg.enable (mkMerge [
    {
      # VMs may reach the host's own services (a DNS resolver, a cache) over the bridge.
      networking.firewall.trustedInterfaces = [ net.bridge ];
    }

    (mkIf (net.uplink != null) {
      # The worker checks ip_forward but cannot set it: /proc/sys is read-only in its sandbox.
      boot.kernel.sysctl."net.ipv4.ip_forward" = mkDefault true;

      # The NixOS nftables firewall with filterForward drops forwarded traffic that its own chain does
      # not accept, whatever Procurator's table says; these are Procurator's forwarding rules for it.
      # (Other firewall backends do not filter forwarding and ignore this option.)
      networking.firewall.extraForwardRules = concatLines (
        [
          ''iifname "${net.bridge}" oifname "${net.uplink}" ip saddr ${net.subnet} accept comment "Procurator VMs out"''
        ]
        ++ optional (!net.nat) ''iifname "${net.uplink}" oifname "${net.bridge}" ip daddr ${net.subnet} accept comment "routed to Procurator VMs"''
      );
    })
  ]);
}
