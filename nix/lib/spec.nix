# mkSpec: check and normalise one VM's attributes (docs/bundle.md). Builtins only.
#
# Every error is a `throw` whose message starts with "procurator VM '<name>': " and names each field to
# fix (all problems at once). mkSpec is idempotent (mkSpec (mkSpec a) == mkSpec a), so the functions of
# outputs.nix accept raw attributes or a spec.
let
  c = import ./checks.nix;
  inherit (builtins)
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    head
    isAttrs
    isBool
    isInt
    isList
    isPath
    isString
    length
    map
    match
    split
    stringLength
    ;

  topDefaults = {
    vcpus = 1;
    memoryMiB = 256;
    initrd = null;
    cmdline = "";
    disks = [ ];
    interfaces = [ { id = "eth0"; } ];
    volumes = [ ];
    restart = { };
    health = [ ];
    shutdownTimeout = 30;
    resources = { };
    replace = { };
  };
  topKeys = [
    "name"
    "kernel"
  ] ++ attrNames topDefaults;

  restartDefaults = {
    policy = "always";
    maxRestarts = 5;
    backoffSeconds = 1;
    fromSnapshot = false;
  };
  # How a new generation replaces the running one (docs/architecture.md, "Blue-green replace").
  replaceDefaults = {
    strategy = "recreate";
    drainSeconds = 5;
  };
  resourcesDefaults = {
    memoryMaxMiB = null;
    cpuQuotaPercent = null;
    cpuWeight = 100;
    ioWeight = 100;
    cpuAffinity = [ ];
  };
  healthDefaults = {
    intervalSeconds = 2;
    timeoutSeconds = 2;
    retries = 30;
  };
  httpDefaults = {
    path = "/";
    expectStatus = 200;
  };
  tcpKeys = [
    "type"
    "port"
  ] ++ attrNames healthDefaults;
  healthKeys = {
    tcp = tcpKeys;
    http = tcpKeys ++ attrNames httpDefaults;
  };

  # [ ] when `ok`, else [ msg ].
  expect = ok: msg: if ok then [ ] else [ msg ];
  # The errors of `checks` when `attrs` has `key`, else the "is required" error.
  ifPresent =
    where: attrs: key: what: checks:
    if attrs ? ${key} then checks else [ "${where}${key} is required (${what})" ];
  list = concatStringsSep ", ";

  unknownKeys =
    where: known: attrs:
    map (k: "${where}unknown attribute '${k}' (known: ${list known})") (
      filter (k: !(elem k known)) (attrNames attrs)
    );

  # A store path as a string with its context: path literals are copied into the store.
  isStoreLike = v: isPath v || (isAttrs v && v ? outPath) || c.isStorePathString v;
  storePathOf = v: if isPath v || (isAttrs v && v ? outPath) then "${v}" else v;
  storeWhat = "a path, a derivation or a string under ${builtins.storeDir}/";
  storePath =
    field: v: expect (isStoreLike v) "${field} must be a store path (${storeWhat}), got ${c.show v}";

  positive =
    field: unit: v: expect (c.isPositiveInt v) "${field} must be a positive integer${unit}, got ${c.show v}";
  # `positive`, and at most `max`.
  bounded =
    field: unit: max: v:
    if c.isPositiveInt v && v > max then
      [ "${field} must be at most ${toString max}${unit}, got ${c.show v}" ]
    else
      positive field unit v;

  # The errors of a list field whose elements are attribute sets checked by `item where attrs`.
  eachItem =
    field: xs: item:
    if !isList xs then
      [ "${field} must be a list, got ${c.show xs}" ]
    else
      concatLists (
        map (
          e:
          let
            where = "${field}[${toString e.index}]";
          in
          if isAttrs e.value then
            item where e.value
          else
            [ "${where} must be an attribute set, got ${c.show e.value}" ]
        ) (c.enumerate xs)
      );

  # The string values of `key` in the attribute-set elements of a (possibly malformed) list field.
  valuesOf =
    xs: key:
    if isList xs then filter isString (map (x: if isAttrs x then x.${key} or null else null) xs) else [ ];

  unique = field: what: xs: map (d: "${field}: ${what} ${c.show d} is used more than once") (c.duplicates xs);

  checkDisk =
    where: d:
    unknownKeys "${where} has " [
      "id"
      "path"
    ] d
    ++ ifPresent "${where}." d "id" "a DNS label" (
      expect (c.isDnsLabel d.id)
        "${where}.id must be a DNS label (lowercase letters, digits, '-'), got ${c.show d.id}"
      ++ expect (!(c.isDnsLabel d.id && c.hasPrefix "vol-" d.id))
        "${where}.id ${c.show d.id}: ids starting with 'vol-' are reserved for the host's volume disks"
    )
    ++ ifPresent "${where}." d "path" storeWhat (storePath "${where}.path" d.path);

  checkInterface =
    where: i:
    unknownKeys "${where} has " [
      "id"
      "mac"
    ] i
    ++ ifPresent "${where}." i "id" "1-8 characters of a-z and 0-9" (
      expect (c.isInterfaceId i.id)
        "${where}.id must be 1-8 characters of a-z and 0-9 (it is part of the TAP name), got ${c.show i.id}"
    )
    ++ expect ((i.mac or null) == null || c.isMac i.mac)
      "${where}.mac must be a MAC address like 02:00:00:00:00:01 or null, got ${c.show i.mac}";

  checkVolume =
    where: v:
    let
      fsType = v.fsType or "ext4";
      maxLength = c.labelMaxLength fsType;
    in
    unknownKeys "${where} has " [
      "name"
      "sizeMiB"
      "fsType"
      "mountPoint"
    ] v
    ++ ifPresent "${where}." v "name" "a DNS label, used as the filesystem label" (
      expect (c.isDnsLabel v.name && stringLength v.name <= maxLength)
        ("${where}.name must be a DNS label of at most ${toString maxLength} characters "
          + "(it is the ${fsType} filesystem label), got ${c.show v.name}")
    )
    ++ ifPresent "${where}." v "sizeMiB" "a positive integer" (
      bounded "${where}.sizeMiB" " (MiB)" c.maxVolumeMiB v.sizeMiB
    )
    ++ expect (elem fsType c.volumeFsTypes)
      "${where}.fsType must be one of ${list c.volumeFsTypes}, got ${c.show fsType}"
    ++ expect (!(v ? mountPoint) || c.matches "/[^[:space:]]*[^/[:space:]]" v.mountPoint)
      "${where}.mountPoint must be an absolute path other than /, without spaces, got ${c.show v.mountPoint}";

  checkRestart =
    r:
    let
      v = restartDefaults // r;
    in
    if !isAttrs r then
      [ "restart must be an attribute set like { policy = \"always\"; }, got ${c.show r}" ]
    else
      unknownKeys "restart has " (attrNames restartDefaults) r
      ++ expect (elem v.policy c.restartPolicies)
        "restart.policy must be one of ${list c.restartPolicies}, got ${c.show v.policy}"
      ++ expect (c.isNonNegativeInt v.maxRestarts && v.maxRestarts <= c.maxRestarts)
        "restart.maxRestarts must be an integer from 0 to ${toString c.maxRestarts}, got ${c.show v.maxRestarts}"
      ++ bounded "restart.backoffSeconds" " (seconds)" c.maxSeconds v.backoffSeconds
      ++ expect (isBool v.fromSnapshot) "restart.fromSnapshot must be true or false, got ${c.show v.fromSnapshot}";

  checkHealth =
    where: h:
    let
      type = h.type or null;
      v = healthDefaults // httpDefaults // h;
      status = v.expectStatus;
    in
    if !(elem type c.healthTypes) then
      [ "${where}.type must be one of ${list c.healthTypes}, got ${c.show type}" ]
    else
      unknownKeys "${where} (type ${type}) has " healthKeys.${type} h
      ++ ifPresent "${where}." h "port" "a TCP port" (
        expect (c.isPort h.port) "${where}.port must be a TCP port (1-65535), got ${c.show h.port}"
      )
      ++ expect (c.matches "/[^[:space:]]*" v.path)
        "${where}.path must start with / and have no spaces, got ${c.show v.path}"
      ++ expect (isInt status && status >= 100 && status <= 599)
        "${where}.expectStatus must be an HTTP status (100-599), got ${c.show status}"
      ++ bounded "${where}.intervalSeconds" " (seconds)" c.maxSeconds v.intervalSeconds
      ++ bounded "${where}.timeoutSeconds" " (seconds)" c.maxSeconds v.timeoutSeconds
      ++ bounded "${where}.retries" "" c.maxHealthRetries v.retries;

  checkResources =
    memoryMiB: r:
    let
      v = resourcesDefaults // r;
      weight =
        field: x:
        expect (isInt x && x >= 1 && x <= c.maxWeight)
          "resources.${field} must be an integer from 1 to ${toString c.maxWeight} (100 is the default share), got ${c.show x}";
    in
    if !isAttrs r then
      [ "resources must be an attribute set like { memoryMaxMiB = 512; }, got ${c.show r}" ]
    else
      unknownKeys "resources has " (attrNames resourcesDefaults) r
      ++ (
        if v.memoryMaxMiB == null then
          [ ]
        else
          bounded "resources.memoryMaxMiB" " (MiB)" (c.maxMemoryMiB + c.vmmOverheadMiB) v.memoryMaxMiB
          ++ expect (!(isInt v.memoryMaxMiB) || v.memoryMaxMiB >= c.minMemoryMaxMiB)
            "resources.memoryMaxMiB must be at least ${toString c.minMemoryMaxMiB}, got ${c.show v.memoryMaxMiB}"
          ++ expect (!(isInt v.memoryMaxMiB) || !(isInt memoryMiB) || v.memoryMaxMiB > memoryMiB)
            ("resources.memoryMaxMiB (${c.show v.memoryMaxMiB}) must be above memoryMiB (${c.show memoryMiB}): "
              + "the guest's RAM plus the VMM's overhead (about ${toString c.vmmOverheadMiB} MiB, the default "
              + "when memoryMaxMiB is null)")
      )
      ++ (
        if v.cpuQuotaPercent == null then
          [ ]
        else
          bounded "resources.cpuQuotaPercent" " (percent of one host CPU)" (100 * c.maxVcpus) v.cpuQuotaPercent
      )
      ++ weight "cpuWeight" v.cpuWeight
      ++ weight "ioWeight" v.ioWeight
      ++ (
        if !isList v.cpuAffinity then
          [ "resources.cpuAffinity must be a list of host CPU numbers, got ${c.show v.cpuAffinity}" ]
        else
          map (x: "resources.cpuAffinity: ${c.show x} is not a host CPU number (0-${toString c.maxHostCpu})") (
            filter (x: !(c.isNonNegativeInt x && x <= c.maxHostCpu)) v.cpuAffinity
          )
          ++ unique "resources.cpuAffinity" "CPU" v.cpuAffinity
      );

  # blue-green runs two generations at once: refused where they would share what has one owner.
  checkReplace =
    r: volumes: interfaces:
    let
      v = replaceDefaults // r;
      volumeNames = valuesOf volumes "name";
      macs = filter (m: m != null) (map (i: if isAttrs i then i.mac or null else null) (if isList interfaces then interfaces else [ ]));
    in
    if !isAttrs r then
      [ "replace must be an attribute set like { strategy = \"blue-green\"; }, got ${c.show r}" ]
    else
      unknownKeys "replace has " (attrNames replaceDefaults) r
      ++ expect (elem v.strategy c.replaceStrategies)
        "replace.strategy must be one of ${list c.replaceStrategies}, got ${c.show v.strategy}"
      ++ expect (c.isNonNegativeInt v.drainSeconds && v.drainSeconds <= c.maxSeconds)
        "replace.drainSeconds must be an integer from 0 to ${toString c.maxSeconds}, got ${c.show v.drainSeconds}"
      ++ expect (v.strategy != "blue-green" || volumeNames == [ ])
        ("replace.strategy = \"blue-green\" cannot be used with writable volumes (${list volumeNames}): "
          + "a volume allows one writer, and blue-green runs the old and the new generation at once; "
          + "use strategy \"recreate\" or move the data off the VM")
      ++ expect (v.strategy != "blue-green" || macs == [ ])
        ("replace.strategy = \"blue-green\" cannot be used with fixed interface MACs (${list macs}): "
          + "both generations would share the bridge with one MAC; drop interfaces.*.mac");

  # The whitespace-separated words of a string.
  words = s: filter (w: isString w && w != "") (split "[[:space:]]+" s);
  keyOf = w: head (match "([^=]*).*" w);

  checkCmdline =
    s:
    if !isString s then
      [ "cmdline must be a string of extra kernel parameters, got ${c.show s}" ]
    else
      map (
        w:
        "cmdline must not set ${keyOf w} (Procurator sets procurator.name and procurator.bundle when "
        + "building, procurator.ip, procurator.gw and procurator.dns when starting the VM)"
      ) (filter (w: elem (keyOf w) c.reservedCmdlineKeys) (words s));

  checkTop =
    a:
    let
      v = topDefaults // a;
      diskIds = valuesOf v.disks "id";
      interfaceIds = valuesOf v.interfaces "id";
      volumes = if isList v.volumes then filter isAttrs v.volumes else [ ];
      mountPointOf =
        vol: vol.mountPoint or (if isString (vol.name or null) then "/mnt/${vol.name}" else null);
    in
    unknownKeys "" topKeys a
    ++ ifPresent "" a "name" "a DNS label of at most ${toString c.vmNameMaxLength} characters" (
      expect (c.isVmName a.name)
        ("name must be a DNS label of at most ${toString c.vmNameMaxLength} characters (lowercase "
          + "letters, digits and '-', not starting or ending with '-'), got ${c.show a.name}")
    )
    ++ ifPresent "" a "kernel" storeWhat (storePath "kernel" a.kernel)
    ++ (if v.initrd == null then [ ] else storePath "initrd" v.initrd)
    ++ bounded "vcpus" "" c.maxVcpus v.vcpus
    ++ bounded "memoryMiB" " (MiB)" c.maxMemoryMiB v.memoryMiB
    ++ bounded "shutdownTimeout" " (seconds)" c.maxSeconds v.shutdownTimeout
    ++ checkCmdline v.cmdline
    ++ eachItem "disks" v.disks checkDisk
    ++ unique "disks" "id" diskIds
    ++ eachItem "interfaces" v.interfaces checkInterface
    ++ unique "interfaces" "id" interfaceIds
    ++ unique "interfaces" "mac" (map c.toLower (valuesOf v.interfaces "mac"))
    ++ map (
      id: "disks: id ${c.show id} is also an interface id; ids must be unique across disks and interfaces"
    ) (filter (id: elem id interfaceIds) diskIds)
    ++ eachItem "volumes" v.volumes checkVolume
    ++ unique "volumes" "name" (valuesOf volumes "name")
    ++ unique "volumes" "mountPoint" (filter isString (map mountPointOf volumes))
    ++ checkRestart v.restart
    ++ checkResources v.memoryMiB v.resources
    ++ checkReplace v.replace v.volumes v.interfaces
    ++ eachItem "health" v.health checkHealth;

  normalise =
    a:
    let
      v = topDefaults // a;
    in
    {
      inherit (v)
        name
        vcpus
        memoryMiB
        cmdline
        shutdownTimeout
        ;
      kernel = storePathOf v.kernel;
      initrd = if v.initrd == null then null else storePathOf v.initrd;
      disks = map (d: {
        inherit (d) id;
        path = storePathOf d.path;
      }) v.disks;
      interfaces = map (i: {
        inherit (i) id;
        mac = if (i.mac or null) == null then null else c.toLower i.mac;
      }) v.interfaces;
      volumes = map (
        vol:
        {
          fsType = "ext4";
          mountPoint = "/mnt/${vol.name}";
        }
        // vol
      ) v.volumes;
      restart = restartDefaults // v.restart;
      resources = resourcesDefaults // v.resources;
      replace = replaceDefaults // v.replace;
      health = map (
        h: if h.type == "http" then healthDefaults // httpDefaults // h else healthDefaults // h
      ) v.health;
    };
in
{
  # attrs -> the normalised spec, or a throw naming the VM and every field to fix.
  mkSpec =
    attrs:
    let
      label = if isAttrs attrs && isString (attrs.name or null) then attrs.name else "<unnamed>";
      errors =
        if isAttrs attrs then checkTop attrs else [ "mkSpec expects an attribute set, got ${c.show attrs}" ];
      n = length errors;
    in
    if n == 0 then
      normalise attrs
    else
      throw (
        "procurator VM '${label}': "
        + (if n == 1 then head errors else "${toString n} problems:\n  - ${concatStringsSep "\n  - " errors}")
      );
}
