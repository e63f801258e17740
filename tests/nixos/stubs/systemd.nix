# systemd.services, systemd.timers, systemd.slices, systemd.tmpfiles.rules, systemd.package, as NixOS declares them
# (nixos/lib/systemd-unit-options.nix): only the unit options the project's modules use.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # A value of a [Unit]/[Service]/[Timer] section: lists of definitions concatenate (repeatable
  # settings), single values must agree, as NixOS's unitOption.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if builtins.isList (builtins.head defs').value then
        lib.concatMap (
          def:
          if builtins.isList def.value then
            def.value
          else
            throw "systemd stub: ${lib.showOption loc} mixes list and non-list definitions"
        ) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  unitName = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitNames = mkOption {
    type = types.listOf unitName;
    default = [ ];
  };

  commonUnit = {
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
      };
      # "asDropinIfExists": a whole unit file unless systemd or systemd.packages ship one of that name
      # (then <name>.d/overrides.conf); "asDropin": always <name>.d/overrides.conf.
      overrideStrategy = mkOption {
        type = types.enum [
          "asDropinIfExists"
          "asDropin"
        ];
        default = "asDropinIfExists";
      };
      description = mkOption {
        type = types.singleLineStr;
        default = "";
      };
      wantedBy = unitNames;
      requiredBy = unitNames;
      wants = unitNames;
      requires = unitNames;
      after = unitNames;
      before = unitNames;
      bindsTo = unitNames;
      partOf = unitNames;
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
    };
  };

  service = {
    imports = [ commonUnit ];
    options = {
      path = mkOption {
        type = types.listOf (types.either types.package types.str);
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
    };
  };

  timer = {
    imports = [ commonUnit ];
    options.timerConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
  };

  slice = {
    imports = [ commonUnit ];
    options.sliceConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
  };
in
{
  options.systemd = {
    package = mkOption {
      type = types.package;
      default = pkgs.systemd;
    };
    services = mkOption {
      type = types.attrsOf (types.submodule service);
      default = { };
    };
    timers = mkOption {
      type = types.attrsOf (types.submodule timer);
      default = { };
    };
    slices = mkOption {
      type = types.attrsOf (types.submodule slice);
      default = { };
    };
    tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    enableEmergencyMode = mkOption {
      type = types.bool;
      default = true;
    };
  };
}
