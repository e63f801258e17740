"""Resources per VM with real QEMU boots through the CLI, on this host's cgroup v1 hierarchy: each
hypervisor runs in its own group with the bundle's limits, `ps --json` shows its usage, a guest past its
group's memory limit is OOM-killed inside its group while its neighbour runs on, the vCPU threads are
pinned as the bundle says, and nothing is left in the cgroup tree after `down`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from procurator import cgroup, process, sweep
from procurator.config import WorkerConfig
from procurator.hypervisor import qmp
from procurator.models import VMM_OVERHEAD_MIB_BY_BACKEND
from procurator.state import StateDir
from tests.integration.conftest import NixBuild
from tests.support.cli import PROCURATOR
from tests.support.host import VmHost

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
# web: 512 MiB of guest RAM, in a group whose limit the bundle sets to 1 GiB. What QEMU under TCG takes to
# boot varies (200-250 MiB here), so once it runs the test narrows the limit to what the group uses plus
# 64 MiB (as an operator would, in the same cgroup file), and a guest process touches a 150 MiB buffer,
# which the guest can hold and the group cannot: the kernel kills QEMU, in its group only.
WEB_LIMIT_MIB = 1024
SLACK = 64 * 1024 * 1024
OVERRIDES = (
    f"{{ web.memoryMiB = 512; web.resources = {{ memoryMaxMiB = {WEB_LIMIT_MIB}; }}; "
    "api.resources = { cpuAffinity = [ 1 ]; cpuQuotaPercent = 50; cpuWeight = 50; }; }"
)


def driver(host: VmHost) -> cgroup.Driver:
    """The driver of the host's VM groups: scoped by its state directory (a test's is never the default)."""
    found = cgroup.driver(scope=cgroup.scope_of(host.state))
    assert found is not None, "this host mounts no cgroup memory and cpu controllers"
    return found


def vcpu_threads(host: VmHost, name: str) -> dict[int, str]:
    """{vCPU index: Cpus_allowed_list of its thread}, the threads as QMP's query-cpus-fast names them."""
    with qmp.connect(host.state / "vms" / name / "api.sock", 10.0) as client:
        cpus = client.execute("query-cpus-fast")
    return {int(c["cpu-index"]): allowed(int(c["thread-id"])) for c in cpus}


def allowed(tid: int) -> str:
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"/proc/{tid}/status has no Cpus_allowed_list")


def in_guest(host: VmHost, name: str, command: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(PROCURATOR), "console", name],
        input=command + "\n",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=host.env(),
        check=False,
    )
    return done.stdout


def test_vm_groups_limits_usage_oom_pinning_and_nothing_left(
    vm_host: VmHost, nix_build_example: NixBuild
) -> None:
    host = vm_host
    web, api = nix_build_example("web", "api", args=["--arg", "overrides", OVERRIDES])
    drv = driver(host)
    host.ok("up", str(web), str(api), "--wait", "healthy")
    vms = host.ps()

    # Each hypervisor in its own group, with the bundle's limits (api: the default, guest RAM + QEMU's).
    for name in ("web", "api"):
        assert drv.pids(name) == [vms[name]["pid"]]
    assert vms["web"]["resources"]["memory_max"] == WEB_LIMIT_MIB * MIB
    assert vms["api"]["resources"]["memory_max"] == (256 + VMM_OVERHEAD_MIB_BY_BACKEND["qemu"]) * MIB
    for name in ("web", "api"):
        assert 16 * MIB < vms[name]["resources"]["memory_bytes"] < vms[name]["resources"]["memory_max"]
        assert vms[name]["resources"]["cpu_usec"] > 0
        assert vms[name]["resources"]["oom_kills"] == 0
    api_cpu = Path(str(drv.dirs("api")[1]))
    assert (api_cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (api_cpu / "cpu.shares").read_text().strip() == "512"

    # api's two vCPU threads run on host CPU 1 only; web's (unpinned) anywhere.
    assert vcpu_threads(host, "api") == {0: "1", 1: "1"}
    assert allowed(vms["api"]["pid"]) == "0-1"  # the vCPU threads are pinned, not QEMU's other threads
    assert vcpu_threads(host, "web") == {0: "0-1"}

    # web's guest touches more than its group's (narrowed) limit holds: the kernel kills its QEMU there.
    used = drv.usage("web")
    assert used is not None
    drv.create("web", cgroup.Limits(memory_max=used.memory_bytes + SLACK))
    in_guest(host, "web", "dd if=/dev/zero of=/dev/null bs=150M count=1")
    deadline = time.monotonic() + 60
    while process.alive(vms["web"]["pid"], None) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not process.alive(vms["web"]["pid"], None), "web's QEMU outlived its memory limit"
    usage = drv.usage("web")
    assert usage is not None
    assert usage.oom_kills >= 1
    after = host.ps()
    assert after["web"]["state"] == "exited"
    assert after["web"]["resources"] is None
    assert after["api"]["state"] == "running"
    assert after["api"]["pid"] == vms["api"]["pid"]
    assert "name=api" in host.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{vms['api']['ip']}/")

    # down removes both groups, the one the OOM left and the running VM's: nothing left in the tree.
    done = host.run("down", "web", "api")
    assert done.returncode == 0, done.stderr
    assert drv.leftovers() == []
    scope = cgroup.scope_of(host.state)
    parents = {
        m / cgroup.V1_PARENT for m in cgroup.parse_mounts(Path("/proc/mounts").read_text())[1].values()
    }
    assert not [
        e for p in parents if p.is_dir() for e in p.iterdir() if e.is_dir() and e.name.endswith(scope)
    ]


def test_the_sweep_removes_the_group_a_killed_hypervisor_left(
    vm_host: VmHost, nix_build_example: NixBuild
) -> None:
    host = vm_host
    (web,) = nix_build_example("web")
    drv = driver(host)
    host.ok("up", str(web), "--wait", "none")
    pid = host.ps()["web"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert process.wait_gone(pid, None, 10)
    assert "web" in drv.leftovers()  # kill -9: nobody removed it

    config = WorkerConfig.load(host.config_path)
    done = sweep.sweep(StateDir(host.state), config.network, cgroup_base=config.cgroups.base)
    assert "removed the cgroup of web, whose hypervisor is gone" in done
    assert "web" not in drv.leftovers()
    assert json.loads(host.ok("ps", "--json"))[0]["state"] == "exited"  # the record is the sweep's to keep
