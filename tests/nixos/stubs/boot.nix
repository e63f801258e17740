# boot.*: kernel, modules, initrd and loader options as NixOS declares them (nixos/modules/system/boot/
# kernel.nix, modprobe.nix, stage-1.nix, loader/grub/grub.nix).
{ lib, ... }:
let
  inherit (lib) mkOption types;
  strings = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };
in
{
  options.boot = {
    isContainer = mkOption {
      type = types.bool;
      default = false;
    };
    # NixOS's type: whitespace only inside double quotes.
    kernelParams = mkOption {
      type = types.listOf (types.strMatching ''([^"[:space:]]|"[^"]*")+'');
      default = [ ];
    };
    kernelModules = strings;
    blacklistedKernelModules = strings;
    kernel.sysctl = mkOption {
      type = types.attrsOf (types.nullOr (types.oneOf [ types.bool types.str types.int ]));
      default = { };
    };
    initrd = {
      includeDefaultModules = mkOption {
        type = types.bool;
        default = true;
      };
      availableKernelModules = strings;
      kernelModules = strings;
    };
    loader.grub.enable = mkOption {
      type = types.bool;
      default = true;
    };
  };
}
