# The rest of NixOS the modules touch: assertions and warnings (nixos/modules/misc/assertions.nix),
# system.build and the loader's file names, nix.*, environment.*, users.users, programs.ssh.package.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    system = {
      build = mkOption {
        type = types.lazyAttrsOf types.unspecified;
        default = { };
      };
      boot.loader = {
        kernelFile = mkOption {
          type = types.str;
          default = if pkgs.stdenv.hostPlatform.isAarch64 then "Image" else "bzImage";
        };
        initrdFile = mkOption {
          type = types.str;
          default = "initrd";
        };
      };
      disableInstallerTools = mkOption {
        type = types.bool;
        default = false;
      };
    };

    nix = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      package = mkOption {
        type = types.package;
        default = pkgs.nix;
      };
    };

    environment = {
      etc = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              source = mkOption { type = types.unspecified; };
              text = mkOption {
                type = types.nullOr types.lines;
                default = null;
              };
            };
          }
        );
        default = { };
      };
      systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      variables = mkOption {
        type = types.attrsOf (types.either types.str (types.listOf types.str));
        default = { };
      };
    };

    users.users = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            description = mkOption {
              type = types.str;
              default = "";
            };
            isSystemUser = mkOption {
              type = types.bool;
              default = false;
            };
            group = mkOption {
              type = types.str;
              default = "";
            };
            uid = mkOption {
              type = types.nullOr types.int;
              default = null;
            };
          };
        }
      );
      default = { };
    };

    programs.ssh.package = mkOption {
      type = types.package;
      default = pkgs.openssh;
    };
  };
}
