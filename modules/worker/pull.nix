# services.procurator.pull: the host builds its deployment from a flake on a timer and applies it
# (GitOps: the flake's branch is the desired state, no server pushes anything).
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.procurator;
  common = import ./common.nix {
    inherit
      config
      lib
      pkgs
      utils
      ;
  };
  ref = "${toString cfg.pull.flake}#${cfg.pull.attribute}";
in
{
  config = lib.mkIf (cfg.enable && cfg.pull.enable) {
    systemd.services.procurator-pull = {
      description = "Procurator: pull this host's deployment";
      wants = [ "network-online.target" ];
      requires = [ "procurator-worker.service" ];
      after = [
        "network-online.target"
        "procurator-worker.service"
      ];
      # nix fetches the flake itself (git and ssh for git+ssh:// and private repositories).
      path = [
        config.nix.package
        pkgs.git
        config.programs.ssh.package
      ];
      environment = common.environment // {
        # Look up the branch's newest commit at every pull, not once an hour (Nix's default).
        NIX_CONFIG = "tarball-ttl = 0";
      };
      serviceConfig = common.clientSandbox // {
        Type = "oneshot";
        ExecStart = common.command [
          "apply"
          ref
        ];
        TimeoutStartSec = "1h";
        # Root's SSH keys and netrc stay readable for private flakes.
        ProtectHome = "read-only";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_NETLINK"
          "AF_INET"
          "AF_INET6"
        ];
      };
    };

    # pull.interval is the time between the end of one pull and the start of the next:
    # OnUnitInactiveSec counts from when procurator-pull.service last became inactive or failed, so a
    # pull that outlasts the interval is not followed at once by another (OnUnitActiveSec counts from
    # the start). The first pull comes OnBootSec after boot (at once when the timer is added to a
    # running host later); each one is delayed by up to RandomizedDelaySec more.
    systemd.timers.procurator-pull = {
      description = "Procurator: pull this host's deployment ${cfg.pull.interval} after the last pull";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnBootSec = "2min";
        OnUnitInactiveSec = cfg.pull.interval;
        RandomizedDelaySec = "30s";
      };
    };
  };
}
