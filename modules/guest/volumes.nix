# Volumes: the host creates each one as a file, formats it once with `mkfs.<fsType> -L <name>` and
# attaches it as a writable virtio disk after the bundle's disks. The guest mounts it by that label.
{ config, lib, ... }:
let
  cfg = config.procurator.vm;
in
{
  config.fileSystems = lib.mapAttrs' (
    _: volume:
    lib.nameValuePair volume.mountPoint {
      device = "/dev/disk/by-label/${volume.name}";
      inherit (volume) fsType;
      # A missing volume must not stop the boot at an emergency shell nobody can reach: the mount fails
      # visibly (and units ordered after it with RequiresMountsFor= do not start) instead.
      options = [
        "nofail"
        "x-systemd.device-timeout=30s"
      ];
    }
  ) cfg.volumes;
}
