# services.procurator.deployment: the deployment is part of the system, applied when the worker starts
# and whenever a switch changes it.
#
# A oneshot unit rather than an activation script: activation runs before the switch starts units,
# so the worker may not be running yet (or still run the old package), and activation must not block
# on health checks or fail the switch half-way. The unit runs after the worker, its failure is reported
# by `nixos-rebuild switch` like any unit's, and `systemctl status procurator-apply` shows the plan.
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
in
{
  config = lib.mkIf (cfg.enable && cfg.deployment != null) {
    systemd.services.procurator-apply = {
      description = "Procurator: apply this host's deployment";
      wantedBy = [ "multi-user.target" ];
      requires = [ "procurator-worker.service" ];
      after = [ "procurator-worker.service" ];
      # The deployment's path is in ExecStart too; the trigger says why the unit restarts on switch.
      restartTriggers = [ cfg.deployment ];
      path = [ config.nix.package ];
      inherit (common) environment;
      serviceConfig = common.clientSandbox // {
        Type = "oneshot";
        # Active after a successful apply: a switch restarts the unit only when it changed.
        RemainAfterExit = true;
        # `procurator apply` switches stateDir/profiles/deployment to the deployment itself.
        ExecStart = common.command [
          "apply"
          "${cfg.deployment}"
        ];
        TimeoutStartSec = "15min";
      };
    };
  };
}
