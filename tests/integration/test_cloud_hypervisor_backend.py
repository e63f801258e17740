"""The cloud-hypervisor backend against the test double (tests/chdouble): what it sends, the lifecycle,
and every failure path, each checked to leave no process and no socket behind."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from procurator import process, waits
from procurator.errors import HypervisorApiError, HypervisorError, HypervisorStartError, InvalidStateError
from procurator.hypervisor import cloud_hypervisor
from procurator.hypervisor.api import ApiClient, get_once
from procurator.hypervisor.base import Handle, LaunchSpec, VmState
from procurator.hypervisor.cloud_hypervisor import ENV_BINARY, CloudHypervisor, EventReader, resolve_binary
from tests.chdouble import BINARY, sample_config
from tests.support import chspec


@pytest.fixture(autouse=True)
def _double_knobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for knob in ("CHDOUBLE_FAULT", "CHDOUBLE_BOOT_DELAY", "CHDOUBLE_START_DELAY", "CHDOUBLE_VALIDATE"):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.delenv(ENV_BINARY, raising=False)
    monkeypatch.setenv("CHDOUBLE_POWEROFF_DELAY", "0.05")
    monkeypatch.setenv("CHDOUBLE_RECORD", str(tmp_path / "record.jsonl"))
    monkeypatch.delenv("CHDOUBLE_VERSION", raising=False)
    # the double's release is a knob, not its file: forget what earlier tests learnt of the binary
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


def landlocked(spec: LaunchSpec) -> dict[str, object]:
    """What the backend adds to vm.create where Landlock is used (v41+ on a kernel with ABI 3, as here): the
    VM's snapshot directory and the serial socket's, besides what the VMM grants itself from the config."""
    return {
        "landlock_enable": True,
        "landlock_rules": [
            {"path": str(p), "access": "rw"} for p in (*spec.writable, spec.vm_dir / "serial")
        ],
    }


@pytest.fixture
def backend() -> CloudHypervisor:
    return CloudHypervisor(BINARY, start_timeout=15.0, api_timeout=10.0, step_timeout=3.0)


@pytest.fixture
def clean(spec: LaunchSpec) -> Iterator[None]:
    """Assert that the test leaves no hypervisor process and no socket behind."""
    assert leftovers(spec.vm_dir) == ([], [])
    yield
    assert leftovers(spec.vm_dir) == ([], [])


def leftovers(vm_dir: Path) -> tuple[list[int], list[str]]:
    """Processes whose command line names `vm_dir` (or unreaped children of ours), and sockets in it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if str(vm_dir) in cmdline or (state == "Z" and int(ppid) == os.getpid()):
            pids.append(int(entry.name))
    sockets = sorted(p.name for p in vm_dir.rglob("*") if p.is_socket())
    return pids, sockets


def records(tmp_path: Path, kind: str) -> list[dict[str, Any]]:
    path = tmp_path / "record.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def events(vm_dir: Path) -> list[tuple[str, str]]:
    reader = EventReader(vm_dir / "events")
    reader.offset = 0
    return [(e["source"], e["event"]) for e in reader.read()]


# --- what is sent ----------------------------------------------------------------------------------


def test_start_and_stop_send_the_expected_command_line_and_requests(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    handle = backend.start(spec)
    backend.info(handle)
    backend.shutdown(handle, timeout=5.0)

    (start,) = [r for r in records(tmp_path, "process") if r["what"] == "start"]
    argv = start["argv"]
    assert argv[0] == "--api-socket"
    assert argv[1].startswith("fd=")
    assert int(argv[1].removeprefix("fd=")) > 2
    assert argv[2:] == [
        "--event-monitor", f"path={spec.vm_dir / 'events'}",
        "--log-file", str(spec.vm_dir / "hypervisor.log"),
        "--seccomp", "true",
        "--no-shutdown",
        "-v",
    ]  # fmt: skip

    sent = records(tmp_path, "request")
    sequence = [(r["method"], r["path"].removeprefix("/api/v1/")) for r in sent]
    # Legitimate repetitions on a loaded machine: vmm.ping retried while the process starts slowly, and
    # vm.info polled while the guest takes more than half a second to power off.
    pings = sequence.index(("PUT", "vm.create"))
    assert pings >= 1
    assert set(sequence[:pings]) == {("GET", "vmm.ping")}, sequence
    button = sequence.index(("PUT", "vm.power-button"))
    assert set(sequence[button + 1 : -1]) <= {("GET", "vm.info")}, sequence
    assert [sequence[pings - 1], *sequence[pings : button + 1], sequence[-1]] == [
        ("GET", "vmm.ping"),
        ("PUT", "vm.create"),
        ("PUT", "vm.boot"),
        ("GET", "vm.info"),
        ("PUT", "vm.power-button"),
        ("PUT", "vmm.shutdown"),
    ], sequence
    sent = [sent[pings - 1], *sent[pings : button + 1], sent[-1]]
    create = sent[1]
    assert create["headers"]["content-type"] == "application/json"
    # the File serial port is sent as a Socket that the serial keeper copies into the same file
    serial_socket = {"mode": "Socket", "socket": str(spec.vm_dir / "serial" / "serial.sock")}
    assert json.loads(create["body"]) == {**spec.config, "serial": serial_socket, **landlocked(spec)}
    for bodyless in (sent[2], sent[4], sent[5]):
        assert bodyless["body"] is None
        assert "content-type" not in bodyless["headers"]
        assert bodyless["headers"].get("content-length", "0") == "0"
    assert all(r["status"] < 300 for r in sent)


# --- the lifecycle ---------------------------------------------------------------------------------


def test_lifecycle_start_info_counters_pause_resume_and_graceful_shutdown(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    assert handle.backend == "cloud-hypervisor"
    assert handle.api_socket == spec.api_socket
    assert handle.vm_dir == spec.vm_dir
    assert process.alive(handle.pid, handle.start_time)
    assert oct(spec.api_socket.stat().st_mode & 0o777) == "0o600"

    info = backend.info(handle)
    assert info.state is VmState.RUNNING
    # from v51 a disk without image_type gets the detected one written into its config
    # (vmm/src/device_manager.rs make_virtio_block_device: "Configuration updated to persist type")
    typed = [{**disk, "image_type": "Raw"} for disk in spec.config["disks"]]
    assert info.details["config"] == {
        **spec.config,
        "disks": typed,
        "serial": {"mode": "Socket", "socket": str(spec.vm_dir / "serial" / "serial.sock")},
        **landlocked(spec),
    }
    assert backend.ping(handle)["pid"] == handle.pid

    counters = backend.counters(handle)
    assert set(counters) == {"store", "eth0"}
    assert isinstance(counters["eth0"]["rx_bytes"], int)

    backend.pause(handle)
    assert backend.info(handle).state is VmState.PAUSED
    backend.resume(handle)
    assert backend.info(handle).state is VmState.RUNNING

    result = backend.shutdown(handle, timeout=5.0)
    assert result.graceful
    assert result.steps == ("power-button", "vmm.shutdown")
    assert backend.info(handle).state is VmState.GONE
    assert events(spec.vm_dir) == [
        ("vmm", "starting"), ("vm", "booting"), ("vm", "booted"), ("vm", "pausing"), ("vm", "paused"),
        ("vm", "resuming"), ("vm", "resumed"), ("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown"),
    ]  # fmt: skip
    assert (spec.vm_dir / "serial.log").is_file()
    assert "API request event: VmBoot" in spec.hypervisor_log.read_text()


def test_shutdown_of_a_guest_that_already_powered_off_is_graceful(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    with ApiClient(handle.api_socket) as api:
        api.put("vm.power-button")
    deadline = time.monotonic() + 5
    while backend.info(handle).state is not VmState.CREATED:  # --no-shutdown: the process stays
        assert time.monotonic() < deadline, "the guest never powered off"
        time.sleep(0.02)
    result = backend.shutdown(handle, timeout=5.0)
    assert result.graceful
    assert result.steps == ("power-button", "vmm.shutdown")


def test_adopt_recognises_only_the_very_process(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    try:
        restarted = CloudHypervisor(BINARY)  # a new Procurator process, with no memory of the child
        assert restarted.adopt(handle)
        assert restarted.info(handle).state is VmState.RUNNING
        assert not restarted.adopt(replace(handle, start_time=handle.start_time + 1))
        assert not restarted.adopt(replace(handle, backend="qemu"))
        own_start = process.process_start_time(os.getpid())
        assert own_start is not None
        assert not restarted.adopt(replace(handle, pid=os.getpid(), start_time=own_start))  # not its socket
        assert restarted.shutdown(handle, timeout=5.0).graceful
    finally:
        backend.kill(handle)
    assert not backend.adopt(handle)


_STEADY = """
import json, sys
from pathlib import Path
from procurator.hypervisor.base import Handle
from procurator.hypervisor.cloud_hypervisor import CloudHypervisor
h = json.loads(sys.argv[1])
handle = Handle(h["backend"], h["pid"], h["start_time"], Path(h["api_socket"]), Path(h["vm_dir"]))
backend = CloudHypervisor(sys.argv[2])
seen = [backend.adopt(handle), backend.info(handle).state.value, "pid" in backend.ping(handle),
        isinstance(backend.counters(handle), dict)]
print(json.dumps({"seen": seen, "httpx": "httpx" in sys.modules}))
"""


def test_what_a_worker_asks_every_vm_goes_without_httpx(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    """Adoption, vm.info, the watchdog's ping and the scrape's counters are single requests (get_once, read
    by http1.py): a worker that boots nothing never imports httpx (some 5 MB of its memory)."""
    handle = backend.start(spec)
    try:
        fields = {"backend": handle.backend, "pid": handle.pid, "start_time": handle.start_time,
                  "api_socket": str(handle.api_socket), "vm_dir": str(handle.vm_dir)}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", _STEADY, json.dumps(fields), str(BINARY)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"seen": [True, "Running", True, True], "httpx": False}
    finally:
        backend.kill(handle)


def test_kill_stops_at_once_and_removes_the_socket(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    backend.kill(handle)
    assert not process.alive(handle.pid, handle.start_time)
    assert not spec.api_socket.exists()
    assert backend.info(handle).state is VmState.GONE
    assert backend.shutdown(handle, timeout=1.0).steps == ("gone",)
    backend.kill(handle)  # idempotent


def test_runs_as_the_configured_user(backend: CloudHypervisor, spec: LaunchSpec, clean: None) -> None:
    me = pwd.getpwuid(os.getuid())
    handle = backend.start(replace(spec, user=me.pw_name))
    try:
        assert os.stat(f"/proc/{handle.pid}").st_uid == me.pw_uid
        for path in (spec.hypervisor_log, spec.events_path, spec.serial_log):
            assert path.stat().st_uid == me.pw_uid
    finally:
        backend.kill(handle)


def test_a_stale_socket_is_replaced(backend: CloudHypervisor, spec: LaunchSpec, clean: None) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(spec.api_socket))
    stale.close()  # the file stays, nobody listens
    handle = backend.start(spec)
    backend.kill(handle)


# --- failures --------------------------------------------------------------------------------------


def test_resolve_binary_prefers_the_environment_and_explains_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(HypervisorStartError, match=f"hypervisor.binary.*{ENV_BINARY}"):
        resolve_binary(None)
    with pytest.raises(HypervisorStartError, match=r"from hypervisor\.binary\) is not an executable file"):
        resolve_binary(str(tmp_path / "cloud-hypervisor"))
    with pytest.raises(HypervisorStartError, match="not on PATH"):
        resolve_binary("no-such-cloud-hypervisor")
    assert resolve_binary(str(BINARY)) == BINARY
    monkeypatch.setenv("PATH", f"{BINARY.parent}:{os.environ.get('PATH', '')}")
    assert resolve_binary("cloud-hypervisor") == BINARY
    monkeypatch.setenv(ENV_BINARY, str(tmp_path / "elsewhere"))
    with pytest.raises(HypervisorStartError, match=f"from {ENV_BINARY}"):
        resolve_binary(str(BINARY))
    monkeypatch.setenv(ENV_BINARY, str(BINARY))
    assert resolve_binary("/nonexistent/cloud-hypervisor") == BINARY


def test_missing_binary(spec: LaunchSpec, tmp_path: Path, clean: None) -> None:
    backend = CloudHypervisor(tmp_path / "cloud-hypervisor")
    with pytest.raises(HypervisorStartError, match=f"not found or not executable.*{ENV_BINARY}"):
        backend.start(spec)


def test_dies_at_start_quotes_the_log(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_FAULT", "die-at-start")
    with pytest.raises(HypervisorStartError) as caught:
        backend.start(spec)
    message = str(caught.value)
    assert "exited with code 1 while starting" in message
    assert str(spec.hypervisor_log) in message
    assert "Fatal error: CreateHypervisor(HypervisorCreate(no supported hypervisor))" in message
    assert "2: no supported hypervisor" in message  # its stderr lands in the same log


def test_dies_while_booting_quotes_the_log(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_FAULT", "die-on-boot")
    with pytest.raises(
        HypervisorStartError, match=r"exited with code 1 while starting.*vCPU thread panicked"
    ):
        backend.start(spec)


def test_a_socket_that_never_answers_times_out_bounded(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_FAULT", "no-answer")
    backend = CloudHypervisor(BINARY, start_timeout=1.0, step_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(HypervisorStartError, match=r"timed out after 1\.0s waiting for .*vmm\.ping"):
        backend.start(spec)
    assert time.monotonic() - started < 1.0 + 3.0  # the start timeout, then the clean-up


def test_a_slow_start_is_waited_for_within_the_bound(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_START_DELAY", "1.3")  # longer than one vmm.ping attempt (1 s)
    backend = CloudHypervisor(BINARY, start_timeout=10.0)
    handle = backend.start(spec)
    try:
        assert backend.info(handle).state is VmState.RUNNING
    finally:
        backend.kill(handle)


def test_a_boot_that_takes_too_long_is_abandoned_bounded(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_BOOT_DELAY", "5")
    monkeypatch.setenv("CHDOUBLE_VALIDATE", "0")  # keep the double's own start-up short and steady
    backend = CloudHypervisor(BINARY, start_timeout=15.0, boot_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(HypervisorStartError, match=r"vm\.boot: cloud-hypervisor did not answer within 0\.5s"):
        backend.start(spec)
    assert time.monotonic() - started < 5.0


def test_an_invalid_config_is_refused_with_the_spec_details(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    config = dict(spec.config)
    del config["payload"]
    with pytest.raises(
        HypervisorStartError, match=r"vm\.create: HTTP 400: Failed to deserialize JSON"
    ) as caught:
        backend.start(replace(spec, config=config))
    cause = caught.value.__cause__
    assert isinstance(cause, HypervisorApiError)
    assert not isinstance(cause, InvalidStateError)
    assert any("'payload' is a required property" in d for d in cause.details)


def test_a_config_over_the_api_body_limit_is_refused_before_sending(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    payload = {**spec.config["payload"], "cmdline": "x" * 52000}
    with pytest.raises(
        HypervisorError, match=r"vm\.create: the request body is 5\d{4} bytes, more than the 51200"
    ):
        backend.start(replace(spec, config={**spec.config, "payload": payload}))


def test_a_failed_boot_is_reported_and_cleaned_up(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    config = {**spec.config, "payload": {"kernel": str(spec.vm_dir / "no-kernel")}}
    with pytest.raises(HypervisorStartError, match=r"vm\.boot: HTTP 500: .*Cannot open kernel file"):
        backend.start(replace(spec, config=config))


def test_a_socket_in_use_is_refused_and_the_running_vm_untouched(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    try:
        with pytest.raises(HypervisorStartError, match="already listens on this API socket"):
            backend.start(spec)
        assert backend.info(handle).state is VmState.RUNNING
    finally:
        backend.kill(handle)


def test_wrong_state_is_an_invalid_state_error(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    try:
        with pytest.raises(InvalidStateError) as caught:
            backend.resume(handle)
        assert caught.value.status == 500
        assert caught.value.endpoint == "vm.resume"
        assert "invalid VM state transition: Running to Running" in caught.value.details
        backend.pause(handle)
        with pytest.raises(InvalidStateError, match=r"vm\.pause: HTTP 500: Error from API; The VM could not"):
            backend.pause(handle)
        with (
            ApiClient(handle.api_socket) as api,
            pytest.raises(InvalidStateError, match="VM is already created"),
        ):
            api.put("vm.boot")
        with ApiClient(handle.api_socket) as api, pytest.raises(HypervisorApiError) as unknown:
            api.get("vm.nope")
        assert (unknown.value.status, unknown.value.details) == (404, ("Not Found",))
        assert not isinstance(unknown.value, InvalidStateError)
    finally:
        backend.kill(handle)


def test_get_once_answers_and_fails_as_the_client_does(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None, tmp_path: Path
) -> None:
    """`get_once` (the watchdog's ping and the scrape's counters, one connection each) decodes the answer
    and translates errors, a missing socket and a silent one as ApiClient does."""
    handle = backend.start(spec)
    try:
        assert get_once(handle.api_socket, "vmm.ping", timeout=5)["pid"] == handle.pid
        with ApiClient(handle.api_socket) as client:  # the same devices and counters (their values move)
            once, again = get_once(handle.api_socket, "vm.counters", timeout=5), client.get("vm.counters")
        assert {d: sorted(c) for d, c in once.items()} == {d: sorted(c) for d, c in again.items()}
        assert set(once) == {"store", "eth0"}
        with pytest.raises(HypervisorApiError) as unknown:
            get_once(handle.api_socket, "vm.nope", timeout=5)
        assert (unknown.value.status, unknown.value.details) == (404, ("Not Found",))
    finally:
        backend.kill(handle)
    with pytest.raises(HypervisorError, match=r"vmm\.ping: cannot talk to cloud-hypervisor on .*api\.sock"):
        get_once(spec.api_socket, "vmm.ping", timeout=1)
    silent = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(silent))
        listener.listen(1)
        began = time.monotonic()
        with pytest.raises(HypervisorError, match=r"vmm\.ping: cloud-hypervisor did not answer within 0\.3s"):
            get_once(silent, "vmm.ping", timeout=0.3)
        assert time.monotonic() - began < 2


@pytest.mark.parametrize("release", [45, 46])
def test_plain_text_errors_before_v47_are_understood(
    backend: CloudHypervisor,
    spec: LaunchSpec,
    monkeypatch: pytest.MonkeyPatch,
    release: int,
    clean: None,
) -> None:
    """v40-v46 answer one text, not the JSON chain (vmm/src/api/http/mod.rs error_response): a wrong
    state is still an InvalidStateError, a failed boot still names its cause."""
    monkeypatch.setenv("CHDOUBLE_VERSION", str(release))
    handle = backend.start(spec)
    try:
        with pytest.raises(InvalidStateError) as caught:
            backend.resume(handle)
        assert caught.value.details == (
            ("Error from API: The VM could not resume: " if release == 46 else "")
            + "Cannot resume VM: Failed to resume migratable component: invalid VM state transition: "
            "Running to Running",
        )
    finally:
        backend.kill(handle)
    config = {**spec.config, "payload": {"kernel": str(spec.vm_dir / "no-kernel")}}
    with pytest.raises(
        HypervisorStartError, match=r"vm\.boot: HTTP 500: .*Cannot open kernel file: No such file"
    ):
        backend.start(replace(spec, config=config))


def test_a_volume_another_vm_holds_is_refused_and_cleaned_up(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    """From v46 cloud-hypervisor locks every disk image at boot (vmm/src/vm.rs try_lock_disks): a second VM
    on the same writable volume fails its boot, and the first keeps running."""
    volume = tmp_path / "data.img"
    with volume.open("wb") as f:
        f.truncate(1 << 20)
    disk = {"id": "vol-data", "path": str(volume), "readonly": False, "image_type": "Raw"}
    first = replace(spec, config={**spec.config, "disks": [*spec.config["disks"], disk]})
    other_dir = spec.vm_dir.with_name("other")
    other_dir.mkdir()
    second = replace(first, name="other", vm_dir=other_dir, serial_log=other_dir / "serial.log")
    handle = backend.start(first)
    try:
        with pytest.raises(HypervisorStartError, match=r"Another instance likely holds a lock.*data\.img"):
            backend.start(second)
        assert leftovers(other_dir) == ([], [])
        assert backend.info(handle).state is VmState.RUNNING
    finally:
        backend.kill(handle)
    backend.kill(backend.start(second))  # once the first is gone, the lock is free


def test_ladder_escalates_when_the_guest_ignores_the_power_button(
    backend: CloudHypervisor, spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_FAULT", "ignore-power-button")
    handle = backend.start(spec)
    started = time.monotonic()
    result = backend.shutdown(handle, timeout=0.5)
    assert not result.graceful
    assert result.steps == ("power-button", "vm.shutdown", "vmm.shutdown")
    assert 0.5 <= time.monotonic() - started < 0.5 + 5 * 3.0  # waited for the guest, then bounded
    assert events(spec.vm_dir)[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]


def test_ladder_ends_with_sigkill_when_the_vmm_hangs(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean: None
) -> None:
    monkeypatch.setenv("CHDOUBLE_FAULT", "ignore-power-button,hang-on-shutdown")
    backend = CloudHypervisor(BINARY, start_timeout=15.0, step_timeout=0.5)
    handle = backend.start(spec)
    started = time.monotonic()
    result = backend.shutdown(handle, timeout=0.3)
    elapsed = time.monotonic() - started
    assert not result.graceful
    assert result.steps == ("power-button", "vm.shutdown", "vmm.shutdown", "SIGTERM", "SIGKILL")
    assert elapsed < 0.3 + 5 * 0.5 + 2.0  # every rung bounded
    assert not [r for r in records(tmp_path, "process") if r["what"] == "exit"]  # it never exited on its own


def test_a_process_that_died_on_its_own_is_reported_gone(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)
    process.signal_process(handle.pid, signal.SIGKILL)
    process.wait_gone(handle.pid, handle.start_time, 5.0)
    assert backend.info(handle).state is VmState.GONE
    assert not backend.adopt(handle)
    assert backend.shutdown(handle, timeout=1.0).steps == ("gone",)


def test_handles_survive_a_round_trip_through_the_record(backend: CloudHypervisor, spec: LaunchSpec) -> None:
    handle = backend.start(spec)
    again = Handle(backend=handle.backend, pid=handle.pid, start_time=handle.start_time,
                   api_socket=Path(str(handle.api_socket)), vm_dir=Path(str(handle.vm_dir)))  # fmt: skip
    try:
        assert CloudHypervisor(BINARY).adopt(again)
    finally:
        backend.kill(handle)
    assert leftovers(spec.vm_dir) == ([], [])


# --- the API client and the events reader, in isolation --------------------------------------------


def mock_client(handler: Any) -> ApiClient:
    return ApiClient(Path("/nonexistent/api.sock"), transport=httpx.MockTransport(handler))


def test_api_client_sends_bodyless_puts_without_body_or_content_type() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    with mock_client(handler) as api:
        assert api.put("vm.boot") is None
        assert api.put("vm.create", {"payload": {"kernel": "/k"}}) is None
    boot, create = seen
    assert (boot.method, str(boot.url)) == ("PUT", "http://localhost/api/v1/vm.boot")
    assert boot.content == b""
    assert "content-type" not in boot.headers
    assert boot.headers.get("content-length", "0") == "0"
    assert create.headers["content-type"] == "application/json"
    assert json.loads(create.content) == {"payload": {"kernel": "/k"}}


@pytest.mark.parametrize(
    ("status", "body", "error", "details"),
    [
        (500, b'["Error from API","The VM could not be paused","VM is not running"]', InvalidStateError,
         ("Error from API", "The VM could not be paused", "VM is not running")),
        (404, b'["Error from API","The VM info is not available","VM is not created"]', InvalidStateError,
         ("Error from API", "The VM info is not available", "VM is not created")),
        (500, b'["Error from API","The VM could not boot","Cannot open kernel file"]', HypervisorApiError,
         ("Error from API", "The VM could not boot", "Cannot open kernel file")),
        (404, b'["Not Found"]', HypervisorApiError, ("Not Found",)),
        (400, b"", HypervisorApiError, ()),
        (400, b'{ "error": "Invalid request.\nAll previous unanswered requests will be dropped." }',
         HypervisorApiError, ("Invalid request.\nAll previous unanswered requests will be dropped.",)),
    ],
)  # fmt: skip
def test_api_client_maps_error_answers(
    status: int, body: bytes, error: type[HypervisorApiError], details: tuple[str, ...]
) -> None:
    with mock_client(lambda _: httpx.Response(status, content=body)) as api, pytest.raises(error) as caught:
        api.put("vm.pause")
    assert type(caught.value) is error
    assert (caught.value.endpoint, caught.value.status, caught.value.details) == ("vm.pause", status, details)


def test_api_client_translates_transport_failures() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with mock_client(refuse) as api, pytest.raises(HypervisorError, match=r"vm\.info: cannot talk") as caught:
        api.get("vm.info")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with mock_client(slow) as api, pytest.raises(HypervisorError, match=r"did not answer within 0\.5s"):
        api.get("vm.info", timeout=0.5)
    with (
        mock_client(lambda _: httpx.Response(200, content=b"{oops")) as api,
        pytest.raises(HypervisorError, match="invalid JSON"),
    ):
        api.get("vm.info")


def test_events_reader_returns_new_events_and_waits_for_half_written_ones(tmp_path: Path) -> None:
    path = tmp_path / "events"
    first = json.dumps({"timestamp": {"secs": 0, "nanos": 1}, "source": "vmm", "event": "starting",
                        "properties": None}, indent=2)  # fmt: skip
    path.write_text(first + "\n\n")
    reader = EventReader(path)
    assert reader.read() == []  # what was there before the reader is skipped
    second = json.dumps({"timestamp": {"secs": 1, "nanos": 2}, "source": "vm", "event": "shutdown",
                         "properties": {"id": "x"}}, indent=2)  # fmt: skip
    with path.open("a") as f:
        f.write(second[:20])
        f.flush()
        assert reader.read() == []
        f.write(second[20:] + "\n\n")
    assert [(e["source"], e["event"], e["properties"]) for e in reader.read()] == [
        ("vm", "shutdown", {"id": "x"})
    ]
    assert reader.read() == []
    path.write_text(first + "\n\n")  # truncated and rewritten: a new process
    assert [e["event"] for e in reader.read()] == ["starting"]
    assert EventReader(tmp_path / "missing").read() == []


# --- releases: the backend against the double acting as v40, v48 and v53 ------------------------------


@pytest.mark.parametrize("release", [40, 48, 51, 53])
def test_every_supported_release_boots_serves_the_console_and_stops(  # noqa: PLR0917 - fixtures
    backend: CloudHypervisor,
    spec: LaunchSpec,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    release: int,
    clean: None,
) -> None:
    monkeypatch.setenv("CHDOUBLE_VERSION", str(release))
    config = {
        **spec.config,
        "disks": [{**d, "image_type": "Raw"} for d in spec.config["disks"]],
        "console": {"mode": "Pty"},
    }
    spec = replace(spec, config=config)
    handle = backend.start(spec)
    assert backend.version().major == release
    assert backend.info(handle).state is VmState.RUNNING
    pty = backend.console_path(handle)
    assert pty.is_char_device()
    assert str(pty).startswith("/dev/pts/")

    result = backend.shutdown(handle, timeout=5.0)
    assert result.graceful
    assert result.steps[0] == "power-button"
    (start,) = [r for r in records(tmp_path, "process") if r["what"] == "start"]
    # --no-shutdown exists from v52 (cloud-hypervisor/src/main.rs); before, clap exits 2 on it
    assert ("--no-shutdown" in start["argv"]) is (release >= 52)
    (exit_,) = [r for r in records(tmp_path, "process") if r["what"] == "exit"]
    assert exit_["code"] == 0
    assert "Disabling sector 0 writes" not in spec.hypervisor_log.read_text()
    assert "DEPRECATION" not in spec.hypervisor_log.read_text()


def test_an_old_release_refuses_no_shutdown_as_clap_does() -> None:
    result = process.run(
        [str(BINARY), "--no-shutdown"], check=False, env={"CHDOUBLE_VERSION": "51"}, timeout=30
    )
    assert result.returncode == 2
    assert "unexpected argument '--no-shutdown'" in result.stderr


def test_the_version_is_asked_once_per_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "cloud-hypervisor"
    calls = tmp_path / "calls"
    binary.write_text(f'#!/bin/sh\necho x >> {calls}\necho "cloud-hypervisor v48.0.0-dirty"\n')
    binary.chmod(0o755)
    assert cloud_hypervisor.binary_version(binary) == cloud_hypervisor.Version(48, 0)
    assert cloud_hypervisor.binary_version(binary) == cloud_hypervisor.Version(48, 0)
    assert calls.read_text() == "x\n"
    binary.write_text(f'#!/bin/sh\necho x >> {calls}\necho "cloud-hypervisor v39.0"\n')  # replaced
    with pytest.raises(HypervisorStartError, match=r"v39\.0; Procurator supports v40\.0 to v53\.0"):
        cloud_hypervisor.binary_version(binary)


def test_a_console_socket_is_refused_as_cloud_hypervisor_refuses_it(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    config = {**spec.config, "console": {"mode": "Socket", "socket": str(spec.vm_dir / "console.sock")}}
    with pytest.raises(HypervisorStartError, match="No socket option support for console device"):
        backend.start(replace(spec, config=config))


def test_a_disk_without_image_type_loses_sector_0_from_v51(
    backend: CloudHypervisor, spec: LaunchSpec, clean: None
) -> None:
    handle = backend.start(spec)  # sample_config's disk has no image_type
    backend.kill(handle)
    logged = spec.hypervisor_log.read_text()
    assert "Autodetected raw image type. Disabling sector 0 writes." in logged
    assert "DEPRECATION: auto-detection of disk image type is deprecated" in logged  # v52+, the default v53


@pytest.mark.parametrize("release", [40, 52, 53])
def test_the_keeper_is_awaited_before_vm_boot_below_v53_and_after_it_from_v53(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, release: int, clean: None
) -> None:
    """Before v53 the serial device drops what the guest writes with no client connected, so the guest
    boots only once the keeper is; from v53 the device keeps it for the first client (serial_manager.rs'
    buffer, which the double models), the keeper is awaited after vm.boot, and the guest's first line
    still reaches serial.log."""
    monkeypatch.setenv("CHDOUBLE_VERSION", str(release))
    backend = CloudHypervisor(BINARY, start_timeout=15.0, step_timeout=3.0)
    sequence: list[str] = []
    real_step, real_connected = backend._start_step, backend._keepers.connected

    def step(*args: Any, **kwargs: Any) -> None:
        sequence.append(args[3])
        real_step(*args, **kwargs)

    def connected(*args: Any, **kwargs: Any) -> None:
        real_connected(*args, **kwargs)
        sequence.append("keeper connected")

    monkeypatch.setattr(backend, "_start_step", step)
    monkeypatch.setattr(backend._keepers, "connected", connected)
    handle = backend.start(spec)
    try:
        if release < 53:
            assert sequence == ["vm.create", "keeper connected", "vm.boot"]
        else:
            assert sequence == ["vm.create", "vm.boot", "keeper connected"]
            waits.wait_until(
                lambda: "Linux version chdouble: booting" in spec.serial_log.read_text(),
                10,
                "the guest's first line, replayed to the keeper, in the serial log",
                poll=0.02,
                last=spec.serial_log.read_text,
            )
    finally:
        backend.kill(handle)


@pytest.mark.parametrize("release", [40, 53])
def test_the_serial_log_survives_guest_resets_and_is_bounded(
    spec: LaunchSpec, monkeypatch: pytest.MonkeyPatch, release: int, clean: None
) -> None:
    """cloud-hypervisor empties a File serial at every reboot (vm_reboot -> pre_create_console_devices);
    through the serial keeper the panic before a reset stays in serial.log, and the log is bounded."""
    monkeypatch.setenv("CHDOUBLE_VERSION", str(release))
    # a reset every 0.4 s: the log rotates after about four, and the next rotation (which would drop the
    # first boot) comes a second or more later, time enough for this loop even on a loaded machine
    monkeypatch.setenv("CHDOUBLE_GUEST_RESET", "0.4")
    # under Landlock from v41 (the double's VMM thread is landlocked for real): the VMM re-creates its
    # serial socket in the directory granted to it
    backend = CloudHypervisor(BINARY, start_timeout=15.0, step_timeout=3.0, serial_max_bytes=600)
    handle = backend.start(spec)
    logs = (spec.serial_log, spec.serial_log.with_name("serial.log.1"))

    def kept() -> str:
        return "".join(p.read_text() for p in reversed(logs) if p.exists())

    deadline = time.monotonic() + 20
    while not logs[1].exists():  # each reset cycle writes ~140 bytes: rotated after about four
        assert time.monotonic() < deadline, kept()
        time.sleep(0.02)
    backend.kill(handle)
    text = kept()
    # What the guest wrote before each reset is still there, before the keeper's marker of that reset
    # (the first boot's own lines may be rotated out by now: how many resets came before the loop saw the
    # rotation depends on the machine's load, and the two files hold only the newest 1200 bytes)
    first_panic = text.index("Kernel panic - not syncing: chdouble guest reset")
    assert text.index("-- procurator: serial port re-created (guest reset) --") > first_panic
    assert text.count("Kernel panic") >= 2
    assert all(p.stat().st_size <= 600 for p in logs)


# --- snapshot and restore (vm.snapshot, vm.restore) ------------------------------------------------
# The bodies are checked against our schema of the API, and the official spec's when one is found; the
# release rules (`memory_restore_mode` and `resume` from v52), the states the calls need, their failures.

SNAPSHOT_SCHEMAS = {"vm.snapshot": "VmSnapshotConfig", "vm.restore": "RestoreConfig"}


def sent(tmp_path: Path, pid: int) -> list[tuple[str, dict[str, object] | None]]:
    """(endpoint, body) of every PUT the process `pid` answered, in the order received (each handler
    thread records once it has answered, so the file's order may differ)."""
    answered = sorted(records(tmp_path, "request"), key=lambda r: r["t_recv"])
    return [
        (r["path"].removeprefix("/api/v1/"), None if r["body"] is None else json.loads(r["body"]))
        for r in answered
        if r["pid"] == pid and r["method"] == "PUT"
    ]


@pytest.mark.parametrize("release", [40, 46, 51, 52, 53])
def test_snapshot_then_restore_in_a_fresh_process(  # noqa: PLR0917 - fixtures
    backend: CloudHypervisor,
    spec: LaunchSpec,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    release: int,
    clean: None,
) -> None:
    monkeypatch.setenv("CHDOUBLE_VERSION", str(release))
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    first = backend.start(spec)
    backend.pause(first)
    backend.snapshot(first, target)
    assert backend.info(first).state is VmState.PAUSED  # it stays paused
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "memory-ranges", "state.json"]
    saved = json.loads((target / "config.json").read_text())
    assert saved["serial"] == {"mode": "Socket", "socket": str(spec.vm_dir / "serial" / "serial.sock")}
    assert (target / "memory-ranges").stat().st_size == spec.config["memory"]["size"]
    backend.kill(first)

    second = backend.restore(spec, target, paused=False)
    assert second.pid != first.pid
    assert backend.info(second).state is VmState.RUNNING
    assert ("vm", "restored") in events(spec.vm_dir)
    restore_body: dict[str, object] = {"source_url": f"file://{target}"}
    if release >= 52:
        restore_body["memory_restore_mode"] = "Copy"
    if release >= 53:
        restore_body["resume"] = True
    assert [e for e, _ in sent(tmp_path, first.pid)] == ["vm.create", "vm.boot", "vm.pause", "vm.snapshot"]
    assert sent(tmp_path, first.pid)[-1][1] == {"destination_url": f"file://{target}"}
    puts = sent(tmp_path, second.pid)
    assert puts == [("vm.restore", restore_body), *([] if release >= 53 else [("vm.resume", None)])]
    for endpoint, body in [*sent(tmp_path, first.pid), *puts]:
        if endpoint in SNAPSHOT_SCHEMAS:
            assert chspec.errors(SNAPSHOT_SCHEMAS[endpoint], body) == []
            assert chspec.full_body_errors(SNAPSHOT_SCHEMAS[endpoint], body) == []
    assert backend.shutdown(second, timeout=5.0).graceful


def test_restore_paused_leaves_the_guest_paused(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    first = backend.start(spec)
    backend.pause(first)
    backend.snapshot(first, target)
    backend.kill(first)
    second = backend.restore(spec, target, paused=True)
    try:
        assert backend.info(second).state is VmState.PAUSED
        assert [e for e, _ in sent(tmp_path, second.pid)] == ["vm.restore"]
        assert "resume" not in (sent(tmp_path, second.pid)[0][1] or {})
    finally:
        backend.kill(second)


def test_a_running_vm_is_not_snapshotted(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    """`Vm::snapshot` (vmm/src/vm.rs) refuses a VM that is not paused, after its `snapshotting` event."""
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    handle = backend.start(spec)
    try:
        with pytest.raises(HypervisorApiError) as refused:
            backend.snapshot(handle, target)
        assert refused.value.details[-3:] == (
            "Cannot snapshot VM",
            "Failed to snapshot migratable component",
            "Trying to snapshot while VM is running",
        )
        assert list(target.iterdir()) == []
        assert backend.info(handle).state is VmState.RUNNING
    finally:
        backend.kill(handle)


def test_a_snapshot_into_a_used_directory_is_refused(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    """`Vm::send` creates config.json `create_new`: an older snapshot there is never overwritten."""
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    handle = backend.start(spec)
    try:
        backend.pause(handle)
        with pytest.raises(HypervisorApiError) as refused:
            backend.snapshot(handle, target)
        assert refused.value.details[-4:] == (
            "Cannot send VM snapshot",
            "Failed to send migratable component snapshot",
            "Error creating VM config snapshot file",
            "File exists (os error 17)",
        )
        assert (target / "config.json").read_text() == "{}"
    finally:
        backend.kill(handle)


def test_a_restore_from_a_directory_without_snapshot_leaves_nothing(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        HypervisorStartError, match=r"config.json is missing; this is no cloud-hypervisor snapshot"
    ):
        backend.restore(spec, empty, paused=False)
    (empty / "config.json").write_text(json.dumps(spec.config))  # a config but no state.json
    with pytest.raises(HypervisorStartError, match=r"Error opening VM state snapshot file .*state\.json"):
        backend.restore(spec, empty, paused=False)


def test_a_restore_while_the_source_still_holds_its_volume_is_refused(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    """From v46 `Vm::restore` takes the disk locks again (vmm/src/vm.rs): a restore beside the VM it was
    taken of, still running on the same writable volume, fails and leaves that VM running."""
    volume = tmp_path / "data.img"
    with volume.open("wb") as f:
        f.truncate(1 << 20)
    disk = {"id": "vol-data", "path": str(volume), "readonly": False, "image_type": "Raw"}
    source = replace(spec, config={**spec.config, "disks": [*spec.config["disks"], disk]})
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    other_dir = spec.vm_dir.with_name("other")
    other_dir.mkdir()
    handle = backend.start(source)
    try:
        backend.pause(handle)
        backend.snapshot(handle, target)
        backend.resume(handle)
        copy = replace(source, name="other", vm_dir=other_dir, serial_log=other_dir / "serial.log")
        with pytest.raises(HypervisorStartError, match=r"Another instance likely holds a lock.*data\.img"):
            backend.restore(copy, target, paused=False)
        assert leftovers(other_dir) == ([], [])
        assert backend.info(handle).state is VmState.RUNNING
    finally:
        backend.kill(handle)


def test_a_restore_on_a_vmm_that_has_a_vm_is_refused(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    """`vm_restore` (vmm/src/lib.rs) needs a VMM without a VM: the real restore runs on a fresh process."""
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    handle = backend.start(spec)
    try:
        backend.pause(handle)
        backend.snapshot(handle, target)
        with backend._api(handle) as api, pytest.raises(HypervisorApiError) as refused:
            api.put("vm.restore", {"source_url": f"file://{target}"})
        assert refused.value.details[-2:] == ("The VM could not be restored", "VM is already created")
    finally:
        backend.kill(handle)


def test_a_snapshot_with_passed_in_net_fds_needs_them_again(
    backend: CloudHypervisor, spec: LaunchSpec, tmp_path: Path, clean: None
) -> None:
    """Descriptors passed to the old process are gone after it: a restore that has none to hand again
    (`net_fds`, tests/integration/test_vm_users.py has one that does) is refused before any process runs."""
    target = spec.writable[0] / "snap"  # where the VM's snapshots go (granted to it under Landlock)
    target.mkdir(parents=True)
    config = {**spec.config, "net": [{"id": "eth0", "fds": [3]}]}
    (target / "config.json").write_text(json.dumps(config))
    handed = r"net\[0\] \(eth0\) was handed its TAP as 1 descriptors, and this restore has 0"
    with pytest.raises(HypervisorStartError, match=handed):
        backend.restore(spec, target, paused=False)
