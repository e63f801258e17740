# networking.* and services.resolved.enable as NixOS declares them: only what the modules use.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  bool =
    default:
    mkOption {
      type = types.bool;
      inherit default;
    };
in
{
  options = {
    networking = {
      hostName = mkOption {
        type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
        default = "nixos";
      };
      useDHCP = bool true;
      usePredictableInterfaceNames = bool true;
      resolvconf.enable = bool true;
      nftables = {
        enable = bool false;
        flushRuleset = bool true;
      };
      firewall = {
        allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };
        trustedInterfaces = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        extraForwardRules = mkOption {
          type = types.lines;
          default = "";
        };
      };
    };
    services.resolved.enable = bool false;
  };
}
