# A nixpkgs-free bundle builder (docs/bundle.md): the host's kernel and busybox, Nix builtins and
# host tools (/bin/sh, cp, cpio, gzip) only. This is what CI, the demo and the tests build.
#
#   minimal = import ./nix/minimal { hostCache = /var/cache/procurator; };
#   minimal.mkVm { name = "web"; memoryMiB = 192; }   -> the bundle procurator-vm-web
#
# Every VM shares ONE kernel store path (builtins.path of <hostCache>/kernel/vmlinuz, unpacked there by
# scripts/setup.sh) and ONE initrd (busybox, the virtio/ACPI modules, a generic /init that takes
# everything VM-specific from the kernel command line), so a bundle itself is two JSON files and two
# symlinks. The guest's behaviour is described at the top of init.sh.
{
  hostCache ? /var/cache/procurator,
  system ? builtins.currentSystem,
  busybox ? /bin/busybox,
}:
let
  lib = import ../lib;
  inherit (builtins)
    concatStringsSep
    dirOf
    elem
    filter
    isString
    listToAttrs
    map
    pathExists
    replaceStrings
    split
    stringLength
    substring
    ;

  toPath = p: if isString p then /. + p else p;
  cache = toPath hostCache;
  kernelDir = cache + "/kernel";
  modulesDir = kernelDir + "/modules";

  missing = filter (f: !pathExists (kernelDir + "/${f}")) [
    "vmlinuz"
    "version"
    "modules/modules.order"
  ];
  checked =
    if missing == [ ] then
      true
    else
      throw (
        "procurator minimal: ${toString kernelDir} lacks ${concatStringsSep ", " missing}; "
        + "run scripts/setup.sh (or pass --arg hostCache /path/to/cache)"
      );

  kernelVersion = builtins.head (split "\n" (builtins.readFile (kernelDir + "/version")));

  # The kernel, imported once: every bundle's payload.kernel is this store path.
  kernel = assert checked; builtins.path {
    path = kernelDir + "/vmlinuz";
    name = "procurator-kernel-${kernelVersion}";
  };

  # Modules /init loads, in this order once their dependencies are placed first: PCI transport, NIC,
  # block devices (volumes), entropy, and the ACPI power button with evdev so acpid sees KEY_POWER.
  loadModules = [
    "virtio_pci"
    "virtio_net"
    "virtio_blk"
    "virtio_rng"
    "virtio_console"
    "button"
    "evdev"
  ];
  # The files imported from the host's module tree: loadModules and their dependencies. The initrd build
  # resolves the real dependencies from each module's modinfo `depends=` and fails naming any module
  # missing here, so a kernel with other dependencies is caught at build time, never at boot.
  moduleCandidates = loadModules ++ [
    "virtio"
    "virtio_ring"
    "virtio_pci_modern_dev"
    "virtio_pci_legacy_dev"
    "net_failover"
    "failover"
  ];

  moduleName = rel: replaceStrings [ "-" ] [ "_" ] (builtins.baseNameOf rel);
  # "virtio_net.ko" -> "virtio_net"; anything else (compressed modules) -> null.
  stripKo =
    s:
    let
      n = stringLength s;
    in
    if n > 3 && substring (n - 3) 3 s == ".ko" then substring 0 (n - 3) s else null;
  # Relative paths (from modules.order) of the candidate modules, every directory above them, and the
  # list of built-in modules (a kernel that builds one in needs no file for it).
  moduleFiles = filter (
    rel: let base = stripKo (moduleName rel); in base != null && elem base moduleCandidates
  ) (filter (l: isString l && l != "") (split "\n" (builtins.readFile (modulesDir + "/modules.order"))));
  parents = rel: let d = dirOf rel; in if d == "." || d == "" then [ ] else [ d ] ++ parents d;
  wanted = listToAttrs (
    map (p: {
      name = p;
      value = true;
    }) ([ "modules.builtin" ] ++ moduleFiles ++ builtins.concatMap parents moduleFiles)
  );
  modulesPrefix = "${toString modulesDir}/";
  # A small store path: only the candidate .ko files of the host's (90 MB) module tree.
  modules = assert checked; builtins.path {
    path = modulesDir;
    name = "procurator-kernel-modules-${kernelVersion}";
    filter = path: _type: wanted ? ${substring (stringLength modulesPrefix) (stringLength path) path};
  };

  # The initrd every minimal VM shares: nothing in it depends on a VM.
  initrd = builtins.derivation {
    name = "procurator-minimal-initrd-${kernelVersion}";
    inherit system modules kernelVersion;
    builder = "/bin/sh";
    args = [
      "-eu"
      ./build-initrd.sh
    ];
    PATH = "/usr/bin:/bin";
    busybox = builtins.path {
      path = toPath busybox;
      name = "busybox-static";
    };
    init = ./init.sh;
    poweroff = ./poweroff.sh;
    loadModules = concatStringsSep " " loadModules;
  };

  # attrs (see nix/lib mkSpec) -> the bundle procurator-vm-<name>: vm-config.json, procurator.json and
  # kernel/initrd symlinks. kernel and initrd default to the shared ones.
  mkVm =
    attrs:
    let
      spec = lib.mkSpec ({ inherit kernel initrd; } // attrs);
      self = builtins.placeholder "out";
      drv = builtins.derivation {
        name = "procurator-vm-${spec.name}";
        inherit system;
        builder = "/bin/sh";
        args = [
          "-euc"
          ''
            mkdir "$out"
            printf '%s\n' "$vmConfig" > "$out/vm-config.json"
            printf '%s\n' "$procuratorJson" > "$out/procurator.json"
            ln -s "$kernel" "$out/kernel"
            if [ -n "$initrd" ]; then ln -s "$initrd" "$out/initrd"; fi
          ''
        ];
        PATH = "/usr/bin:/bin";
        kernel = spec.kernel;
        initrd = if spec.initrd == null then "" else spec.initrd;
        vmConfig = builtins.toJSON (lib.vmConfig spec self);
        procuratorJson = builtins.toJSON (lib.procuratorJson spec);
      };
    in
    drv
    // {
      vmName = spec.name;
      inherit spec;
    };
in
{
  inherit
    mkVm
    kernel
    initrd
    modules
    kernelVersion
    loadModules
    lib
    ;
}
