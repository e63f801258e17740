# The stand-ins for NixOS (see README.md): { lib, system } -> { modules, pkgs, utils, modulesPath }.
{ lib, system }:
{
  modules = [
    ./systemd.nix
    ./boot.nix
    ./filesystems.nix
    ./networking.nix
    ./system.nix
  ];
  pkgs = import ./pkgs.nix { inherit lib system; };
  utils = import ./utils.nix { inherit lib; };
  modulesPath = ./nixos-modules;
}
