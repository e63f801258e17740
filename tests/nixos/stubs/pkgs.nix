# A package set for evaluation only: every package is an attribute set that passes for a derivation
# (type = "derivation", a made-up store path), so modules can interpolate and type-check packages but
# nothing can be built. The builders keep what they were given, for the tests to read.
#
#   import ./pkgs.nix { lib, system } -> pkgs
{ lib, system }:
let
  fake =
    name: extra:
    let
      hash = builtins.substring 0 32 (builtins.hashString "sha256" "procurator-stub:${name}");
      drv = {
        type = "derivation";
        inherit name;
        outPath = "${builtins.storeDir}/${hash}-${name}";
        drvPath = "${builtins.storeDir}/${hash}-${name}.drv";
        outputName = "out";
        meta = { };
        # `dev` and friends: the same placeholder under another name.
        dev = fake "${name}-dev" { };
      }
      // extra;
    in
    drv;

  pkg = name: fake name { };
  linuxOnly = name: fake name { meta.platforms = lib.platforms.linux; };

  self = {
    stdenv.hostPlatform = lib.systems.elaborate system;

    callPackage =
      fn: args:
      let
        f = if builtins.isFunction fn then fn else import fn;
      in
      f (builtins.intersectAttrs (builtins.functionArgs f) (self // { inherit lib; }) // args);

    writeText = name: text: fake name { inherit text; };
    runCommand = name: env: script: fake name { inherit env script; };
    writeShellApplication =
      {
        name,
        text,
        runtimeInputs ? [ ],
        ...
      }:
      fake name { inherit text runtimeInputs; };
    closureInfo = { rootPaths }: fake "closure-info" { inherit rootPaths; };

    cloud-hypervisor = fake "cloud-hypervisor" {
      meta.platforms = [
        "x86_64-linux"
        "aarch64-linux"
      ];
    };
    qemu_kvm = linuxOnly "qemu";
    procurator = pkg "procurator";
    systemd = linuxOnly "systemd";
    nix = pkg "nix";
    openssh = pkg "openssh";
    git = pkg "git";
    coreutils = pkg "coreutils";
    iproute2 = linuxOnly "iproute2";
    nftables = linuxOnly "nftables";
    openresolv = pkg "openresolv";
    e2fsprogs = pkg "e2fsprogs";
    xfsprogs = pkg "xfsprogs";
    btrfs-progs = pkg "btrfs-progs";
    erofs-utils = pkg "erofs-utils";
    gnutar = pkg "gnutar";
  };
in
self
