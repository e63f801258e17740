# A web server VM: nginx on port 80, checked over HTTP by the host before it replaces a running one.
{ pkgs, ... }:
{
  networking.hostName = "web"; # also the VM's name (procurator.vm.name defaults to it)
  system.stateVersion = "25.05";

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
