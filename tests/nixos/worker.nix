# nixosModules.worker under the NixOS test driver (checks.x86_64-linux.worker-vm-test, built by
# `nix flake check` on hosts with KVM; it does not run elsewhere).
#
# A worker with the qemu backend (KVM when the host offers nested virtualisation, TCG otherwise) gets
# services.procurator.deployment = two NixOS microVMs built with lib.mkVm. Switching to a
# specialisation whose deployment changes one of them must replace that VM only, and restarting the
# worker must leave both VMs running.
#
#   import ./tests/nixos/worker.nix { inherit self; pkgs = nixpkgs.legacyPackages.x86_64-linux; }
{ self, pkgs }:
let
  guest =
    name: extra:
    self.lib.mkVm {
      inherit pkgs;
      modules = [
        {
          networking.hostName = name;
          system.stateVersion = "26.05";
          procurator.vm.memoryMiB = 256;
        }
        extra
      ];
    };
  alpha = guest "alpha" { };
  betaOld = guest "beta" { };
  # Any change to the guest system is a new bundle, hence a new generation of the VM.
  betaNew = guest "beta" { environment.etc."procurator-test".text = "second generation"; };

  deployment =
    vms:
    self.lib.mkDeployment {
      inherit pkgs vms;
      host = "worker";
    };
  first = deployment {
    inherit alpha;
    beta = betaOld;
  };
  second = deployment {
    inherit alpha;
    beta = betaNew;
  };
in
pkgs.testers.runNixOSTest {
  name = "procurator-worker";

  nodes.worker =
    { lib, ... }:
    {
      imports = [ self.nixosModules.worker ];
      virtualisation = {
        memorySize = 2048;
        cores = 2;
      };
      services.procurator = {
        enable = true;
        hypervisor.backend = "qemu";
        deployment = first;
      };
      specialisation.second.configuration.services.procurator.deployment = lib.mkForce second;
    };

  testScript =
    { nodes, ... }:
    let
      switchToSecond = "${nodes.worker.system.build.toplevel}/specialisation/second/bin/switch-to-configuration test";
    in
    ''
      import json


      def vms():
          out = worker.succeed("procurator --config /etc/procurator/worker.json ps --json")
          return {vm["name"]: vm for vm in json.loads(out)}


      def assert_running(found, names):
          assert sorted(found) == sorted(names), f"VMs {sorted(found)}, expected {sorted(names)}"
          for vm in found.values():
              assert vm["state"] == "running", f"{vm['name']} is {vm['state']}: {vm}"


      worker.wait_for_unit("procurator-worker.service")
      worker.wait_for_unit("procurator-apply.service")

      with subtest("the deployment's VMs run"):
          before = vms()
          assert_running(before, ["alpha", "beta"])
          assert before["alpha"]["bundle"] == "${alpha}", before["alpha"]
          assert before["beta"]["bundle"] == "${betaOld}", before["beta"]

      with subtest("a switch that changes one VM replaces that VM only"):
          worker.succeed("${switchToSecond}")
          worker.wait_for_unit("procurator-apply.service")
          after = vms()
          assert_running(after, ["alpha", "beta"])
          assert after["beta"]["bundle"] == "${betaNew}", after["beta"]
          assert after["beta"]["generation"] != before["beta"]["generation"], after["beta"]
          assert after["alpha"]["generation"] == before["alpha"]["generation"], after["alpha"]
          assert after["alpha"]["pid"] == before["alpha"]["pid"], (before["alpha"], after["alpha"])

      with subtest("the VMs outlive a restart of the worker"):
          worker.succeed("systemctl restart procurator-worker.service")
          worker.wait_for_unit("procurator-worker.service")
          worker.wait_for_unit("procurator-apply.service")
          again = vms()
          assert_running(again, ["alpha", "beta"])
          for name in ("alpha", "beta"):
              assert again[name]["pid"] == after[name]["pid"], (after[name], again[name])
    '';
}
