# How the guest boots under cloud-hypervisor: no bootloader (the hypervisor loads the kernel and initrd
# that vm-config.json names), virtio drivers in the initrd, / on tmpfs, /nix/store from the bundle's
# read-only erofs disk, the serial console, and nothing that waits for a person at a console.
{
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  inherit (lib) mkDefault optionals;
  layout = import ./layout.nix;
  platform = pkgs.stdenv.hostPlatform;
in
{
  # Documentation, default packages and desktop integration off (every setting there is mkDefault).
  imports = [ (modulesPath + "/profiles/minimal.nix") ];

  config = {
    boot.loader.grub.enable = mkDefault false;

    # Only what a cloud-hypervisor guest has: virtio over PCI. The defaults (SATA, USB, keyboards)
    # are left out of the initrd; the store disk's drivers are loaded before stage 1 looks for it.
    boot.initrd.includeDefaultModules = mkDefault false;
    boot.initrd.availableKernelModules = [
      "virtio_pci"
      "virtio_blk"
      "virtio_net"
      "virtio_console"
      "virtio_rng"
      "erofs"
    ];
    boot.initrd.kernelModules = [
      "virtio_pci"
      "virtio_blk"
      "erofs"
    ];

    # The power button the host presses for a graceful stop: ACPI on x86_64, a PL061 GPIO key on
    # aarch64, read by systemd-logind through evdev; logind powers off on it (its default
    # HandlePowerKey=poweroff, left as is). udev would load these too; listing them makes it certain.
    # systemd-modules-load ignores a module that is built in or missing.
    boot.kernelModules =
      [ "evdev" ]
      ++ optionals platform.isx86_64 [ "button" ]
      ++ optionals platform.isAarch64 [
        "gpio_pl061"
        "gpio_keys"
      ];

    # nix/lib's command line already names ttyS0 (the x86_64 serial port); aarch64's is a PL011.
    # boot.panic_on_fail: a stage 1 failure panics (and the kernel's panic=-1 reboots) instead of
    # waiting for a key press on a console nobody watches. Both stage 1s read it: the scripted one,
    # and systemd's (the default from NixOS 26.05), whose panic-on-fail.service in emergency.target
    # runs on that kernel parameter (nixos/modules/system/boot/systemd/initrd.nix).
    boot.kernelParams = [ "boot.panic_on_fail" ] ++ optionals platform.isAarch64 [ "console=ttyAMA0" ];
    systemd.enableEmergencyMode = mkDefault false;

    # `procurator console` attaches to the virtio console (hvc0, a socket on the host); the serial port
    # stays the boot log the host keeps (`procurator logs`). A login prompt on hvc0: the instance of
    # systemd's serial-getty@.service, wanted by getty.target. As a drop-in (overrides.conf): a whole
    # serial-getty@hvc0.service, NixOS's default for a name no package ships, would hide the template
    # and its Restart=always (a new prompt after each logout), BindsTo=dev-hvc0.device and TTY settings.
    # Who can log in there is the system's users (docs/nixos.md, "The console").
    systemd.services."serial-getty@hvc0" = {
      overrideStrategy = "asDropin";
      wantedBy = [ "getty.target" ];
    };

    # / is a tmpfs: a VM's state lives on its volumes, everything else starts afresh at each boot.
    # (options at normal priority: they merge with what NixOS adds, e.g. x-initrd.mount.)
    fileSystems."/" = {
      device = mkDefault "tmpfs";
      fsType = mkDefault "tmpfs";
      options = [ "mode=0755" ];
    };

    # The system closure, from the bundle's read-only disk (see bundle.nix).
    fileSystems."/nix/store" = {
      device = "/dev/disk/by-label/${layout.storeLabel}";
      fsType = "erofs";
      options = [ "ro" ];
      neededForBoot = true;
      noCheck = true; # an image built by Nix and mounted read-only: nothing for fsck to do
    };

    # The store is read-only and holds exactly this system: no Nix daemon, no rebuild tools.
    nix.enable = mkDefault false;
    system.disableInstallerTools = mkDefault true;
  };
}
