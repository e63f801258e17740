# A file server VM with a persistent volume: what it serves survives restarts and new generations.
{ pkgs, ... }:
{
  networking.hostName = "files";
  system.stateVersion = "25.05";

  procurator.vm = {
    memoryMiB = 384;
    volumes.files = {
      sizeMiB = 512;
      mountPoint = "/srv/files";
    };
    health = [
      {
        type = "tcp";
        port = 8080;
      }
    ];
    restart = {
      policy = "on-failure";
      maxRestarts = 3;
    };
  };

  systemd.services.files = {
    description = "Static files from the volume on port 8080";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    unitConfig.RequiresMountsFor = [ "/srv/files" ];
    serviceConfig = {
      ExecStart = "${pkgs.busybox}/bin/busybox httpd -f -p 8080 -h /srv/files";
      DynamicUser = true;
      Restart = "on-failure";
    };
  };
}
