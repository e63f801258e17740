# What a spec turns into: the bundle's two JSON documents and the deployment's (docs/bundle.md).
# Builtins only. Each function accepts raw attributes or a spec from mkSpec.
let
  c = import ./checks.nix;
  inherit (import ./spec.nix) mkSpec;
  inherit (builtins)
    attrNames
    attrValues
    concatLists
    concatStringsSep
    head
    filter
    isAttrs
    isString
    length
    map
    mapAttrs
    ;

  mib = 1024 * 1024;

  optionalAttrs = cond: attrs: if cond then attrs else { };
in
rec {
  # The kernel command line of a bundle: Procurator's fixed parameters, then the spec's own.
  # The host appends procurator.ip=, procurator.gw= and procurator.dns= at start-up.
  kernelCmdline =
    specOrAttrs: bundlePath:
    let
      spec = mkSpec specOrAttrs;
    in
    concatStringsSep " " (
      filter (s: s != "") [
        "console=ttyS0 reboot=t panic=-1 quiet"
        "procurator.name=${spec.name}"
        "procurator.bundle=${bundlePath}"
        spec.cmdline
      ]
    );

  # The cloud-hypervisor VmConfig (body of PUT /api/v1/vm.create), without the host's fields:
  # no tap/ip/mask on nets, no volumes (writable disks), serial to a Tty the host turns into a File.
  vmConfig =
    specOrAttrs: bundlePath:
    let
      spec = mkSpec specOrAttrs;
    in
    {
      cpus = {
        boot_vcpus = spec.vcpus;
        max_vcpus = spec.vcpus;
      };
      memory.size = spec.memoryMiB * mib;
      payload = {
        inherit (spec) kernel;
        cmdline = kernelCmdline spec bundlePath;
      } // optionalAttrs (spec.initrd != null) { initramfs = spec.initrd; };
      disks = map (d: {
        inherit (d) id path;
        readonly = true;
      }) spec.disks;
      net = map (
        i:
        { inherit (i) id; }
        // optionalAttrs (i.mac != null) { inherit (i) mac; }
        // optionalAttrs (spec.vcpus > 1) { num_queues = 2 * spec.vcpus; }
      ) spec.interfaces;
      serial.mode = "Tty";
      console.mode = "Off";
      rng.src = "/dev/urandom";
    };

  # procurator.json: what Procurator needs beyond the hypervisor config.
  procuratorJson =
    specOrAttrs:
    let
      spec = mkSpec specOrAttrs;
    in
    {
      schema = 1;
      inherit (spec)
        name
        volumes
        restart
        health
        shutdownTimeout
        resources
        replace
        ;
      interfaces = map (
        i: { inherit (i) id; } // optionalAttrs (i.mac != null) { inherit (i) mac; }
      ) spec.interfaces;
    };

  # deployment.json of one worker host: { schema = 1; host; vms = { <name> = "<bundle store path>"; }; }.
  # vms values are bundles (derivations, whose vmName must be the attribute name when they carry one) or
  # store-path strings. The strings keep their context, so a derivation writing this document refers to
  # every bundle. Errors are throws starting with "procurator deployment '<host>': ".
  deploymentJson =
    args:
    let
      host = args.host or null;
      vms = args.vms or null;
      label = if isString host then host else "<unnamed>";
      expect = ok: msg: if ok then [ ] else [ msg ];
      isBundle = b: isAttrs b && b ? outPath;
      vmErrors =
        name: b:
        expect (c.isVmName name)
          "vms.${name}: the VM name must be a DNS label of at most ${toString c.vmNameMaxLength} characters"
        ++ expect (isBundle b || c.isStorePathString b)
          "vms.${name} must be a bundle (a derivation or a store path), got ${c.show b}"
        ++ expect (!(isBundle b) || (b.vmName or name) == name)
          "vms.${name} is the bundle of VM '${b.vmName}'; name the attribute ${b.vmName}";
      errors =
        if !isAttrs args then
          [ "deploymentJson expects { host; vms; }, got ${c.show args}" ]
        else
          map (k: "unknown attribute '${k}' (known: host, vms)") (
            filter (k: k != "host" && k != "vms") (attrNames args)
          )
          ++ expect (c.isDnsLabel host)
            "host must be a DNS label (lowercase letters, digits, '-'), got ${c.show host}"
          ++ (
            if isAttrs vms then
              concatLists (attrValues (mapAttrs vmErrors vms))
            else
              [ "vms must be an attribute set of bundles by VM name, got ${c.show vms}" ]
          );
      n = length errors;
    in
    if n == 0 then
      {
        schema = 1;
        inherit host;
        vms = mapAttrs (_: b: if isAttrs b then "${b}" else b) vms;
      }
    else
      throw (
        "procurator deployment '${label}': "
        + (if n == 1 then head errors else "${toString n} problems:\n  - ${concatStringsSep "\n  - " errors}")
      );
}
