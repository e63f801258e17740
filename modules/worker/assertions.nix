# Checks of services.procurator.*, each message starting with "procurator worker: " and naming the
# option to fix. The network rules are procurator/net/config.py's (NetworkConfig), so a configuration
# the worker would refuse at start-up is refused at evaluation instead.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.procurator;
  net = cfg.network;
  platform = pkgs.stdenv.hostPlatform;
  inherit (lib)
    all
    elemAt
    foldl'
    hasInfix
    match
    mkIf
    optional
    toInt
    toIntBase10
    ;

  check = assertion: message: {
    inherit assertion;
    message = "procurator worker: ${message}";
  };
  quote = builtins.toJSON;

  # users whose fixed uid lies in vmUsers: a VM's hypervisor would run as them
  usersInRange =
    if cfg.vmUsers == null then
      [ ]
    else
      lib.filter (u: u.uid != null && u.uid >= cfg.vmUsers.first && u.uid < cfg.vmUsers.first + cfg.vmUsers.count) (
        lib.mapAttrsToList (name: u: {
          inherit name;
          uid = u.uid or null;
        }) config.users.users
      );

  # Linux interface names, as procurator/net/names.py check_ifname: at most 15 characters (the limits
  # table both read, procurator/limits.json).
  ifnameMax = (import ../../nix/lib).limits.ifnameMaxLength;
  isIfname = name: match "[A-Za-z0-9][A-Za-z0-9_.-]{0,${toString (ifnameMax - 1)}}" name != null;

  # IPv4 as Python's ipaddress reads it: four decimal octets without leading zeros -> an integer.
  parseIPv4 =
    s:
    let
      octets = match "(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})" s;
      values = map toInt octets;
    in
    if octets == null || !(all (o: o <= 255) values) then null else foldl' (acc: o: acc * 256 + o) 0 values;
  pow2 = n: if n == 0 then 1 else 2 * pow2 (n - 1);
  # "a.b.c.d/p" -> { address; prefix; size; } or null.
  parseCidr =
    s:
    let
      parts = match "([^/]+)/([0-9]{1,2})" s;
      address = parseIPv4 (elemAt parts 0);
      prefix = toIntBase10 (elemAt parts 1);
    in
    if parts == null || address == null || prefix > 32 then
      null
    else
      {
        inherit address prefix;
        size = pow2 (32 - prefix);
      };

  subnet = parseCidr net.subnet;
  subnetValid = subnet != null && lib.mod subnet.address subnet.size == 0 && subnet.prefix <= 30;
  gateway = if net.gateway == null then null else parseIPv4 net.gateway;
  # A host address of the subnet: inside it, neither its network nor its broadcast address.
  isHostOfSubnet = a: a > subnet.address && a < subnet.address + subnet.size - 1;

  # "host:port" or "[v6]:port"; the port must be one an unprivileged process may bind.
  listen = if cfg.metrics.listen == null then null else match "(\\[[0-9A-Fa-f:.]+]|[A-Za-z0-9_.-]+):([0-9]{1,5})" cfg.metrics.listen;
  listenPort = toIntBase10 (elemAt listen 1);
  statusListen = if cfg.status.listen == null then null else match "(\\[[0-9A-Fa-f:.]+]|[A-Za-z0-9_.-]+):([0-9]{1,5})" cfg.status.listen;
  statusPort = toIntBase10 (elemAt statusListen 1);

  ipForward = config.boot.kernel.sysctl."net.ipv4.ip_forward" or null;
  noSpace = s: match ".*[[:space:]].*" s == null;
in
{
  config = mkIf cfg.enable {
    assertions =
      [
        (check (match "/[^[:space:]]*[^/[:space:]]" cfg.stateDir != null) "services.procurator.stateDir must be an absolute path without spaces or a trailing /, got ${quote cfg.stateDir}")
        (check (cfg.user != "" && cfg.user != "root") "services.procurator.user must name an unprivileged user for the hypervisors, got ${quote cfg.user}")
        (check (cfg.vmUsers == null || cfg.vmUsers.first + cfg.vmUsers.count - 1 <= 4294967294) "services.procurator.vmUsers: first (${toString cfg.vmUsers.first}) + count (${toString cfg.vmUsers.count}) runs past uid 4294967294; lower count or first")
      ]
      ++ map (u: check false "services.procurator.vmUsers ${toString cfg.vmUsers.first}-${toString (cfg.vmUsers.first + cfg.vmUsers.count - 1)} holds the uid ${toString u.uid} of users.users.${u.name}; move the range (vmUsers.first) or the user") usersInRange
      ++ [
        (check config.nix.enable "the worker realises deployments and keeps them in a Nix profile through the Nix daemon; nix.enable must be true")

        # Hypervisor
        (check (lib.meta.availableOn platform cfg.hypervisor.package) "services.procurator.hypervisor.package ${quote (cfg.hypervisor.package.name or "?")} is not available on ${platform.system}${lib.optionalString (cfg.hypervisor.backend == "cloud-hypervisor") "; cloud-hypervisor runs on x86_64-linux and aarch64-linux hosts, use hypervisor.backend = \"qemu\" elsewhere"}")
        (check (cfg.hypervisor.backend != "qemu" || platform.qemuArch != null) "services.procurator.hypervisor.backend = \"qemu\" has no qemu-system binary for ${platform.system}")
        (check (cfg.hypervisor.backend == "qemu" || cfg.hypervisor.accel == "auto") "services.procurator.hypervisor.accel = ${quote cfg.hypervisor.accel} applies to the qemu backend only; cloud-hypervisor always uses KVM (leave accel = \"auto\")")

        # Network
        (check (isIfname net.bridge) "services.procurator.network.bridge ${quote net.bridge} must be a Linux interface name: 1-${toString ifnameMax} characters of letters, digits, '_', '.', '-', starting with a letter or digit")
        (check subnetValid "services.procurator.network.subnet ${quote net.subnet} must be an IPv4 network like \"10.100.0.0/16\": host bits zero, a prefix of /30 or shorter")
        (check (net.gateway == null || (gateway != null && (!subnetValid || isHostOfSubnet gateway))) "services.procurator.network.gateway ${quote net.gateway} must be a host address of ${net.subnet} (not its network or broadcast address), or null for its first")
        (check (net.uplink == null || (isIfname net.uplink && net.uplink != net.bridge)) "services.procurator.network.uplink ${quote net.uplink} must be the Linux interface name of the host's uplink, other than the bridge")
        (check (!net.nat || net.uplink != null) "services.procurator.network.nat needs an uplink to masquerade behind; set services.procurator.network.uplink")
        (check (net.uplink == null || ipForward == true || ipForward == 1 || ipForward == "1") "services.procurator.network.uplink is set, so the host must forward IPv4: boot.kernel.sysctl.\"net.ipv4.ip_forward\" is ${quote ipForward}")

        # Delivery of deployments
        (check (cfg.deployment == null || !cfg.pull.enable) "services.procurator.deployment and services.procurator.pull.enable both set this host's deployment; choose one")
        (check (!cfg.pull.enable || (cfg.pull.flake != null && cfg.pull.flake != "" && !(hasInfix "#" cfg.pull.flake) && noSpace cfg.pull.flake)) "services.procurator.pull.enable needs services.procurator.pull.flake, a flake reference without '#' and spaces (the attribute is pull.attribute), got ${quote cfg.pull.flake}")
        (check (!cfg.pull.enable || (cfg.pull.attribute != "" && !(hasInfix "#" cfg.pull.attribute) && noSpace cfg.pull.attribute)) "services.procurator.pull.attribute must be a flake attribute path like \"deployments.worker1\", got ${quote cfg.pull.attribute}")
        (check (!cfg.pull.enable || (cfg.pull.interval != "" && noSpace cfg.pull.interval)) "services.procurator.pull.interval must be a systemd time span like \"5min\", got ${quote cfg.pull.interval}")

        # Metrics
        (check (cfg.metrics.listen == null || (listen != null && listenPort >= 1024 && listenPort <= 65535)) "services.procurator.metrics.listen must be \"host:port\" or \"[v6]:port\" with a port from 1024 to 65535 (the worker cannot bind privileged ports), got ${quote cfg.metrics.listen}")

        # Status page
        (check (cfg.status.listen == null || (statusListen != null && statusPort >= 1024 && statusPort <= 65535)) "services.procurator.status.listen must be \"host:port\" or \"[v6]:port\" with a port from 1024 to 65535 (the worker cannot bind privileged ports), got ${quote cfg.status.listen}")
        (check (cfg.status.listen == null || cfg.status.listen != cfg.metrics.listen) "services.procurator.status.listen and metrics.listen are both ${quote cfg.status.listen}; give the status page another port")
      ];

    warnings = optional (net.uplink != null && config.networking.nftables.enable && config.networking.nftables.flushRuleset) "procurator worker: networking.nftables.flushRuleset is on, so every reload of nftables.service deletes Procurator's table inet procurator (the VMs' NAT and forwarding) until the worker's next reconcile; set networking.nftables.flushRuleset = false";
  };
}
