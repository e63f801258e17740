# Checks of procurator.vm.* and of the system around it, each message starting with the VM's name.
# They use nix/lib's predicates, so the guest module refuses what the bundle (mkSpec) would refuse,
# and more: the guest-side rules (store label, mount points, platform) that only the module knows.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.procurator.vm;
  spec = import ../../nix/lib;
  layout = import ./layout.nix;
  platform = pkgs.stdenv.hostPlatform;
  inherit (lib)
    attrValues
    concatMap
    concatStringsSep
    count
    filter
    hasPrefix
    head
    mapAttrsToList
    match
    unique
    ;

  check = assertion: message: {
    inherit assertion;
    message = "procurator VM '${cfg.name}': ${message}";
  };
  duplicates = xs: unique (filter (x: count (y: y == x) xs > 1) xs);
  quote = builtins.toJSON;

  volumes = attrValues cfg.volumes;
  labelMax = spec.labelMaxLength;
  # Where a volume may not go: the guest's own tree from the bundle and the tmpfs root.
  reserved = [
    "/"
    "/nix"
    "/nix/store"
    "/boot"
  ];
  # What NixOS mounts in stage 1 whatever neededForBoot says: "/" "/nix" "/nix/store" "/var"
  # "/var/log" "/var/lib" "/var/lib/nixos" "/etc" "/usr" (nixos/lib/utils.nix, pathsNeededForBoot,
  # closed under parents, so a path in it is also each parent of one). A volume there would be
  # mounted by the initrd (tasks/filesystems.nix gives it x-initrd.mount, stage-1.nix mounts it
  # before switching root), where a failed mount panics the VM (boot.panic_on_fail, boot.nix) and
  # nofail does not keep it from being waited for; and mounted later it would hide what stage 1 and
  # the activation script already wrote there (/var/lib/nixos's uid map, /etc). The paths below it,
  # e.g. /var/lib/postgresql, are mounted in stage 2 like any other file system.
  stage1 = filter (p: !(builtins.elem p reserved)) utils.pathsNeededForBoot;
  inStage1 = v: builtins.elem v.mountPoint stage1;
  neededForBoot = v: config.fileSystems.${v.mountPoint}.neededForBoot or false;
  # boot.kernelParams and procurator.vm.kernelParams both follow init= on the command line
  # (bundle.nix): neither may set what Procurator sets.
  paramKey = p: head (match "([^=]*).*" p);
  forbiddenIn = params: filter (p: builtins.elem (paramKey p) (spec.reservedCmdlineKeys ++ [ "init" ])) params;
  forbidden = option: params: check (forbiddenIn params == [ ]) "${option} must not set ${concatStringsSep ", " (forbiddenIn params)}: Procurator sets init= and the procurator.* parameters itself";
  # One parameter per element, as NixOS's type of boot.kernelParams: whitespace only inside quotes.
  isKernelParam = p: match ''([^"[:space:]]|"[^"]*")+'' p != null;
in
{
  config.assertions =
    [
      (check (spec.isVmName cfg.name) "procurator.vm.name must be a DNS label of at most ${toString spec.vmNameMaxLength} characters (lowercase letters, digits, '-'), got ${quote cfg.name}; it defaults to networking.hostName")
      (check (platform.isx86_64 || platform.isAarch64) "cloud-hypervisor guests are x86_64-linux or aarch64-linux, this system is ${platform.system}")
      (check (!config.boot.isContainer) "a microVM boots its own kernel; boot.isContainer must be false")
      (check (cfg.resources.memoryMaxMiB == null || cfg.resources.memoryMaxMiB > cfg.memoryMiB) "procurator.vm.resources.memoryMaxMiB (${toString cfg.resources.memoryMaxMiB}) must be above procurator.vm.memoryMiB (${toString cfg.memoryMiB}), leaving room for the hypervisor itself; null uses memoryMiB + ${toString spec.vmmOverheadMiB}")
      (check (cfg.resources.memoryMaxMiB == null || cfg.resources.memoryMaxMiB >= spec.minMemoryMaxMiB) "procurator.vm.resources.memoryMaxMiB must be at least ${toString spec.minMemoryMaxMiB}")
      (check (cfg.resources.cpuQuotaPercent == null || cfg.resources.cpuQuotaPercent <= 100 * spec.maxVcpus) "procurator.vm.resources.cpuQuotaPercent must be at most ${toString (100 * spec.maxVcpus)}")
      (check (lib.all (x: x <= spec.maxHostCpu) cfg.resources.cpuAffinity && duplicates cfg.resources.cpuAffinity == [ ]) "procurator.vm.resources.cpuAffinity must name distinct host CPUs 0-${toString spec.maxHostCpu}, got ${quote cfg.resources.cpuAffinity}")
      (check (cfg.replace.strategy != "blue-green" || cfg.volumes == { }) "procurator.vm.replace.strategy = \"blue-green\" cannot be used with writable volumes (${concatStringsSep ", " (lib.attrNames cfg.volumes)}): a volume allows one writer, and blue-green runs the old and the new generation at once; use \"recreate\" or move the data off the VM")
      (check (cfg.replace.strategy != "blue-green" || lib.all (i: i.mac == null) cfg.interfaces) "procurator.vm.replace.strategy = \"blue-green\" cannot be used with fixed interface MACs: both generations would be on the bridge with one MAC; leave procurator.vm.interfaces.*.mac null")
      (forbidden "boot.kernelParams" config.boot.kernelParams)
      (forbidden "procurator.vm.kernelParams" cfg.kernelParams)
      # nixpkgs' profiles/hardened.nix blacklists erofs, the store disk's file system. Whether stage 1
      # still loads it depends on how it asks: the scripted stage 1's `modprobe erofs` ignores a
      # blacklist, systemd-modules-load (systemd stage 1) and the kernel's request for fs-erofs do not.
      # Refused either way: the guest would boot or not by that accident.
      (check (!builtins.elem "erofs" config.boot.blacklistedKernelModules) "boot.blacklistedKernelModules contains \"erofs\" (nixpkgs' profiles/hardened.nix puts it there), but the guest's /nix/store is the bundle's erofs disk: with erofs blacklisted it may not mount and the VM not boot; set boot.blacklistedKernelModules = lib.mkForce [ ... ] to the list without \"erofs\"")
    ]
    ++ map (
      p: check false "procurator.vm.kernelParams element ${quote p} is not one kernel parameter: it must be non-empty, with whitespace only inside double quotes (as in boot.kernelParams, e.g. dyndbg=\"file init.c +p\")"
    ) (filter (p: !isKernelParam p) cfg.kernelParams)
    # Interfaces
    ++ map (
      i: check (spec.isInterfaceId i.id) "interface id ${quote i.id} must be 1-8 characters of a-z and 0-9 (it is part of the TAP name on the host)"
    ) cfg.interfaces
    ++ map (
      i: check (i.mac == null || spec.isMac i.mac) "interface ${quote i.id}: mac ${quote i.mac} is not a MAC address like 02:00:00:00:00:01"
    ) cfg.interfaces
    ++ map (id: check false "interface id ${quote id} is used more than once") (duplicates (map (i: i.id) cfg.interfaces))
    ++ map (mac: check false "MAC address ${mac} is used by more than one interface") (
      duplicates (map lib.toLower (filter (m: m != null) (map (i: i.mac) cfg.interfaces)))
    )
    # Volumes
    ++ mapAttrsToList (
      key: v: check (key == v.name) "volume ${quote key} has name ${quote v.name}; in the attribute set form the name is the attribute name"
    ) cfg.volumes
    ++ concatMap (v: [
      (check (spec.isDnsLabel v.name && builtins.stringLength v.name <= labelMax v.fsType) "volume name ${quote v.name} must be a DNS label of at most ${toString (labelMax v.fsType)} characters: it is the ${v.fsType} label the guest mounts it by")
      (check (v.name != layout.storeLabel) "volume name ${quote v.name} is the label of the bundle's store disk; choose another name")
      (check (match "/[^[:space:]]*[^/[:space:]]" v.mountPoint != null) "volume ${quote v.name}: mountPoint ${quote v.mountPoint} must be an absolute path without spaces or a trailing /")
      (check (!(builtins.elem v.mountPoint reserved) && !(hasPrefix "/nix/store/" v.mountPoint)) "volume ${quote v.name}: mountPoint ${quote v.mountPoint} is part of the guest's own tree (/, /nix, /nix/store, /boot)")
      (check (!(inStage1 v)) "volume ${quote v.name}: mountPoint ${quote v.mountPoint} is one of the paths NixOS mounts in stage 1 (${concatStringsSep ", " stage1}), where a volume cannot be mounted safely: the initrd waits for its disk and a failed mount panics the VM, and stage 1 and the activation script write there before any later mount; mount it at a directory of its own below, e.g. mountPoint = \"/var/lib/<service>\" or \"/srv/${v.name}\"")
      (check (inStage1 v || !(neededForBoot v)) "volume ${quote v.name}: fileSystems.${quote v.mountPoint}.neededForBoot is true, which mounts the volume in stage 1, where a failed mount panics the VM; remove it: volumes are mounted in stage 2, before local-fs.target")
    ]) volumes
    ++ map (mp: check false "more than one volume is mounted at ${mp}") (duplicates (map (v: v.mountPoint) volumes));
}
