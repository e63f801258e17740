# The functions and values of nixos/lib/utils.nix the modules use.
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
rec {
  # NixOS's rule: each argument becomes a double-quoted JSON string (systemd reads those escapes),
  # with % and $ doubled so that systemd expands neither specifiers nor variables; the arguments are
  # joined by spaces.
  escapeSystemdExecArgs = args: lib.concatMapStringsSep " " arg args;

  # The mount points NixOS mounts in stage 1 whatever their neededForBoot (closed under parents), as
  # nixos/lib/utils.nix lists them (nixpkgs 07d3fe2; "/var/lib/nixos" came last, in 2024).
  # fsNeededForBoot is its test of a fileSystems entry: tasks/filesystems.nix adds x-initrd.mount to
  # those and puts them in the initrd's fstab, the scripted stage 1 (stage-1.nix) mounts them.
  pathsNeededForBoot = [
    "/"
    "/nix"
    "/nix/store"
    "/var"
    "/var/log"
    "/var/lib"
    "/var/lib/nixos"
    "/etc"
    "/usr"
  ];
  fsNeededForBoot = fs: fs.neededForBoot || builtins.elem fs.mountPoint pathsNeededForBoot;
}
