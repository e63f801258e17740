# The deployment of one worker host (docs/bundle.md), builtins only:
#
#   import ./nix/make-deployment.nix { host = "worker1"; vms = { web = <bundle>; api = <bundle>; }; }
#
# -> the derivation procurator-deployment-<host> whose $out/deployment.json is
# { "schema": 1, "host": ..., "vms": { "<name>": "<bundle store path>" } }. The JSON's string context
# makes every bundle a build input and a runtime reference, so the deployment's closure (nix copy)
# carries every bundle. Checks (throwing "procurator deployment '<host>': ...") are nix/lib's
# deploymentJson: host a DNS label, VM names valid and equal to each bundle's vmName.
{
  host,
  vms,
  system ? builtins.currentSystem,
}:
let
  lib = import ./lib;
  document = lib.deploymentJson { inherit host vms; };
in
builtins.derivation {
  name = "procurator-deployment-${document.host}";
  inherit system;
  builder = "/bin/sh";
  args = [
    "-euc"
    ''
      mkdir "$out"
      printf '%s\n' "$deploymentJson" > "$out/deployment.json"
    ''
  ];
  PATH = "/usr/bin:/bin";
  deploymentJson = builtins.toJSON document;
}
// {
  hostName = document.host;
  vmNames = builtins.attrNames document.vms;
}
