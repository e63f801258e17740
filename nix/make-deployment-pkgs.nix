# The deployment of one worker host (docs/bundle.md), built with nixpkgs: the same output as the
# builtins-only ./make-deployment.nix (procurator-deployment-<host> holding deployment.json), built by
# nixpkgs' stdenv so it works in a sandbox and from a flake (lib.mkDeployment).
#
#   import ./nix/make-deployment-pkgs.nix { inherit pkgs; host = "worker1"; vms = { inherit web api; }; }
#
# vms maps VM names to bundles (derivations with vmName, checked against their key) or bundle store
# paths. The JSON keeps the bundles' string context, so the deployment's closure carries every bundle.
{
  pkgs,
  host,
  vms,
}:
let
  spec = import ./lib;
  # Throws "procurator deployment '<host>': ..." before anything is built.
  document = spec.deploymentJson { inherit host vms; };
in
pkgs.runCommand "procurator-deployment-${document.host}"
  {
    deploymentJson = builtins.toJSON document;
    passAsFile = [ "deploymentJson" ];
    preferLocalBuild = true;
    passthru = {
      hostName = document.host;
      vmNames = builtins.attrNames document.vms;
      inherit vms;
    };
  }
  ''
    mkdir "$out"
    cat "$deploymentJsonPath" > "$out/deployment.json"
    echo >> "$out/deployment.json"
  ''
