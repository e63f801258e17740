# services.procurator.*: a NixOS host as a Procurator worker (docs/worker.md). Declarations only: the
# implementation lives beside this file, one file per concern. pkgs appears only in defaults, so the
# options evaluate with nixpkgs' lib alone as long as those defaults are not forced.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkEnableOption
    mkOption
    types
    literalExpression
    ;
  cfg = config.services.procurator;
in
{
  options.services.procurator = {
    enable = mkEnableOption "the Procurator worker, which runs this host's microVMs";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../../nix/package.nix { };
      defaultText = literalExpression "pkgs.callPackage <procurator>/nix/package.nix { }";
      description = ''
        The procurator command. The default builds it from this checkout with the host's nixpkgs.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/procurator";
      description = ''
        Where the worker keeps its state: VM records, serial logs, IP leases, persistent volumes
        (`volumes/<vm>/<volume>.img`) and the deployment profile (`profiles/deployment`, whose
        generations are the deployments applied on this host). An absolute path.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "procurator-vm";
      description = ''
        The unprivileged user the hypervisors run as. The default user is created as a system user
        whose primary group is `kvm`; another user must exist and be able to open /dev/kvm.
      '';
    };

    vmUsers = mkOption {
      type = types.nullOr (
        types.submodule {
          options = {
            first = mkOption {
              type = types.ints.between 1000 4294967294;
              example = 400000;
              description = "The range's first uid (and gid).";
            };
            count = mkOption {
              type = types.ints.positive;
              default = 1000;
              description = "How many uids the range holds: at most this many VMs at once.";
            };
          };
        }
      );
      default = null;
      example = {
        first = 400000;
        count = 1000;
      };
      description = ''
        Run each VM's hypervisor as a uid of its own from this range (its gid the same number, plus
        the `kvm` group for /dev/kvm) instead of the shared `user`: one VMM broken into cannot reach
        another VM's files, sockets or processes. No passwd entry is made: pick a range that no user,
        subuid/subgid range or container uses (NixOS allocates system users below 1000, systemd's
        dynamic users live at 61184-65519, systemd-nspawn's private users from 524288). Each VM's uid is
        recorded with it and free again once the VM is removed; TAPs are passed to the hypervisor as
        descriptors, so it needs no /dev/net/tun. null: every hypervisor runs as `user`.
      '';
    };

    hypervisor = {
      backend = mkOption {
        type = types.enum [
          "cloud-hypervisor"
          "qemu"
        ];
        default = "cloud-hypervisor";
        description = ''
          What runs the VMs. `cloud-hypervisor` needs KVM. `qemu` uses KVM when it works and TCG
          (emulation, slow) otherwise; it is for hosts without cloud-hypervisor, such as CI.
        '';
      };

      package = mkOption {
        type = types.package;
        default = if cfg.hypervisor.backend == "qemu" then pkgs.qemu_kvm else pkgs.cloud-hypervisor;
        defaultText = literalExpression ''if config.services.procurator.hypervisor.backend == "qemu" then pkgs.qemu_kvm else pkgs.cloud-hypervisor'';
        description = ''
          The hypervisor package: it must provide `bin/cloud-hypervisor`, or for qemu
          `bin/qemu-system-<arch>` of this host's architecture.
        '';
      };

      accel = mkOption {
        type = types.enum [
          "auto"
          "kvm"
          "tcg"
        ];
        default = "auto";
        description = ''
          The qemu backend's accelerator: `auto` probes KVM and falls back to TCG. Only `auto` is
          allowed with cloud-hypervisor, which always uses KVM.
        '';
      };

      landlock = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Confine each cloud-hypervisor with Landlock (from release 41, on a kernel with Landlock ABI 3
          or newer; elsewhere VMs run without it and `procurator doctor` says why): the VMM may reach
          only its VM's kernel, initrd, disks, TAPs, serial socket and snapshot directory. Turn it off
          only to tell a Landlock refusal from another failure. Ignored by the qemu backend.
        '';
      };
    };

    network = {
      bridge = mkOption {
        type = types.str;
        default = "procurator0";
        description = ''
          The bridge every VM interface is attached to (one TAP per interface). Procurator creates
          it; it is a trusted interface of the host firewall.
        '';
      };

      subnet = mkOption {
        type = types.str;
        default = "10.100.0.0/16";
        description = "The VMs' IPv4 network, in CIDR notation with the host bits zero (at most /30).";
      };

      gateway = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10.100.0.1";
        description = "The bridge's address in `subnet`, or null for its first host address (.1).";
      };

      uplink = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "eth0";
        description = ''
          The interface VM traffic leaves the host by. With one, the host forwards between the
          bridge and the uplink (net.ipv4.ip_forward is set); without, VMs reach only the host and
          each other.
        '';
      };

      nat = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Masquerade the subnet behind the uplink's address (needs `uplink`). Without NAT, the
          subnet is routed: the rest of the network needs a route to it via this host.
        '';
      };

      isolate = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Make every TAP an isolated bridge port: VMs reach the host and the uplink, not each other.
        '';
      };
    };

    deployment = mkOption {
      type = types.nullOr types.pathInStore;
      default = null;
      example = literalExpression "inputs.fleet.deployments.worker1";
      description = ''
        A deployment (`lib.mkDeployment`, docs/bundle.md) this host runs. It is applied after the
        worker starts and again whenever a switch changes it (unit `procurator-apply`); its
        closure, every VM included, is part of the system's. Leave it null to deliver deployments
        otherwise: pushed (`procurator apply` over SSH) or pulled (`pull`).
      '';
    };

    pull = {
      enable = mkEnableOption "pulling: build `<flake>#<attribute>` on a timer and apply it (GitOps, no central server)";

      flake = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "git+https://git.example.org/fleet?ref=main";
        description = ''
          The flake to pull from, without `#`: any flake reference Nix fetches (a git URL with a
          branch, `github:owner/repo`, `path:/srv/fleet`). Credentials are root's (its SSH keys,
          netrc, or nix.conf access-tokens).
        '';
      };

      attribute = mkOption {
        type = types.str;
        default = "deployments.${config.networking.hostName}";
        defaultText = literalExpression ''"deployments.''${config.networking.hostName}"'';
        description = "The flake attribute that is this host's deployment.";
      };

      interval = mkOption {
        type = types.str;
        default = "5min";
        example = "1h";
        description = ''
          Time between the end of one pull and the start of the next (a systemd time span); the
          first pull runs two minutes after boot. Each start is delayed by up to 30 seconds more, so
          that many hosts do not fetch at once.
        '';
      };
    };

    healthTimeout = mkOption {
      type = types.ints.between 1 86400;
      default = 600;
      description = ''
        The longest, in seconds, one VM start waits for its health checks to pass, whatever the
        bundle's checks allow (intervalSeconds × retries). A start that reaches it fails and says so.
      '';
    };

    watchdog = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Ping every running or paused VM's hypervisor API (cloud-hypervisor vmm.ping, QEMU QMP
          query-status) and kill one that stops answering; its restart policy decides what follows.
        '';
      };
      interval = mkOption {
        type = types.ints.between 1 3600;
        default = 10;
        description = "Seconds between two pings of one VM.";
      };
      timeout = mkOption {
        type = types.ints.between 1 3600;
        default = 3;
        description = "Seconds one ping may take.";
      };
      failures = mkOption {
        type = types.ints.between 1 100;
        default = 3;
        description = "Failed pings in a row after which the hypervisor is killed.";
      };
    };

    serialLogMaxBytes = mkOption {
      type = types.ints.between 4096 1099511627776;
      default = 8388608;
      description = ''
        Where each VM's serial log (`<stateDir>/vms/<name>/serial.log`) rotates to serial.log.1, so
        that a guest flooding its serial port uses at most twice this much disk.
      '';
    };

    metrics.listen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9290";
      description = ''
        Where the worker also serves its Prometheus metrics over TCP (`host:port`, `[v6]:port`),
        besides the API socket /run/procurator/api.sock. null: the socket only. The port is not
        opened in the firewall, and must be 1024 or above.
      '';
    };

    status.listen = mkOption {
      type = types.nullOr types.str;
      default = "127.0.0.1:9478";
      example = "[::1]:9478";
      description = ''
        Where the worker serves its status page over TCP (`host:port`, `[v6]:port`; it is always
        served on the API socket too). Loopback by default: look at it from elsewhere through an SSH
        tunnel (`ssh -L 9478:127.0.0.1:9478 worker1`, then http://127.0.0.1:9478/). A wildcard
        address (0.0.0.0, [::]) serves it to the network, read-only. null: the socket only. The port
        is not opened in the firewall, and must be 1024 or above.
      '';
    };

    status.actions = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether the status page offers its forms (restart a VM, apply the desired deployment, roll
        back). They are taken only over the API socket or from a loopback address, with the page's
        CSRF token.
      '';
    };
  };
}
