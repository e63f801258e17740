# Volumes: the host creates each one as a file, formats it once with `mkfs.<fsType> -L <name>` and
# attaches it as a writable virtio disk after the bundle's disks. The guest mounts it by that label,
# in stage 2 only: assertions.nix refuses the mount points NixOS would mount in stage 1.
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
      options = [
        # A missing volume must not stop the boot at an emergency shell nobody can reach: the mount
        # fails visibly (and units with RequiresMountsFor= on it do not start) instead. nofail makes
        # systemd-fstab-generator write only local-fs.target's Wants= on the mount unit and leave out
        # its Before=local-fs.target (src/fstab-generator/fstab-generator.c, add_mount: "if
        # (!FLAGS_SET(flags, MOUNT_NOFAIL)) Before=<target>"), so services (After=local-fs.target
        # through sysinit.target) could start on the empty tmpfs directory while the disk is still
        # being found or checked, and write there what the volume then hides.
        "nofail"
        # The order back: local-fs.target, and every unit after it, waits for the mount to succeed or
        # fail, which takes at most the device timeout below (then the fsck and the mount itself).
        "x-systemd.before=local-fs.target"
        "x-systemd.device-timeout=30s"
      ];
    }
  ) cfg.volumes;
}
