# What the implementation files share (not a module): the worker configuration JSON, the command
# lines, the units' environment and sandboxes.
#
#   import ./common.nix { inherit config lib pkgs utils; }
{
  config,
  lib,
  pkgs,
  utils,
}:
let
  cfg = config.services.procurator;
  inherit (lib) optionals;

  # The worker configuration (docs/worker.md) in the format procurator/config.py parses; the network
  # object is procurator/net/config.py's NetworkConfig. The network namespace ("netns") is left out:
  # the worker runs in the host's.
  apiSocket = "/run/procurator/api.sock";
  hypervisorBinary =
    if cfg.hypervisor.backend == "qemu" then
      "${cfg.hypervisor.package}/bin/qemu-system-${pkgs.stdenv.hostPlatform.qemuArch}"
    else
      "${cfg.hypervisor.package}/bin/cloud-hypervisor";
  settings = {
    schema = 1;
    inherit (cfg) stateDir healthTimeout serialLogMaxBytes;
    # vmUsers (procurator/vmusers.py) excludes `user`: each hypervisor runs as a uid of its own
    user = if cfg.vmUsers == null then cfg.user else null;
    vmUsers =
      if cfg.vmUsers == null then
        null
      else
        {
          inherit (cfg.vmUsers) first count;
          extraGroups = [ "kvm" ];
        };
    watchdog = { inherit (cfg.watchdog) enable interval timeout failures; };
    statusListen = cfg.status.listen;
    statusActions = cfg.status.actions;
    hypervisor = {
      inherit (cfg.hypervisor) backend accel landlock;
      binary = hypervisorBinary;
    };
    network = {
      inherit (cfg.network)
        bridge
        subnet
        gateway
        uplink
        nat
        isolate
        ;
    };
    inherit apiSocket;
    # Each hypervisor in a cgroup of its own (procurator/cgroup.py) inside the worker unit's delegated
    # subtree (service.nix: Slice, Delegate, DelegateSubgroup); a host without it refuses to start VMs.
    cgroups = {
      mode = "required";
      base = "procurator.slice/procurator-worker.service";
    };
  };
  configPath = "/etc/procurator/worker.json";

  exe = "${cfg.package}/bin/procurator";
  # `procurator --config /etc/procurator/worker.json ARGS...` as a systemd Exec line.
  command = args: utils.escapeSystemdExecArgs ([ exe "--config" configPath ] ++ args);

  # Environment of every unit that runs procurator. Nix is reached through the daemon (the store is
  # read-only inside the sandbox, and root would otherwise open it directly), and its cache, which
  # flake evaluation writes, lives in the CacheDirectory instead of root's home.
  environment = {
    PROCURATOR_CONFIG = configPath;
    NIX_REMOTE = "daemon";
    XDG_CACHE_HOME = "/var/cache/procurator";
  };

  # stateDir is a StateDirectory when it lives under /var/lib, else tmpfiles creates it.
  stateDirectory =
    if lib.hasPrefix "/var/lib/" cfg.stateDir then lib.removePrefix "/var/lib/" cfg.stateDir else null;

  # The sandbox every procurator unit shares. Not set, on purpose: MemoryDenyWriteExecute (QEMU's TCG
  # generates code), PrivateDevices (the hypervisors need /dev/kvm and /dev/net/tun), ProtectProc
  # (the worker watches hypervisors running as another user), SystemCallFilter (the hypervisors need
  # a wide set of system calls and cloud-hypervisor installs its own seccomp filters).
  sandbox = {
    ProtectSystem = "strict";
    ReadWritePaths = [ cfg.stateDir ];
    CacheDirectory = "procurator";
    PrivateTmp = true;
    # Starting a hypervisor as `user` is setuid()/setgid() by a process holding CAP_SETUID and
    # CAP_SETGID, not the execution of a set-user-ID program, so no_new_privs does not stand in the
    # way; nothing Procurator runs is set-user-ID.
    NoNewPrivileges = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    SystemCallArchitectures = "native";
  };

  # The worker, and whatever stops its VMs, run as root with only these capabilities:
  #   CAP_NET_ADMIN     the bridge, the TAPs (TUNSETIFF, TUNSETOWNER for the VM user), bridge port
  #                     isolation, the nftables table (NAT and forwarding)
  #   CAP_SETUID/SETGID start each hypervisor as `user` (or as its VM's uid of `vmUsers`)
  #   CAP_CHOWN         hand the files a hypervisor writes (logs, events, serial output) and its
  #                     volumes to `user` (or its VM's uid, and take them back when the VM goes)
  #   CAP_KILL          signal hypervisors, which run as another user (stop, kill, liveness checks)
  #   CAP_DAC_OVERRIDE  open what the hypervisors own as `user`: QEMU creates its QMP socket itself,
  #                     and a restart touches log files already handed over; without it root is an
  #                     ordinary "other" user for those files
  #   CAP_SYS_NICE      pin a QEMU VM's vCPU threads (sched_setaffinity of another user's threads,
  #                     resources.cpuAffinity); cloud-hypervisor pins its own
  # Not CAP_SYS_ADMIN: no mounts (volumes are image files formatted with mkfs, the guest mounts
  # them), and no network namespaces (the worker uses the host's). Not CAP_SYS_MODULE: the kernel
  # loads bridge, tun and nf_tables modules on demand. No ambient capabilities: the worker is root,
  # its own children (nix, nft, mkfs) get the bounding set anyway, and a hypervisor loses every
  # capability when it changes to `user`.
  capabilities = [
    "CAP_NET_ADMIN"
    "CAP_SETUID"
    "CAP_SETGID"
    "CAP_CHOWN"
    "CAP_KILL"
    "CAP_DAC_OVERRIDE"
    "CAP_SYS_NICE"
  ];

  # The worker's sandbox. Its processes include the hypervisors, so the devices are theirs: KVM and
  # TAPs (QEMU runs its TAPs with vhost=off: no /dev/vhost-net). DevicePolicy=closed still allows
  # /dev/null, /dev/zero, /dev/urandom and the other pseudo-devices.
  workerSandbox = sandbox // {
    CapabilityBoundingSet = capabilities;
    # Writable cgroupfs: the VMs' cgroups (memory, CPU, I/O limits) are made and removed below the
    # worker unit's delegated cgroup, by the worker and by the unit that stops the VMs with the host.
    ProtectControlGroups = false;
    DevicePolicy = "closed";
    DeviceAllow = [
      "/dev/kvm rw"
      "/dev/net/tun rw"
    ];
    ProtectHome = true;
    # AF_NETLINK: links, addresses, nftables; AF_INET/AF_INET6: health checks, metrics, and the
    # hypervisors' interface ioctls; AF_UNIX: the API sockets and the Nix daemon.
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_NETLINK"
      "AF_INET"
      "AF_INET6"
    ];
  };

  # Units that only hand a deployment to the worker (apply, pull) hold no capability at all: they
  # realise store paths through the Nix daemon, switch the deployment profile in stateDir (root's own
  # files) and talk to the worker over its API socket. The worker does the reconciling, so that the
  # hypervisors it starts belong to its unit and not to a oneshot that ends.
  clientSandbox = sandbox // {
    CapabilityBoundingSet = "";
    ProtectHome = true;
    PrivateDevices = true;
    RestrictAddressFamilies = [ "AF_UNIX" ];
  };

  # The PATH of the worker: nix (realising and profiles), nftables, iproute2, mkfs for every volume
  # filesystem the guest module allows (ext2/3/4, xfs, btrfs), and the hypervisor.
  workerPath = [
    config.nix.package
    pkgs.nftables
    pkgs.iproute2
    pkgs.e2fsprogs
    pkgs.xfsprogs
    pkgs.btrfs-progs
    cfg.hypervisor.package
  ];
in
{
  inherit
    apiSocket
    settings
    configPath
    command
    environment
    stateDirectory
    sandbox
    workerSandbox
    clientSandbox
    workerPath
    ;
  # The worker configuration as a store file, linked to configPath.
  configFile = pkgs.writeText "procurator-worker.json" (builtins.toJSON settings);
  metricsArgs = optionals (cfg.metrics.listen != null) [
    "--metrics-listen"
    cfg.metrics.listen
  ];
}
