# The worker daemon (`procurator worker`), its configuration file, the VM user, and the unit that shuts
# the VMs down with the host.
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
  inherit (lib) mkIf mkMerge optional;
in
{
  config = mkIf cfg.enable (mkMerge [
    {
      environment.etc."procurator/worker.json".source = common.configFile;
      # `procurator ps`, `procurator logs web`, ... in a root shell read the worker's configuration.
      environment.systemPackages = [ cfg.package ];
      environment.variables.PROCURATOR_CONFIG = common.configPath;

      systemd.tmpfiles.rules = optional (common.stateDirectory == null) "d ${cfg.stateDir} 0755 root root - -";

      systemd.services.procurator-worker = {
        description = "Procurator worker: runs this host's microVMs";
        wantedBy = [ "multi-user.target" ];
        wants = [ "nix-daemon.socket" ];
        after = [
          "network.target"
          "nix-daemon.socket"
        ];
        path = common.workerPath;
        inherit (common) environment;
        # The file in /etc keeps its name; its content is what changes.
        restartTriggers = [ common.configFile ];
        serviceConfig = common.workerSandbox // {
          # Ready (sd_notify READY=1) once the API socket is bound and the running VMs are adopted,
          # so procurator-apply and the pull service, ordered after this unit, find a worker answering.
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = common.command ([ "worker" ] ++ common.metricsArgs);
          Restart = "always";
          RestartSec = "2s";
          # Each hypervisor runs in its own session but stays in this unit's cgroup. KillMode=process
          # signals only the daemon when the unit stops or restarts (a crash, a new package or
          # configuration on switch): the VMs keep running and the next daemon adopts them from their
          # records. procurator-shutdown below stops them with the host.
          KillMode = "process";
          # The unit's cgroup is the worker's to divide (systemd's Delegate=yes): the daemon itself in
          # the `supervisor` leaf (DelegateSubgroup=, systemd 254), each hypervisor beside it in
          # vm-<name> with that VM's memory, CPU and I/O limits. The unit lives in procurator.slice
          # so that every VM's group is under /sys/fs/cgroup/procurator.slice/.
          Slice = "procurator.slice";
          Delegate = "yes";
          DelegateSubgroup = "supervisor";
          # Every hypervisor thread counts against the unit, which holds all the VMs.
          TasksMax = "infinity";
          RuntimeDirectory = "procurator";
          RuntimeDirectoryMode = "0750";
        } // lib.optionalAttrs (common.stateDirectory != null) {
          StateDirectory = common.stateDirectory;
        };
      };

      # The slice of the worker unit, and so of every VM's cgroup, with the controllers accounted.
      systemd.slices.procurator = {
        description = "Procurator microVMs";
        sliceConfig = {
          MemoryAccounting = true;
          CPUAccounting = true;
          IOAccounting = true;
        };
      };

      # Stops the VMs gracefully (power button, then hard after each VM's shutdownTimeout) when the host
      # shuts down, leaving the desired deployment as it is so that they boot again with the worker.
      # Ordered before the worker: at shutdown the worker stops first (and restarts nothing), then
      # this unit's ExecStop runs. A switch never stops it (restartIfChanged = false); removing the
      # worker from the configuration does, which stops the VMs the worker no longer supervises.
      systemd.services.procurator-shutdown = {
        description = "Procurator: shut the microVMs down with the host";
        wantedBy = [ "multi-user.target" ];
        before = [ "procurator-worker.service" ];
        after = [ "network.target" ];
        restartIfChanged = false;
        path = common.workerPath;
        inherit (common) environment;
        serviceConfig = common.workerSandbox // {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${pkgs.coreutils}/bin/true";
          ExecStop = common.command [ "shutdown" ];
          TimeoutStopSec = "5min";
        };
      };
    }

    (mkIf (cfg.user == "procurator-vm") {
      users.users.procurator-vm = {
        description = "Procurator microVMs";
        isSystemUser = true;
        group = "kvm";
      };
    })
  ]);
}
