# The one function of nixos/lib/utils.nix the modules use. NixOS's rule: each argument becomes a
# double-quoted JSON string (systemd reads those escapes), with % and $ doubled so that systemd
# expands neither specifiers nor variables; the arguments are joined by spaces.
{ lib }:
let
  arg =
    a:
    let
      s =
        if builtins.isString a || builtins.isPath a || lib.isDerivation a then
          "${a}"
        else if builtins.isInt a || builtins.isFloat a then
          toString a
        else
          throw "escapeSystemdExecArgs: a ${builtins.typeOf a} is not an argument";
    in
    builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
in
{
  escapeSystemdExecArgs = args: lib.concatMapStringsSep " " arg args;
}
