# Evaluates the project's NixOS modules with nixpkgs' real lib and the stand-ins of ./stubs for NixOS
# (no nixpkgs tree, no package set, nothing built). Used by tests/unit/test_nixos_modules.py:
#
#   import tests/nixos/eval.nix { lib = <nixpkgs>/lib; module = "guest"; modules = [ { ... } ]; }
#
# -> { config; failedAssertions; warnings; stage1; } of that system (stage1: the mount points NixOS
# would mount in the initrd, by nixos/lib/utils.nix's fsNeededForBoot). `module` is "guest" or "worker";
# `modules` are more NixOS modules (attribute sets or functions): the test's configuration.
{
  lib,
  module,
  modules ? [ ],
  system ? "x86_64-linux",
}:
let
  nixpkgsLib = if builtins.isAttrs lib then lib else import lib;
  stubs = import ./stubs {
    lib = nixpkgsLib;
    inherit system;
  };

  toplevelHash = "0000000000000000000000000000sys1"; # a valid store hash (nix32 alphabet)

  # What a real system supplies that the stubs cannot: its outputs, as placeholders, and the
  # worker's package (the default builds the Python application with nixpkgs).
  base = {
    guest = {
      system.build = {
        # The one placeholder with a string context, as a real derivation's outPath has: the tests
        # can see where the toplevel would become an input (a dependency) of a derivation.
        toplevel = stubs.pkgs.writeText "nixos-system" "" // {
          outPath = builtins.appendContext "${builtins.storeDir}/${toplevelHash}-nixos-system" {
            "${builtins.storeDir}/${toplevelHash}-nixos-system.drv".outputs = [ "out" ];
          };
        };
        kernel = stubs.pkgs.writeText "linux" "";
        initialRamdisk = stubs.pkgs.writeText "initrd" "";
      };
    };
    worker = {
      services.procurator.package = nixpkgsLib.mkDefault stubs.pkgs.procurator;
    };
  };

  evaluated = nixpkgsLib.evalModules {
    modules =
      stubs.modules
      ++ [
        ../../modules/${module}
        base.${module}
      ]
      ++ modules;
    specialArgs = {
      inherit (stubs) pkgs utils modulesPath;
    };
  };
  cfg = evaluated.config;
in
{
  config = cfg;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) cfg.assertions);
  inherit (cfg) warnings;
  stage1 = map (fs: fs.mountPoint) (
    builtins.filter stubs.utils.fsNeededForBoot (builtins.attrValues cfg.fileSystems)
  );
}
