# The bundle (docs/bundle.md) built from this NixOS system: procurator.vm.bundle.
#
#   procurator-vm-<name>/
#     vm-config.json    nix/lib vmConfig: kernel, initrd and store disk by absolute store path
#     procurator.json   nix/lib procuratorJson
#     kernel            -> the kernel cloud-hypervisor boots: the PVH ELF vmlinux on x86_64, Image on aarch64
#     initrd            -> the NixOS stage 1 initrd
#     store.erofs       -> the read-only erofs image of the system closure, mounted on /nix/store
#
# The image holds the system closure and refers to none of it (store-image.nix), and init= names the
# toplevel without its string context, so the bundle's closure is the two JSON files, the kernel, the
# initrd and the image: `nix copy` of a deployment carries each VM's system once, inside its image.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.procurator.vm;
  spec = import ../../nix/lib;
  layout = import ./layout.nix;
  platform = pkgs.stdenv.hostPlatform;
  inherit (config.system.build) toplevel kernel;

  # cloud-hypervisor loads an uncompressed kernel: on x86_64 the ELF vmlinux, entered through its PVH
  # note (nixpkgs keeps vmlinux in the kernel's dev output); on aarch64 the Image the kernel installs.
  kernelImage =
    if platform.isx86_64 then
      "${kernel.dev}/vmlinux"
    else
      "${kernel}/${config.system.boot.loader.kernelFile}";
  initrd = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}";

  storeImage = pkgs.callPackage ./store-image.nix { } {
    name = "procurator-store-${cfg.name}";
    rootPaths = [ toplevel ];
    label = layout.storeLabel;
  };

  healthCheck =
    h:
    {
      inherit (h)
        type
        port
        intervalSeconds
        timeoutSeconds
        retries
        ;
    }
    // lib.optionalAttrs (h.type == "http") { inherit (h) path expectStatus; };

  # The NixOS assertions, this module's among them, are checked before the spec: a bundle is never
  # generated from a system that would not build.
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  checkedSpec =
    if failedAssertions != [ ] then
      throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failedAssertions}"
    else
      spec.mkSpec {
        inherit (cfg)
          name
          vcpus
          memoryMiB
          shutdownTimeout
          ;
        kernel = kernelImage;
        inherit initrd;
        # nix/lib puts its own parameters (console, procurator.name, procurator.bundle) before these.
        # init= without the toplevel's string context: the guest finds it in the store image (whose
        # rootPaths are the toplevel), so the bundle need not name the system as an input of its
        # own; only the kernel, the initrd and the image are. nixpkgs does the same where the system
        # travels inside an image: nixos/modules/installer/netboot/netboot.nix writes init= with
        # builtins.unsafeDiscardStringContext of the toplevel into the netboot tree's cmdline, the
        # store being in its netbootRamdisk.
        cmdline = lib.concatStringsSep " " (
          [ "init=${builtins.unsafeDiscardStringContext "${toplevel}/init"}" ]
          ++ config.boot.kernelParams
          ++ cfg.kernelParams
        );
        disks = [
          {
            id = layout.storeDiskId;
            path = storeImage;
          }
        ];
        interfaces = map (i: { inherit (i) id mac; }) cfg.interfaces;
        volumes = map (v: { inherit (v) name sizeMiB fsType mountPoint; }) (lib.attrValues cfg.volumes);
        restart = { inherit (cfg.restart) policy maxRestarts backoffSeconds fromSnapshot; };
        resources = {
          inherit (cfg.resources)
            memoryMaxMiB
            cpuQuotaPercent
            cpuWeight
            ioWeight
            cpuAffinity
            ;
        };
        replace = { inherit (cfg.replace) strategy drainSeconds; };
        health = map healthCheck cfg.health;
      };

  bundle = pkgs.runCommand "procurator-vm-${checkedSpec.name}" {
    # The bundle's own path appears in the kernel command line (procurator.bundle=): the placeholder
    # is replaced by the output path when the files are written.
    vmConfig = builtins.toJSON (spec.vmConfig checkedSpec (builtins.placeholder "out"));
    procuratorJson = builtins.toJSON (spec.procuratorJson checkedSpec);
    passAsFile = [
      "vmConfig"
      "procuratorJson"
    ];
    preferLocalBuild = true;
    passthru = {
      # deploymentJson checks a bundle's vmName against its key in the deployment.
      vmName = checkedSpec.name;
      spec = checkedSpec;
      inherit toplevel storeImage;
    };
  } ''
    mkdir "$out"
    cp "$vmConfigPath" "$out/vm-config.json"
    cp "$procuratorJsonPath" "$out/procurator.json"
    ln -s ${kernelImage} "$out/kernel"
    ln -s ${initrd} "$out/initrd"
    ln -s ${storeImage} "$out/${layout.storeImageName}"
  '';
in
{
  config.procurator.vm = {
    spec = checkedSpec;
    inherit bundle;
  };
  config.system.build.procuratorBundle = bundle;
}
