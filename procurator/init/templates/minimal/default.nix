# Procurator microVMs ({{ vms | join(", ") }}) built with its nixpkgs-free builder (nix/minimal), and the
# deployment that runs them on host {{ host }}. Written by `procurator init --minimal`; see README.md.
#
#   procurator build ./default.nix#deployment
{
  procurator ? {{ source | nix_path }},
  hostCache ? /var/cache/procurator,
}:
let
  minimal = import (procurator + "/nix/minimal") { inherit hostCache; };
  makeDeployment = import (procurator + "/nix/make-deployment.nix");
  vms = {
{% for vm in vms %}
    {{ vm }} = minimal.mkVm (import ./vms/{{ vm }}.nix);
{% endfor %}
  };
in
vms
// {
  deployment = makeDeployment {
    host = "{{ host }}";
    inherit vms;
  };
}
