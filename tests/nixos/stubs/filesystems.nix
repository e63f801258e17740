# fileSystems.<mount point> (nixos/modules/tasks/filesystems.nix): the attributes the modules set.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  fileSystem =
    { name, ... }:
    {
      options = {
        mountPoint = mkOption {
          type = types.str;
          default = name;
        };
        device = mkOption {
          type = types.nullOr types.str;
          default = null;
        };
        fsType = mkOption {
          type = types.str;
          default = "auto";
        };
        options = mkOption {
          type = types.nonEmptyListOf types.nonEmptyStr;
          default = [ "defaults" ];
        };
        neededForBoot = mkOption {
          type = types.bool;
          default = false;
        };
        noCheck = mkOption {
          type = types.bool;
          default = false;
        };
      };
    };
in
{
  options.fileSystems = mkOption {
    type = types.attrsOf (types.submodule fileSystem);
    default = { };
  };
}
