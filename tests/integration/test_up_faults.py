"""`procurator up` through the cloud-hypervisor double, and every way starting can fail: a one-line
error, a non-zero exit, and nothing left behind (no process, TAP, socket, record or new lease)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ExampleBuild
from tests.support.bundles import write_bundle, write_deployment
from tests.support.cli import PROCURATOR
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)


def leases(host: VmHost) -> dict[str, Any]:
    path = host.state / "leases.json"
    return json.loads(path.read_text())["leases"] if path.exists() else {}


def assert_nothing_left(host: VmHost) -> None:
    """No process, TAP, VM directory, socket or lease; no bridge (the start made it) and no volume file."""
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
    assert leases(host) == {}
    assert host.ns.link_names() == {"lo"}
    volumes = host.state / "volumes"
    found = sorted(p.relative_to(volumes).as_posix() for p in volumes.rglob("*")) if volumes.exists() else []
    assert found == []


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_lifecycle_through_the_double(vm_host: VmHost, example_build: ExampleBuild) -> None:
    vm_host.ok("up", str(example_build.deployment))
    vms = vm_host.ps()
    assert {n: v["backend"] for n, v in vms.items()} == {"api": "cloud-hypervisor", "web": "cloud-hypervisor"}
    assert all(v["state"] == "running" for v in vms.values())
    runtime = json.loads((vm_host.state / "vms" / "web" / "vm-config.runtime.json").read_text())
    assert runtime["net"][0]["tap"] in vm_host.taps()
    assert runtime["serial"] == {"mode": "File", "file": str(vm_host.state / "vms" / "web" / "serial.log")}
    stopped = json.loads(vm_host.ok("stop", "--json", "api"))
    assert stopped == [
        {"name": "api", "was_running": True, "graceful": True, "steps": ["power-button", "vmm.shutdown"]}
    ]
    started = json.loads(vm_host.ok("start", "--json", "api"))
    assert [(vm["name"], vm["state"]) for vm in started] == [("api", "running")]
    down = vm_host.run("down", "web", "api")
    assert down.stderr.splitlines() == ["web: down (graceful)", "api: down (graceful)"]
    assert vm_host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}


def test_missing_binary(vm_host: VmHost, example_build: ExampleBuild) -> None:
    line = one_line_error(vm_host.run("up", str(example_build.web), PROCURATOR_CLOUD_HYPERVISOR="/nope/ch"))
    assert "/nope/ch (from PROCURATOR_CLOUD_HYPERVISOR) is not an executable file" in line
    assert_nothing_left(vm_host)


def test_hypervisor_dying_at_start_is_quoted(vm_host: VmHost, example_build: ExampleBuild) -> None:
    line = one_line_error(vm_host.run("up", str(example_build.web), CHDOUBLE_FAULT="die-at-start"))
    assert "cloud-hypervisor" in line
    assert "last lines of" in line
    assert "no supported hypervisor" in line  # the double writes what the real one logs
    assert_nothing_left(vm_host)


def test_dying_while_booting(vm_host: VmHost, example_build: ExampleBuild) -> None:
    one_line_error(vm_host.run("up", str(example_build.web), CHDOUBLE_FAULT="die-on-boot"))
    assert_nothing_left(vm_host)


def test_api_that_never_answers_times_out(vm_host: VmHost, example_build: ExampleBuild) -> None:
    line = one_line_error(vm_host.run("up", str(example_build.web), CHDOUBLE_FAULT="no-answer"))
    assert "timed out" in line
    assert_nothing_left(vm_host)


def test_invalid_bundle_writes_nothing(vm_host: VmHost, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "vm-config.json").write_text("{}")
    (bundle / "procurator.json").write_text(json.dumps({"schema": 1, "name": "Bad"}))
    line = one_line_error(vm_host.run("up", str(bundle)))
    assert "procurator.json: name: 'Bad' is not a DNS label" in line
    assert not vm_host.state.exists()


def test_absurd_bundles_are_refused_before_anything_changes(
    vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path
) -> None:
    """What the hypervisor would refuse at boot (or a disk could never hold) is refused at load, by
    `up` and by `apply` (its plan), before the bridge, a lease or a volume exists."""
    config = json.loads((example_build.web / "vm-config.json").read_text())
    good = json.loads((example_build.web / "procurator.json").read_text())
    volume = {**good["volumes"][0], "sizeMiB": 10**13}
    cases = {
        "memory.size: must be at least 1048576, found 1": ({**config, "memory": {"size": 1}}, good),
        "memory.size: must be at most 35184372088832, found 1125899906842624": (
            {**config, "memory": {"size": 1 << 50}},
            good,
        ),
        "cpus.boot_vcpus: must be at most 254, found 1000000": (
            {**config, "cpus": {"boot_vcpus": 10**6, "max_vcpus": 10**6}},
            good,
        ),
        "volumes[0].sizeMiB: must be at most 16777216, found 10000000000000": (
            config,
            {**good, "volumes": [volume]},
        ),
        "rng.x: not a cloud-hypervisor setting Procurator passes on": (
            {**config, "rng": {"src": "/dev/urandom", "x": 1}},
            good,
        ),
    }
    for i, (expected, (vm_config, meta_data)) in enumerate(cases.items()):
        bundle = write_bundle(tmp_path / f"b{i}", "web", config=vm_config, meta_data=meta_data)
        deployment = write_deployment(tmp_path / f"d{i}", "local", {"web": bundle})
        for argv in (("up", str(bundle)), ("apply", str(deployment), "--wait", "booted")):
            line = one_line_error(vm_host.run(*argv))
            assert expected in line, (argv, line)
        assert_nothing_left(vm_host)
        assert not (vm_host.state / "leases.json").exists()
    bad = write_bundle(tmp_path / "utf8", "web", config=config, meta_data=good)
    (bad / "procurator.json").write_bytes(b'{"schema": 1, "name": "w\xffb"}')
    assert "procurator.json: not UTF-8 (byte 24)" in one_line_error(vm_host.run("up", str(bad)))
    assert_nothing_left(vm_host)


def test_racing_ups_start_one_vm(vm_host: VmHost, example_build: ExampleBuild) -> None:
    procs = [
        subprocess.Popen(
            [str(PROCURATOR), "up", str(example_build.web)],
            env=vm_host.env(CHDOUBLE_BOOT_DELAY="0.5"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "VM 'web' is already running" in loser
    assert len(vm_host.processes()) == 1
    assert len(vm_host.taps()) == 1
    vm_host.ok("down", "web")
    assert vm_host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}


def hypervisors_of(host: VmHost, name: str) -> list[str]:
    return [p for p in host.processes() if f"vms/{name}/" in p and "cloud-hypervisor" in p]


def kill_mid_start(host: VmHost, name: str, *args: str) -> None:
    """Run `procurator ARGS` with slow boots; kill -9 it once `name`'s hypervisor runs but has no record."""
    cli = subprocess.Popen(
        [str(PROCURATOR), *args],
        env=host.env(CHDOUBLE_BOOT_DELAY="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    record = host.state / "vms" / name / "record.json"
    deadline = time.monotonic() + 30
    try:
        while not (hypervisors_of(host, name) and not record.exists()):
            assert cli.poll() is None, f"procurator {' '.join(args)} ended before {name} was booting"
            assert time.monotonic() < deadline, f"{name}'s hypervisor never started"
            time.sleep(0.02)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
    assert len(hypervisors_of(host, name)) == 1  # the orphan: a hypervisor that no record names
    assert not record.exists()


def assert_converged(host: VmHost, names: set[str]) -> None:
    vms = host.ps()
    assert set(vms) == names
    for name, vm in vms.items():
        assert vm["state"] == "running"
        assert len(hypervisors_of(host, name)) == 1, hypervisors_of(host, name)
    assert len(host.taps()) == len(names)
    assert set(leases(host)) == names


def test_kill_9_of_up_mid_start_then_one_rerun_converges(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    kill_mid_start(vm_host, "web", "up", str(example_build.web))
    assert vm_host.ps() == {}  # no record: ps shows nothing, and the next up must not start a second one
    done = vm_host.run("up", str(example_build.web))
    assert done.returncode == 0, done.stderr
    assert_converged(vm_host, {"web"})
    assert process_alive(vm_host.ps()["web"]["pid"])


def test_kill_9_of_apply_mid_start_then_one_rerun_converges(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    kill_mid_start(vm_host, "web", "apply", str(example_build.deployment), "--wait", "booted")
    done = vm_host.run("apply", str(example_build.deployment), "--wait", "booted")
    assert done.returncode == 0, done.stderr
    assert_converged(vm_host, {"api", "web"})
    again = vm_host.run("apply", str(example_build.deployment), "--wait", "booted", "--json")
    assert json.loads(again.stdout)["changed"] is False


def process_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_a_health_wait_stops_at_the_configured_cap(
    vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path
) -> None:
    """The double runs no guest, so no check can pass: retries 1000 at 5 s would wait 83 minutes."""
    config = json.loads((example_build.web / "vm-config.json").read_text())
    good = json.loads((example_build.web / "procurator.json").read_text())
    checks = [{"type": "tcp", "port": 80, "intervalSeconds": 5, "timeoutSeconds": 1, "retries": 1000}]
    bundle = write_bundle(tmp_path, "web", config=config, meta_data={**good, "health": checks})
    capped = tmp_path / "worker.json"
    capped.write_text(json.dumps({**vm_host.config, "healthTimeout": 2}))
    started = time.monotonic()
    line = one_line_error(vm_host.run("up", str(bundle), "--wait", "healthy", PROCURATOR_CONFIG=str(capped)))
    assert time.monotonic() - started < 60
    assert "timed out after 2.0s waiting for health checks of 10.124.0.2 (capped by the worker " in line
    assert_nothing_left(vm_host)


def kill_mid_stop(host: VmHost, name: str, *args: str) -> None:
    """Run `procurator ARGS` (a down or stop of `name`) and kill -9 it while the guest powers off."""
    cli = subprocess.Popen([str(PROCURATOR), *args], env=host.env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    try:
        log = host.state / "vms" / name / "hypervisor.log"
        while "VmPowerButton" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert cli.poll() is None, f"procurator {' '.join(args)} ended before {name} was powering off"
            assert time.monotonic() < deadline, f"{name} never got the power button"
            time.sleep(0.02)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)


@pytest.mark.parametrize("command", ["down", "stop"])
def test_kill_9_mid_shutdown_then_one_rerun_converges(
    vm_host: VmHost, example_build: ExampleBuild, command: str
) -> None:
    up = vm_host.run("up", str(example_build.web), CHDOUBLE_POWEROFF_DELAY="2")  # the guest takes 2 s
    assert up.returncode == 0, up.stderr
    lease = leases(vm_host)["web"]
    kill_mid_stop(vm_host, "web", command, "web")
    assert set(vm_host.ps()) == {"web"}  # still listed: the record was not removed yet

    done = vm_host.run(command, "web")
    assert done.returncode == 0, done.stderr
    assert hypervisors_of(vm_host, "web") == []
    assert vm_host.taps() == set()
    assert leases(vm_host) == {"web": lease}  # neither down nor stop gives up the lease
    if command == "down":
        assert vm_host.ps() == {}
    else:
        assert vm_host.ps()["web"]["state"] == "stopped"
        vm_host.ok("start", "web")
        assert_converged(vm_host, {"web"})
