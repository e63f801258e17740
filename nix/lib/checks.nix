# Small pure predicates and string helpers for the rest of nix/lib. Builtins only.
let
  inherit (builtins)
    filter
    foldl'
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    length
    match
    stringLength
    substring
    toJSON
    typeOf
    ;
  # The limits on names and sizes, one table that procurator/models.py reads too (procurator/limits.py
  # says why each value; procurator/limits.json is this file's copy in the Python package, and
  # tests/unit/test_limits.py fails when the two differ): a name refused here at build is refused there
  # at load, and the other way round. Beside this file, so nix/lib stays a library of its own.
  limits = builtins.fromJSON (builtins.readFile ./limits.json);
in
rec {
  inherit limits;
  # VM names are the guests' host names and part of their TAPs' owner aliases.
  vmNameMaxLength = limits.vmNameMaxLength;
  # Interface ids end up in TAP aliases and device ids.
  interfaceIdPattern = "[a-z0-9]{1,${toString limits.interfaceIdMaxLength}}";
  # Volume names are filesystem labels: ext2/3/4 allow 16 bytes, xfs 12.
  volumeNameMaxLength = limits.volumeNameMaxLength;
  volumeFsTypes = [
    "ext4"
    "ext2"
    "ext3"
    "xfs"
    "btrfs"
  ];
  labelMaxLength = fsType: if fsType == "xfs" then limits.xfsVolumeNameMaxLength else volumeNameMaxLength;
  # Upper bounds (from the table above; refused here at build, by procurator/models.py at load):
  # vCPUs as every supported cloud-hypervisor parses them (u8 before v48; 254 on x86_64), guest memory
  # within half the default 46-bit guest physical space, a volume within ext4's largest file, and every
  # wait bounded.
  inherit (limits)
    maxVcpus
    maxMemoryMiB # 32 TiB
    maxVolumeMiB # 16 TiB
    maxSeconds
    maxHealthRetries
    maxRestarts
    # resources: the VM's cgroup (procurator/cgroup.py) and its vCPUs' host CPUs (docs/bundle.md).
    vmmOverheadMiB # the host's default memory limit is memoryMiB + this (models.VMM_OVERHEAD_MIB)
    minMemoryMaxMiB
    maxWeight # cgroup v2 cpu.weight, io.weight
    maxHostCpu
    ;
  replaceStrategies = [
    "recreate"
    "blue-green"
  ];
  restartPolicies = [
    "always"
    "on-failure"
    "never"
  ];
  healthTypes = [
    "tcp"
    "http"
  ];
  # Kernel parameters that Procurator sets itself (procurator.name/bundle at build time, the rest at
  # start-up from the host's leases); a user cmdline must not set them.
  reservedCmdlineKeys = [
    "procurator.name"
    "procurator.bundle"
    "procurator.ip"
    "procurator.gw"
    "procurator.dns"
  ];

  matches = re: s: isString s && match re s != null;
  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;

  # An RFC 1123 label: 1-63 lowercase letters, digits and '-', not starting or ending with '-'.
  isDnsLabel = s: matches "[a-z0-9]([a-z0-9-]*[a-z0-9])?" s && stringLength s <= limits.dnsLabelMaxLength;
  isVmName = s: isDnsLabel s && stringLength s <= vmNameMaxLength;
  isInterfaceId = matches interfaceIdPattern;
  isVolumeName = s: isDnsLabel s && stringLength s <= volumeNameMaxLength;
  isMac = matches "[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}";
  isPositiveInt = x: isInt x && x > 0;
  isNonNegativeInt = x: isInt x && x >= 0;
  isPort = x: isInt x && x > 0 && x < 65536;
  isStorePathString = s: isString s && hasPrefix "${builtins.storeDir}/" s;

  toLower =
    let
      upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
      lower = "abcdefghijklmnopqrstuvwxyz";
      chars = s: builtins.genList (i: substring i 1 s) (stringLength s);
    in
    builtins.replaceStrings (chars upper) (chars lower);

  # A value shown in an error message, without forcing anything large or copying paths to the store.
  show =
    v:
    if isString v || isInt v || isBool v || isFloat v || v == null then
      toJSON v
    else if builtins.isPath v then
      "the path ${toString v}"
    else if isList v then
      "a list"
    else if isAttrs v then
      (if v ? outPath then "a derivation" else "an attribute set")
    else
      "a ${typeOf v}";

  # The elements that occur more than once, each reported once, in first-seen order.
  duplicates =
    xs:
    let
      step =
        acc: x:
        if builtins.elem x acc.seen then
          (if builtins.elem x acc.dups then acc else acc // { dups = acc.dups ++ [ x ]; })
        else
          acc // { seen = acc.seen ++ [ x ]; };
    in
    (foldl' step {
      seen = [ ];
      dups = [ ];
    } xs).dups;

  # [ 0 1 ... n-1 ] paired with the elements of a list.
  enumerate = xs: builtins.genList (i: { index = i; value = builtins.elemAt xs i; }) (length xs);

  nonNull = filter (x: x != null);
}
