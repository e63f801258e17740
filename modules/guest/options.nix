# procurator.vm.*: what a NixOS guest declares about itself as a Procurator microVM (docs/bundle.md).
# Declarations only: the implementation lives beside this file, one file per concern. Nothing here
# uses pkgs, so the options can be evaluated with nixpkgs' lib alone.
#
# Host concerns (TAP names, addresses, API socket, where volumes live, which hypervisor) are not
# options: the host decides them at start-up.
{ config, lib, ... }:
let
  inherit (lib) mkOption types literalExpression;

  interfaceModule = {
    options = {
      id = mkOption {
        type = types.str;
        example = "eth0";
        description = ''
          The interface's id in the bundle: 1-8 characters of a-z and 0-9. The host derives the TAP
          name and, unless `mac` is set, the MAC address from the VM name and this id. Inside the guest
          the interfaces appear as eth0, eth1, ... in the order of this list.
        '';
      };
      mac = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "02:00:00:00:00:01";
        description = "A fixed MAC address, or null to let the host derive one.";
      };
    };
  };

  volumeModule =
    { name, config, ... }:
    {
      options = {
        name = mkOption {
          type = types.str;
          default = name;
          defaultText = literalExpression "<the attribute name>";
          description = ''
            The volume's name: a DNS label of at most 16 characters (12 for xfs). The host keeps the
            volume as a file of that name and formats it with `mkfs.<fsType> -L <name>`; the guest
            mounts it by that label.
          '';
        };
        sizeMiB = mkOption {
          type = types.ints.positive;
          example = 1024;
          description = "Size of the volume in MiB, allocated by the host when the volume is created.";
        };
        fsType = mkOption {
          type = types.enum [
            "ext4"
            "ext2"
            "ext3"
            "xfs"
            "btrfs"
          ];
          default = "ext4";
          description = "Filesystem the host formats the volume with.";
        };
        mountPoint = mkOption {
          type = types.str;
          default = "/mnt/${config.name}";
          defaultText = literalExpression ''"/mnt/''${name}"'';
          description = ''
            Where the guest mounts the volume, in stage 2, ordered before `local-fs.target` (so before
            the services). Refused: the guest's own tree (`/`, `/nix`, `/nix/store`, `/boot`) and the
            other paths NixOS mounts in stage 1 whatever `neededForBoot` says (`/var`, `/var/log`,
            `/var/lib`, `/var/lib/nixos`, `/etc`, `/usr`: nixpkgs' `utils.pathsNeededForBoot`): there
            the initrd would wait for the disk and a failed mount panic the VM, and stage 1 and the
            activation script write to them before any later mount. A directory below them, such as
            `/var/lib/postgresql`, is fine.
          '';
        };
      };
    };

  # A list of volumes, each naming itself, is turned into the attribute set form.
  volumesType =
    types.coercedTo (types.listOf types.attrs)
      (
        vols:
        lib.listToAttrs (
          map (
            v:
            lib.nameValuePair (
              v.name or (throw "procurator.vm.volumes: in the list form every volume needs a name, got one with ${toString (lib.attrNames v)}")
            ) v
          ) vols
        )
      )
      (types.attrsOf (types.submodule volumeModule));

  healthModule = {
    options = {
      type = mkOption {
        type = types.enum [
          "tcp"
          "http"
        ];
        description = "`tcp`: the port accepts a connection. `http`: `GET <path>` answers `expectStatus`.";
      };
      port = mkOption {
        type = types.port;
        example = 80;
        description = "TCP port of the guest the host probes. The guest's firewall opens it.";
      };
      path = mkOption {
        type = types.str;
        default = "/";
        description = "Path of an `http` check (ignored by `tcp` checks).";
      };
      expectStatus = mkOption {
        type = types.ints.between 100 599;
        default = 200;
        description = "HTTP status an `http` check expects (ignored by `tcp` checks).";
      };
      intervalSeconds = mkOption {
        type = types.ints.positive;
        default = 2;
        description = "Seconds between two probes.";
      };
      timeoutSeconds = mkOption {
        type = types.ints.positive;
        default = 2;
        description = "Seconds one probe may take.";
      };
      retries = mkOption {
        type = types.ints.positive;
        default = 30;
        description = "Probes that may fail before the VM counts as unhealthy.";
      };
    };
  };
in
{
  options.procurator.vm = {
    name = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      example = "web";
      description = ''
        The VM's name: a DNS label of at most 20 characters. It names the bundle
        (`procurator-vm-<name>`), the VM on the host and its key in a deployment.
      '';
    };

    vcpus = mkOption {
      type = types.ints.positive;
      default = 1;
      description = "Number of virtual CPUs.";
    };

    memoryMiB = mkOption {
      type = types.ints.positive;
      default = 256;
      description = ''
        Memory of the VM in MiB. The root filesystem is a tmpfs, so files written outside volumes
        count against it.
      '';
    };

    interfaces = mkOption {
      type = types.listOf (types.submodule interfaceModule);
      default = [ { id = "eth0"; } ];
      description = ''
        Network interfaces, in the order the guest sees them. The host attaches each one to its bridge
        and hands the first one its address on the kernel command line
        (`procurator.ip=`, `procurator.gw=`, `procurator.dns=`), which the guest applies at boot.
      '';
    };

    volumes = mkOption {
      type = volumesType;
      default = { };
      example = literalExpression ''
        {
          data = { sizeMiB = 1024; mountPoint = "/var/lib/data"; };
        }
        # or, equivalently:
        # [ { name = "data"; sizeMiB = 1024; mountPoint = "/var/lib/data"; } ]
      '';
      description = ''
        Persistent writable disks. The host creates and formats each one the first time the VM starts
        and keeps it across restarts and new generations of the VM; the guest mounts it by its label,
        with `nofail` (a missing disk fails its mount after 30 s instead of the boot) and ordered
        before `local-fs.target`, so services start after the mount has succeeded or failed. A
        service that must not run without its volume says so with
        `systemd.services.<name>.unitConfig.RequiresMountsFor` (nixpkgs' PostgreSQL and MySQL
        units already do for their data directory).
      '';
    };

    kernelParams = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "mitigations=off" ];
      description = ''
        Extra kernel parameters of this VM, appended after `boot.kernelParams`: one parameter per
        element, with whitespace only inside double quotes (as in `boot.kernelParams`). The
        `procurator.*` parameters and `init=` are set by Procurator and can be given neither here
        nor in `boot.kernelParams`.
      '';
    };

    health = mkOption {
      type = types.listOf (types.submodule healthModule);
      default = [ ];
      example = literalExpression ''[ { type = "http"; port = 80; path = "/healthz"; } ]'';
      description = ''
        Checks the host runs against the guest's first interface. When a new generation replaces a
        running VM, it must pass them or the old generation is started again.
      '';
    };

    restart = {
      policy = mkOption {
        type = types.enum [
          "always"
          "on-failure"
          "never"
        ];
        default = "always";
        description = "When the host restarts the VM after it stops on its own.";
      };
      maxRestarts = mkOption {
        type = types.ints.unsigned;
        default = 5;
        description = "Restarts in a row before the host gives up.";
      };
      backoffSeconds = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "First delay before a restart; it doubles with each restart in a row.";
      };
      fromSnapshot = mkOption {
        type = types.bool;
        default = false;
        description = ''
          At a host shutdown (`procurator shutdown`), snapshot the VM (memory and devices) before stopping
          it, and restore that snapshot instead of booting when the host brings it back: the guest resumes
          where it was. Only that snapshot is restored, and only if the VM did not run since.
        '';
      };
    };

    resources = {
      memoryMaxMiB = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 768;
        description = ''
          The memory limit (MiB) of the cgroup the host runs the VM's hypervisor in: the guest's RAM
          (memoryMiB) plus what the hypervisor itself needs. Must be above memoryMiB; null lets the
          host use memoryMiB plus 128 MiB. Past it the kernel's OOM killer ends the hypervisor, and
          only it: other VMs run on.
        '';
      };
      cpuQuotaPercent = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 150;
        description = ''
          CPU time the hypervisor may use, in percent of one host CPU (cgroup cpu.max; 150 is one and a
          half CPUs), or null for no quota.
        '';
      };
      cpuWeight = mkOption {
        type = types.ints.between 1 10000;
        default = 100;
        description = "The VM's share of contended CPU time against other VMs (cgroup cpu.weight).";
      };
      ioWeight = mkOption {
        type = types.ints.between 1 10000;
        default = 100;
        description = ''
          The VM's share of contended disk time (cgroup io.weight; on cgroup v1 hosts only where the I/O
          scheduler offers a weight).
        '';
      };
      cpuAffinity = mkOption {
        type = types.listOf types.ints.unsigned;
        default = [ ];
        example = [
          2
          3
        ];
        description = ''
          Host CPUs the VM's vCPUs run on (every vCPU may use each of them), or [ ] for any. The host
          refuses to start a VM naming a CPU it does not have.
        '';
      };
    };

    replace = {
      strategy = mkOption {
        type = types.enum [
          "recreate"
          "blue-green"
        ];
        default = "recreate";
        description = ''
          How an apply replaces the running generation with a new one. "recreate" stops the old one
          and boots the new one on the same address; "blue-green" boots the new one beside the old one
          (a second TAP, a fresh lease), waits for its health checks, moves the VM's address to it in
          one nftables change and stops the old one after drainSeconds. Refused with writable volumes
          (a volume has one writer) and with fixed interface MACs.
        '';
      };
      drainSeconds = mkOption {
        type = types.ints.between 0 3600;
        default = 5;
        description = ''
          Blue-green only: seconds the old generation keeps running after the switch, so connections
          it holds can finish, before it is stopped.
        '';
      };
    };

    shutdownTimeout = mkOption {
      type = types.ints.positive;
      default = 30;
      description = ''
        Seconds the host waits, after pressing the ACPI power button, for the guest to power off
        before it stops the VM hard.
      '';
    };

    spec = mkOption {
      type = types.attrs;
      readOnly = true;
      internal = true;
      description = "The checked spec (nix/lib mkSpec) the bundle is generated from.";
    };

    bundle = mkOption {
      type = types.package;
      readOnly = true;
      description = ''
        The bundle of this VM (docs/bundle.md): the derivation `procurator-vm-<name>` holding
        `vm-config.json`, `procurator.json` and symlinks to the kernel, the initrd and the read-only
        erofs image of the system closure. Its store path is the VM's generation.
      '';
    };
  };
}
