# The VM web: a NixOS system (nginx serving a page on port 80), checked over HTTP by the host
# before it replaces a running generation.
{ pkgs, ... }:
{
  networking.hostName = "web"; # also the VM's name (procurator.vm.name defaults to it)
  system.stateVersion = "26.05";

  procurator.vm = {
    vcpus = 1;
    memoryMiB = 512;
    health = [
      {
        type = "http";
        port = 80;
        path = "/";
      }
    ];
    # A volume, kept across restarts and new generations (docs/bundle.md):
    # volumes.data = { sizeMiB = 512; mountPoint = "/srv/data"; };
  };

  services.nginx = {
    enable = true;
    virtualHosts.web = {
      default = true;
      root = pkgs.writeTextDir "index.html" ''
        <h1>Hello from the web microVM</h1>
      '';
    };
  };
}
