"""Real guests through the qemu backend, under TCG: the example bundle `web` (examples/minimal.nix) boots
with a volume and a TAP inside a throwaway network namespace, serves HTTP, powers off on the ACPI power
button, and leaves nothing behind. One full boot; the other tests stop the VM before its kernel runs.
Needs root (network namespaces), nix and QEMU, as scripts/setup.sh provides."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from procurator import process
from procurator.errors import ConflictError, HypervisorStartError, WaitTimeoutError
from procurator.hypervisor.base import Handle, LaunchSpec, VmState
from procurator.hypervisor.qemu import Qemu

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 120.0  # TCG on a slow, busy CI machine; a boot takes about 5 s here
UP_MARKER = "procurator-guest: web up"


@dataclass(frozen=True)
class Netns:
    name: str
    tap: str
    host_ip: str
    guest_ip: str


@pytest.fixture(scope="session")
def web_bundle() -> Path:
    built = process.run(["nix-build", str(REPO / "examples" / "minimal.nix"), "-A", "web", "--no-out-link"])
    bundle = Path(built.stdout.strip().splitlines()[-1])
    assert (bundle / "vm-config.json").is_file(), f"{bundle} has no vm-config.json"
    return bundle


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A network namespace of our own holding one TAP with the host side's address; deleted at the end."""
    ns = Netns(
        name=f"procurator-e2e-{os.getpid()}", tap="pq-web-eth0", host_ip="10.213.0.1", guest_ip="10.213.0.2"
    )
    process.run(["ip", "netns", "add", ns.name])
    try:
        process.run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        process.run(["ip", "-n", ns.name, "tuntap", "add", "dev", ns.tap, "mode", "tap"])
        process.run(["ip", "-n", ns.name, "addr", "add", f"{ns.host_ip}/24", "dev", ns.tap])
        process.run(["ip", "-n", ns.name, "link", "set", ns.tap, "up"])
        yield ns
    finally:
        process.run(["ip", "netns", "delete", ns.name], check=False)


def runtime_config(bundle: Path, vm_dir: Path, **changes: Any) -> dict[str, Any]:
    """The bundle's VmConfig with the host's fields filled in, as Procurator does at start-up."""
    config: dict[str, Any] = json.loads((bundle / "vm-config.json").read_text())
    config["serial"] = {"mode": "File", "file": str(vm_dir / "serial.log")}
    config["net"] = []
    config.update(changes)
    return config


def launch_spec(vm_dir: Path, config: dict[str, Any], netns: str | None = None) -> LaunchSpec:
    return LaunchSpec(name="web", vm_dir=vm_dir, config=config, serial_log=vm_dir / "serial.log", netns=netns)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll `check` until it holds, at most `timeout` seconds on the monotonic clock."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise WaitTimeoutError(what, timeout)
        time.sleep(0.05)


def serial(spec: LaunchSpec) -> str:
    return spec.serial_log.read_text(errors="replace") if spec.serial_log.exists() else ""


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (a VM directory is in every argv of its qemu)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_nothing_left(qemu: Qemu, handle: Handle) -> None:
    assert not process.alive(handle.pid, handle.start_time)
    assert not handle.api_socket.exists()
    assert processes_mentioning(str(handle.vm_dir)) == []
    assert qemu.info(handle).state == VmState.GONE
    assert not qemu.adopt(handle)


def test_the_web_bundle_boots_serves_and_powers_off_gracefully(
    web_bundle: Path, netns: Netns, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    vm_dir = tmp_path / "vms" / "web"
    volume = tmp_path / "volumes" / "web" / "data.img"
    volume.parent.mkdir(parents=True)
    with volume.open("wb") as image:
        image.truncate(64 * 1024 * 1024)
    process.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(volume)])
    config = runtime_config(
        web_bundle,
        vm_dir,
        disks=[{"id": "data", "path": str(volume), "readonly": False}],
        net=[{"id": "eth0", "tap": netns.tap, "mac": "52:54:00:12:34:56"}],
    )
    config["payload"]["cmdline"] += f" procurator.ip={netns.guest_ip}/24 procurator.gw={netns.host_ip}"
    spec = launch_spec(vm_dir, config, netns=netns.name)
    qemu = Qemu(accel="tcg")

    began = time.monotonic()
    handle = qemu.start(spec)
    try:
        assert qemu.info(handle).state == VmState.RUNNING
        wait_for(f"{UP_MARKER!r} on the serial console", lambda: UP_MARKER in serial(spec), BOOT_TIMEOUT)
        boot = time.monotonic() - began
        log = serial(spec)
        assert f"{UP_MARKER} ip={netns.guest_ip}" in log
        assert "volume data mounted at /mnt/data" in log

        curl = ["curl", "-sf", "--max-time", "5", f"http://{netns.guest_ip}/health"]
        health = process.run(["ip", "netns", "exec", netns.name, *curl], timeout=15)
        assert health.stdout.strip() == "ok"

        counters = qemu.counters(handle)
        assert counters["data"]["read_bytes"] > 0
        assert counters["eth0"]["rx_frames"] > 0  # the HTTP request reached the guest
        assert counters["eth0"]["tx_frames"] > 0  # and its answer came back
        assert qemu.adopt(handle)

        stopping = time.monotonic()
        result = qemu.shutdown(handle, timeout=30.0)
        stop = time.monotonic() - stopping
    finally:
        qemu.kill(handle)
    record_property("boot_to_marker_seconds", round(boot, 2))
    record_property("graceful_stop_seconds", round(stop, 2))
    print(f"boot to {UP_MARKER!r}: {boot:.2f}s, graceful stop: {stop:.2f}s")

    assert result.graceful, result
    assert result.steps == ("power-button",)
    assert "procurator-guest: power button" in serial(spec)  # the guest saw the button itself
    assert_nothing_left(qemu, handle)


def test_a_failed_start_quotes_the_log_and_leaves_nothing(
    web_bundle: Path, netns: Netns, tmp_path: Path
) -> None:
    vm_dir = tmp_path / "vms" / "web"
    config = runtime_config(web_bundle, vm_dir)
    config["payload"]["kernel"] = str(tmp_path / "no-such-kernel")
    spec = launch_spec(vm_dir, config)
    with pytest.raises(HypervisorStartError) as caught:
        Qemu(accel="tcg").start(spec)
    message = str(caught.value)
    assert message.startswith("web: qemu exited with status 1 while starting: ")
    assert "no-such-kernel" in message  # QEMU's own complaint, from hypervisor.log
    assert not spec.api_socket.exists()
    assert processes_mentioning(str(vm_dir)) == []

    # A missing TAP is refused before QEMU runs (as root it would create one, attached to nothing).
    config = runtime_config(web_bundle, vm_dir, net=[{"id": "eth0", "tap": "pq-missing0"}])
    with pytest.raises(
        HypervisorStartError, match=f"TAP pq-missing0 does not exist in network namespace {netns.name}"
    ):
        Qemu(accel="tcg").start(launch_spec(vm_dir, config, netns=netns.name))
    links = process.run(["ip", "-n", netns.name, "-o", "link", "show"]).stdout
    assert "pq-missing0" not in links
    assert processes_mentioning(str(vm_dir)) == []


def test_adopt_conflict_the_hard_end_of_the_ladder_and_kill(web_bundle: Path, tmp_path: Path) -> None:
    vm_dir = tmp_path / "vms" / "web"
    spec = launch_spec(vm_dir, runtime_config(web_bundle, vm_dir))
    qemu = Qemu(accel="tcg", step_timeout=10.0)

    handle = qemu.start(spec)
    try:
        assert Qemu(accel="tcg").adopt(handle)  # a fresh instance, as after a daemon restart
        impostor = Handle(handle.backend, handle.pid, handle.start_time + 1, handle.api_socket, handle.vm_dir)
        assert not qemu.adopt(impostor)
        assert qemu.info(impostor).state == VmState.GONE
        with pytest.raises(ConflictError, match="served by a running process"):
            qemu.start(spec)
        assert qemu.info(handle).state == VmState.RUNNING
        # The kernel has not even started: nothing answers the power button, so the ladder goes on.
        result = qemu.shutdown(handle, timeout=0.2)
    finally:
        qemu.kill(handle)
    assert not result.graceful
    assert result.steps == ("power-button", "quit")
    assert_nothing_left(qemu, handle)
    assert qemu.shutdown(handle, timeout=1.0).steps == ("gone",)

    handle = qemu.start(spec)
    qemu.kill(handle)
    assert_nothing_left(qemu, handle)
