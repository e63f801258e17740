# The bundle of one NixOS microVM (docs/bundle.md), built with nixpkgs:
#
#   import ./nix/make-vm.nix { pkgs = import <nixpkgs> { system = "x86_64-linux"; }; modules = [ ./web.nix ]; }
#   import ./nix/make-vm.nix { nixpkgs = <nixpkgs>; system = "aarch64-linux"; modules = [ ./web.nix ]; }
#
# -> the derivation procurator-vm-<name> (procurator.vm.bundle of the NixOS system made of the guest
# module and `modules`). The evaluated system is at `.nixos` of the result, the checked spec at `.spec`.
#
# Give either `pkgs` (its nixpkgs source and platform are used) or `nixpkgs` and `system`.
{
  pkgs ? null,
  nixpkgs ? if pkgs != null then pkgs.path else throw "make-vm: give `pkgs`, or `nixpkgs` and `system`",
  system ? null,
  modules ? [ ],
  specialArgs ? { },
}:
let
  platformModule =
    if pkgs != null then
      { nixpkgs.pkgs = pkgs; }
    else if system != null then
      { nixpkgs.hostPlatform = system; }
    else
      throw "make-vm: give `pkgs`, or `nixpkgs` and `system` (e.g. \"x86_64-linux\")";

  # A path (pkgs.path, <nixpkgs>) or a flake input; path + string stays a path (nothing is copied).
  source = if builtins.isPath nixpkgs then nixpkgs else nixpkgs.outPath or nixpkgs;

  nixos = import (source + "/nixos/lib/eval-config.nix") {
    # The platform comes from the modules, never from builtins.currentSystem (pure evaluation).
    system = null;
    inherit specialArgs;
    modules = [
      ../modules/guest
      platformModule
    ] ++ modules;
  };
in
nixos.config.procurator.vm.bundle // { inherit nixos; }
