"""Landlock on cloud-hypervisor, with the double, which restricts its VMM thread for real with the kernel's
landlock syscalls at vm.create as cloud-hypervisor does (tests/chdouble/landlock.py): a VM with a volume
boots under it, the VMM cannot open what its rules leave out, snapshots still work (`--to` too), an old
release and `hypervisor.landlock: false` get none, a rule left out fails for real."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procurator import waits
from procurator.errors import HypervisorError, HypervisorStartError
from procurator.hypervisor import cloud_hypervisor
from procurator.hypervisor import landlock as rules
from procurator.hypervisor.base import LaunchSpec
from procurator.hypervisor.cloud_hypervisor import ENV_BINARY, CloudHypervisor
from tests.chdouble import BINARY, sample_config
from tests.integration.conftest import ExampleBuild
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
PROBE = "CHDOUBLE_LANDLOCK_PROBE"


def requests(record: Path, endpoint: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return [r for r in lines if r.get("kind") == "request" and r["path"] == f"/api/v1/{endpoint}"]


def created(record: Path) -> dict[str, Any]:
    (create,) = requests(record, "vm.create")
    body: dict[str, Any] = json.loads(create["body"])
    return body


# --- through the CLI, in a throwaway network namespace ------------------------------------------


@pytest.mark.parametrize("vm_host", [CH], indirect=True)
def test_a_vm_with_a_volume_boots_under_landlock_and_reaches_nothing_else(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    record = host.root / "record.jsonl"
    outside = host.root / "outside.txt"  # readable by the test, named by no rule
    outside.write_text("secret")

    def ok(*args: str) -> str:
        return host.ok(*args, CHDOUBLE_RECORD=str(record), CHDOUBLE_LANDLOCK_PROBE=str(outside))

    ok("up", str(example_build.web))
    assert host.ps()["web"]["state"] == "running"
    body = created(record)
    volume = host.state / "volumes" / "web" / "data.img"
    assert {"path": str(volume), "readonly": False, "id": "vol-data", "image_type": "Raw"} in body["disks"]
    snapshots = host.state / "snapshots" / "web"
    assert body["landlock_enable"] is True
    (tap,) = host.taps()
    assert body["landlock_rules"] == [
        {"path": f"/sys/class/net/{tap}/tun_flags", "access": "r"},  # read when the TAP is opened
        {"path": str(snapshots), "access": "rw"},
        {"path": str(host.state / "vms" / "web" / "serial"), "access": "rw"},  # re-bound at a guest reset
    ]
    log = (host.state / "vms" / "web" / "hypervisor.log").read_text()
    # the double's VMM thread really is landlocked: it opened its volume at vm.boot, not the probe
    assert f"{PROBE} {outside}: refused: Permission denied (os error 13)" in log
    assert "Creating virtio-block device" in log
    assert requests(record, "vm.boot")[0]["status"] == 204

    # snapshots go where the rules allow; `--to` elsewhere is staged below them and moved
    taken = json.loads(ok("snapshot", "web", "--json"))
    assert (snapshots / taken["generation"] / taken["id"] / "data" / "memory-ranges").is_file()
    elsewhere = host.root / "elsewhere"
    ok("snapshot", "web", "--to", str(elsewhere))
    assert sorted(p.name for p in (elsewhere / "data").iterdir()) == [
        "config.json",
        "memory-ranges",
        "state.json",
        "vm-config.json",
    ]
    assert not (snapshots / "landlock-staging").exists()
    host.ok("down", "web")
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}


@pytest.mark.parametrize("vm_host", [{"hypervisor": {**CH["hypervisor"], "landlock": False}}], indirect=True)
def test_the_worker_configuration_turns_landlock_off(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    record = host.root / "record.jsonl"
    outside = host.root / "outside.txt"
    outside.write_text("not secret")
    host.ok("up", str(example_build.web), CHDOUBLE_RECORD=str(record), CHDOUBLE_LANDLOCK_PROBE=str(outside))
    body = created(record)
    assert "landlock_enable" not in body
    assert "landlock_rules" not in body
    assert PROBE not in (host.state / "vms" / "web" / "hypervisor.log").read_text()  # never restricted
    host.ok("down", "web")


# --- the backend against the double ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def _double_knobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for knob in ("CHDOUBLE_FAULT", "CHDOUBLE_GUEST_RESET", "CHDOUBLE_VERSION", PROBE, ENV_BINARY):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("CHDOUBLE_POWEROFF_DELAY", "0.05")
    monkeypatch.setenv("CHDOUBLE_RECORD", str(tmp_path / "record.jsonl"))
    monkeypatch.setattr(cloud_hypervisor, "_versions", {})


@pytest.fixture
def spec(tmp_path: Path) -> LaunchSpec:
    vm_dir = tmp_path / "vms" / "web"
    vm_dir.mkdir(parents=True)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x7fELF not really a kernel")
    return LaunchSpec(
        name="web",
        vm_dir=vm_dir,
        config=sample_config(vm_dir, kernel),
        serial_log=vm_dir / "serial.log",
        writable=(tmp_path / "snapshots" / "web",),
    )


@pytest.fixture
def backend() -> Iterator[CloudHypervisor]:
    made = CloudHypervisor(BINARY, start_timeout=15.0, step_timeout=3.0)
    yield made
    for pid, (proc, _) in list(made._children.items()):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        made._children.pop(pid, None)


def test_an_old_release_gets_no_landlock(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHDOUBLE_VERSION", "40")
    handle = backend.start(spec)
    try:
        body = created(tmp_path / "record.jsonl")
        assert "landlock_enable" not in body
        assert "landlock_rules" not in body
        argv = backend.argv(spec, 3)
        assert not any(arg.startswith("--landlock") for arg in argv)
    finally:
        backend.kill(handle)


def test_a_path_missing_at_vm_create_gets_no_rule_and_cannot_be_opened_at_boot(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path
) -> None:
    """The landlock crate drops a rule whose path cannot be opened (`path_beneath_rules`): a disk made
    after vm.create is refused at vm.boot by the kernel, as the real VMM's open would be."""
    late = tmp_path / "late.img"
    config = {**spec.config, "disks": [{"id": "late", "path": str(late), "readonly": True}]}
    body = {**config, "landlock_enable": True, "landlock_rules": []}
    from procurator.hypervisor.api import ApiClient  # noqa: PLC0415 - only this test speaks the API itself

    proc_spec = LaunchSpec(spec.name, spec.vm_dir, config, spec.serial_log)
    listener = cloud_hypervisor._bind_api_socket(proc_spec.api_socket)
    with listener:
        proc = backend._spawn(proc_spec, listener, None, backend.version())
    try:
        with ApiClient(proc_spec.api_socket, timeout=10.0) as api:
            backend._await_api(api, proc, proc_spec)
            api.put("vm.create", body)
            with late.open("wb") as image:
                image.truncate(1 << 20)
            with pytest.raises(HypervisorError) as refused:
                api.put("vm.boot")
    finally:
        proc.kill()
        proc.wait(5)
    assert "Cannot open disk path" in str(refused.value)
    assert "Permission denied (os error 13)" in str(refused.value)


def test_a_rule_left_out_makes_the_snapshot_fail(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules, "extra_rules", lambda _config, _writable: [])
    monkeypatch.setattr(rules, "needs", lambda _config, _writable: [])  # the start-up check, fooled too
    monkeypatch.setattr(cloud_hypervisor, "_landlock_staging", lambda _api, _directory: None)
    handle = backend.start(spec)
    try:
        backend.pause(handle)
        data = spec.writable[0] / "gen" / "snap.partial" / "data"
        data.mkdir(parents=True)
        with pytest.raises(HypervisorError) as refused:
            backend.snapshot(handle, data)
        assert "Permission denied (os error 13)" in str(refused.value)
        assert not (data / "config.json").exists()
    finally:
        backend.kill(handle)


def test_the_start_refuses_rules_that_leave_out_what_the_vm_needs(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules, "extra_rules", lambda _config, _writable: [])
    with pytest.raises(HypervisorStartError) as refused:
        backend.start(spec)
    assert f"could not reach {spec.writable[0]} (w)" in str(refused.value)
    assert "set hypervisor.landlock to false" in str(refused.value)
    assert not spec.api_socket.exists()


def test_under_landlock_a_guest_reset_binds_the_serial_socket_again_and_the_guest_runs_on(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vm_reboot` removes the serial socket (SerialManager's Drop) and binds it again
    (`pre_create_console_devices`): RemoveFile and MakeSock in its directory, which is granted."""
    monkeypatch.setenv("CHDOUBLE_GUEST_RESET", "0.3")
    handle = backend.start(spec)
    proc, _ = backend._children[handle.pid]
    try:
        deadline = time.monotonic() + 20
        while spec.events_path.read_text().count('"event": "rebooted"') < 2:
            assert proc.poll() is None, spec.hypervisor_log.read_text()
            assert time.monotonic() < deadline, "no two guest resets within 20 s"
            time.sleep(0.02)
        assert proc.poll() is None
        assert "Error rebooting VM" not in spec.hypervisor_log.read_text()
        # the serial keeper connected again to the socket bound anew, and says so in the log
        waits.wait_until(
            lambda: "serial port re-created (guest reset)" in spec.serial_log.read_text(),
            5,
            "the keeper's reconnect marker in the serial log",
            poll=0.02,
            last=spec.serial_log.read_text,
        )
    finally:
        backend.kill(handle)
    assert not (spec.vm_dir / "serial").exists()  # the socket and its directory go with the VM


def test_without_the_serial_directory_granted_a_guest_reset_ends_the_vmm(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the serial directory's rule is for: without it Landlock grants no RemoveFile nor MakeSock
    there, so the socket cannot be removed, bind finds it, the reboot fails and the VMM exits 1."""
    serial_dir = spec.vm_dir / "serial"
    real_extra, real_needs = rules.extra_rules, rules.needs

    def without_serial(config: dict[str, Any], writable: tuple[Path, ...]) -> list[rules.Rule]:
        return real_extra(config, tuple(p for p in writable if p != serial_dir))

    def needs_no_serial(config: dict[str, Any], writable: tuple[Path, ...]) -> list[rules.Rule]:
        return real_needs(config, tuple(p for p in writable if p != serial_dir))

    monkeypatch.setattr(rules, "extra_rules", without_serial)
    monkeypatch.setattr(rules, "needs", needs_no_serial)
    monkeypatch.setenv("CHDOUBLE_GUEST_RESET", "0.3")
    handle = backend.start(spec)
    proc, _ = backend._children[handle.pid]
    deadline = time.monotonic() + 10
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the VMM outlived its guest reset"
        time.sleep(0.02)
    assert proc.returncode == 1
    log = spec.hypervisor_log.read_text()
    assert "Error rebooting VM" in log
    assert "Address already in use (os error 98)" in log
    assert '"event": "rebooting"' in spec.events_path.read_text()
    backend.kill(handle)


def test_a_snapshot_elsewhere_is_staged_and_a_failed_one_leaves_no_staging(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path
) -> None:
    handle = backend.start(spec)
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        with pytest.raises(HypervisorError, match="Trying to snapshot while VM is running"):
            backend.snapshot(handle, elsewhere)  # not paused: refused after the staging was made
        assert list(spec.writable[0].iterdir()) == []
        backend.pause(handle)
        backend.snapshot(handle, elsewhere)
        assert sorted(p.name for p in elsewhere.iterdir()) == ["config.json", "memory-ranges", "state.json"]
        assert list(spec.writable[0].iterdir()) == []
    finally:
        backend.kill(handle)
