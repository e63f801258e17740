# lib.mkHosts: the worker hosts of a fleet and what each runs, for `procurator deploy` (docs/deploy.md).
# Builtins only, so a fleet without nixpkgs (nix/minimal, the tests) uses it too:
#
#   import ./nix/hosts.nix {
#     defaults = { sshOptions = [ "-o" "StrictHostKeyChecking=accept-new" ]; };   # under every host
#     hosts = {
#       worker1 = {
#         target = "root@10.0.0.2";          # [user@]host for ssh and `nix copy --to ssh://<target>`
#         port = 22;                         # optional (default: ssh's own, from its config)
#         identityFile = "/root/.ssh/deploy"; # optional; a string stays out of the store (a path too)
#         sshOptions = [ "-o" "ConnectTimeout=5" ];  # optional extra ssh arguments, no spaces in any
#         tags = [ "web" "eu" ];             # optional: `procurator deploy --on @web`
#         procurator = "procurator";         # optional: the command run on the host, split into words as a shell would (shlex), each word quoted for the remote shell: no expansion
#         deployment = <lib.mkDeployment { host = "worker1"; ... }>;  # or:
#         # vms = { inherit web api; };      # a deployment of these bundles, made with `mkDeployment`
#       };
#     };
#     # mkDeployment = import ./nix/make-deployment.nix;  # what `vms` is made with (the flake passes its own)
#   }
#
# -> {
#      schema = 1;
#      hosts.<name> = { name; target; port; identityFile; sshOptions; tags; procurator; deployment; };
#      inventory = { schema = 1; hosts.<name> = <the same without deployment>; };
#    }
#
# `inventory` is plain data: `nix eval --json <ref>.inventory` reads every host's settings without
# evaluating (or building) any deployment, then `procurator deploy` builds `<ref>.hosts.<name>.deployment`
# host by host, so one host whose deployment does not evaluate or build fails alone. Mistakes in the
# settings throw "procurator host '<name>': ..." naming every field to fix; a deployment made for another
# host throws when that host's deployment is evaluated.
{
  hosts,
  defaults ? { },
  mkDeployment ? import ./make-deployment.nix,
}:
let
  c = import ./lib/checks.nix;
  inherit (builtins)
    all
    attrNames
    concatLists
    concatStringsSep
    filter
    head
    isAttrs
    isList
    isPath
    isString
    length
    mapAttrs
    match
    ;

  known = [
    "target"
    "port"
    "identityFile"
    "sshOptions"
    "tags"
    "procurator"
    "deployment"
    "vms"
  ];
  defaultKeys = filter (k: k != "target" && k != "deployment" && k != "vms") known;
  expect = ok: msg: if ok then [ ] else [ msg ];
  noSpace = s: isString s && match ".*[[:space:]].*" s == null;
  # [user@]host: what ssh takes as its destination (and `nix copy` after ssh://); never an option.
  isTarget = s: noSpace s && s != "" && match "[-/].*" s == null && match ".*[/?#].*" s == null;
  asString = p: if isPath p then toString p else p;

  defaultErrors =
    if !isAttrs defaults then
      [ "defaults must be an attribute set of host settings, got ${c.show defaults}" ]
    else
      map (k: "defaults.${k}: unknown setting (defaults may set ${concatStringsSep ", " defaultKeys})") (
        filter (k: !(builtins.elem k defaultKeys)) (attrNames defaults)
      );

  settingsOf = name: h: {
    inherit name;
    target = h.target or null;
    port = h.port or defaults.port or null;
    identityFile = asString (h.identityFile or defaults.identityFile or null);
    sshOptions = (defaults.sshOptions or [ ]) ++ (h.sshOptions or [ ]);
    tags = h.tags or defaults.tags or [ ];
    procurator = h.procurator or defaults.procurator or "procurator";
  };

  hostErrors =
    name: h:
    if !isAttrs h then
      [ "expected an attribute set of settings, got ${c.show h}" ]
    else
      let
        s = settingsOf name h;
      in
      map (k: "unknown setting '${k}' (known: ${concatStringsSep ", " known})") (
        filter (k: !(builtins.elem k known)) (attrNames h)
      )
      ++ expect (c.isDnsLabel name) "the host name must be a DNS label (lowercase letters, digits, '-')"
      ++ expect (isTarget s.target)
        "target must be [user@]host without spaces, like \"root@10.0.0.2\", got ${c.show s.target}"
      ++ expect (s.port == null || c.isPort s.port) "port must be a TCP port (1-65535), got ${c.show s.port}"
      ++ expect (s.identityFile == null || (noSpace s.identityFile && s.identityFile != ""))
        "identityFile must be a file name without spaces, got ${c.show s.identityFile}"
      ++ expect (isList s.sshOptions && all (o: noSpace o && o != "") s.sshOptions)
        "sshOptions must be a list of ssh arguments, none empty or with spaces (they pass through NIX_SSHOPTS)"
      ++ expect (isList s.tags && all c.isDnsLabel s.tags)
        "tags must be a list of DNS labels (lowercase letters, digits, '-'), got ${c.show s.tags}"
      ++ expect (isString s.procurator && match "[[:space:]]*" s.procurator == null)
        "procurator must be the command that runs procurator on the host, got ${c.show s.procurator}"
      ++ expect ((h ? deployment) != (h ? vms))
        "give exactly one of deployment (a lib.mkDeployment) and vms (bundles by VM name)";

  errors =
    defaultErrors
    ++ (
      if isAttrs hosts then
        concatLists (
          map (name: map (e: "procurator host '${name}': ${e}") (hostErrors name hosts.${name})) (
            attrNames hosts
          )
        )
      else
        [ "procurator mkHosts: hosts must be an attribute set of hosts by name, got ${c.show hosts}" ]
    );

  checked =
    let
      n = length errors;
    in
    if n == 0 then
      true
    else
      # One line (people read it as nix's `error: ...`): every problem, separated by "; ".
      throw (if n == 1 then head errors else "${toString n} problems: ${concatStringsSep "; " errors}");

  deploymentOf =
    name: h:
    let
      d = if h ? deployment then h.deployment else mkDeployment { host = name; inherit (h) vms; };
      made = if isAttrs d then d.hostName or null else null;
    in
    if !(isAttrs d && d ? outPath) then
      throw "procurator host '${name}': deployment must be a derivation (lib.mkDeployment), got ${c.show d}"
    else if made == null || made == name then
      d
    else
      throw "procurator host '${name}': its deployment was made for host '${made}'; give it one made with host = \"${name}\"";

  settings = assert checked; mapAttrs settingsOf hosts;
in
{
  schema = 1;
  hosts = mapAttrs (name: s: s // { deployment = deploymentOf name hosts.${name}; }) settings;
  inventory = {
    schema = 1;
    hosts = settings;
  };
}
