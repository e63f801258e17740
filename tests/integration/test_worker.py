"""`procurator worker`: the daemon as a subprocess (inside the throwaway host's network namespace), driven
through its API on a UNIX socket, with the cloud-hypervisor double and real Nix builds of
examples/minimal.nix. Applies, supervision (restart after kill -9, crash loop), kill -9 of the daemon
itself (mid-apply) and adoption, SIGTERM, and /metrics over the socket and over TCP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from procurator import process
from procurator.errors import WorkerApiError, WorkerUnavailableError
from procurator.hypervisor.api import ApiClient
from procurator.lifecycle import WaitFor
from procurator.worker.client import WorkerClient
from tests.integration.conftest import ExampleBuild, NixBuild
from tests.support.cli import PROCURATOR
from tests.support.host import REPO, VmHost
from tests.unit.test_metrics import parse_exposition

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
METRICS_PORT = 9477
T = TypeVar("T")

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0, poll: float = 0.1) -> T:
    """Poll `check` until it returns something other than None/False; bounded, says what it waited for."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last is not None and last is not False:
            return last
        time.sleep(poll)
    last = check()
    if last is not None and last is not False:
        return last
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class Daemon:
    host: VmHost
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def client(self, timeout: float = 60.0) -> WorkerClient:
        return WorkerClient(self.socket, timeout=timeout)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            return client.status()

    def vms(self) -> dict[str, dict[str, Any]]:
        return {vm["name"]: vm for vm in self.status()["vms"]}

    def apply(self, deployment: Path) -> dict[str, Any]:
        with self.client(timeout=120) as client:
            report: dict[str, Any] = client.apply(deployment, wait=WaitFor.BOOTED)
        return report

    def metrics(self) -> str:
        with self.client() as client:
            return client.metrics()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_daemon(vm_host: VmHost) -> Iterator[Callable[..., Daemon]]:
    """Start `procurator worker` inside the host's namespace; kills what is left of it at the end."""
    vm_host.ns.ip("link", "set", "lo", "up")  # for the TCP metrics listener
    started: list[Daemon] = []

    def start(*args: str, **env: str) -> Daemon:
        api = vm_host.root / "api.sock"
        log = vm_host.root / f"worker-{len(started)}.log"
        argv = ["ip", "netns", "exec", vm_host.ns.name, str(PROCURATOR), "worker", "--api-socket", str(api),
                "--poll", "0.2", "--wait", "booted", *args]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=vm_host.env(**env), stdout=out, stderr=subprocess.STDOUT)
        daemon = Daemon(vm_host, proc, api, log)
        started.append(daemon)

        def answering() -> bool:
            assert proc.poll() is None, f"the worker exited {proc.returncode}:\n{daemon.output()}"
            try:
                daemon.status()
            except (WorkerUnavailableError, WorkerApiError):
                return False
            return True

        wait_for("the worker's API", answering)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def release2(nix_build_example: NixBuild) -> ExampleBuild:
    web, api, deployment = nix_build_example(
        "web",
        "api",
        "deployment",
        args=["--arg", "overrides", '{ web = { cmdline = "procurator.release=2"; }; }'],
    )
    return ExampleBuild(web=web, api=api, deployment=deployment)


def record(host: VmHost, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((host.state / "vms" / name / "record.json").read_text())
    return data


def assert_converged(host: VmHost, bundles: dict[str, Path]) -> None:
    """Exactly these VMs run these bundles, each with one live hypervisor and one TAP; nothing else."""
    vms = host.ps()
    assert {n: (v["state"], v["bundle"]) for n, v in vms.items()} == {
        n: ("running", str(p)) for n, p in bundles.items()
    }
    hypervisors = [p for p in host.processes() if "cloud-hypervisor" in p]
    assert len(hypervisors) == len(bundles), hypervisors
    keepers = host.keepers()  # one serial keeper per cloud-hypervisor VM
    assert sorted(k.split("--log ")[1].split("/")[-2] for k in keepers) == sorted(bundles), keepers
    assert len(host.taps()) == len(bundles), host.taps()
    assert sorted(p.name for p in (host.state / "vms").iterdir()) == sorted(bundles)
    sockets = sorted(p.relative_to(host.state).as_posix() for p in host.state.rglob("*.sock"))
    assert sockets == sorted(f"vms/{n}/{s}" for n in bundles for s in ("api.sock", "serial/serial.sock"))


def kill9(pid: int) -> int:
    start = process.process_start_time(pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(f"pid {pid} to die", lambda: not process.alive(pid, start))
    return pid


def restarted(daemon: Daemon, name: str, old_pid: int, restarts: int) -> dict[str, Any] | None:
    vm = daemon.vms().get(name)
    if vm and vm["state"] == "running" and vm["pid"] != old_pid and vm["restarts"] == restarts:
        return vm
    return None


def scrape_tcp(host: VmHost) -> str:
    """GET /metrics from the TCP listener, over a socket made inside the namespace."""
    sock = host.ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", METRICS_PORT))
    conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=10)
    conn.sock = sock
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        return response.read().decode()
    finally:
        conn.close()


# --- tests -------------------------------------------------------------------------------------------


def test_apply_restart_crash_loop_metrics_and_sigterm(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon("--interval", "2", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}")
    status = daemon.status()
    assert status["vms"] == []
    assert status["worker"]["deployment"] is None
    assert status["worker"]["pid"] == daemon.proc.pid

    report = daemon.apply(example_build.deployment)
    assert report["success"], report
    assert report["trigger"] == "api"
    assert {a["name"]: (a["kind"], a["outcome"]) for a in report["result"]["actions"]} == {
        "api": ("create", "ok"),
        "web": ("create", "ok"),
    }
    assert_converged(vm_host, example_build.bundles)
    status = daemon.status()
    assert status["worker"]["deployment"]["path"] == str(example_build.deployment)
    assert status["worker"]["last_apply"]["success"] is True
    fields = {
        "name",
        "state",
        "generation",
        "bundle",
        "backend",
        "ip",
        "service_ip",
        "taps",
        "pid",
        "uptime",
        "restarts",
        "last_exit",
        "resources",
    }
    assert set(status["vms"][0]) == fields  # lifecycle.VmStatus.to_json, as `procurator ps --json`
    # This daemon runs under `ip netns exec`, which mounts a fresh sysfs without /sys/fs/cgroup: it finds
    # no hierarchy, and in cgroups.mode auto runs the VMs without groups, so no usage is shown.
    # (tests/e2e/test_resources.py has the groups, started from the host's mount namespace.)
    assert [vm["resources"] for vm in status["vms"]] == [None, None]
    with daemon.client() as client:
        generations = client.history()["generations"]
    assert [(g["number"], g["deployment"], g["current"]) for g in generations] == [
        (1, str(example_build.deployment), True)
    ]

    # /metrics, over the socket and over TCP, parses and has the per-VM series.
    for text in (daemon.metrics(), scrape_tcp(vm_host)):
        parsed = parse_exposition(text)
        for vm in ("web", "api"):
            assert parsed.one("procurator_vm_up", vm=vm, backend="cloud-hypervisor") == 1
            assert parsed.one("procurator_vm_restarts_total", vm=vm) == 0
            assert parsed.one("procurator_vm_uptime_seconds", vm=vm) >= 0
            assert parsed.one("procurator_vm_memory_rss_bytes", vm=vm) > 0
            assert parsed.one("procurator_vm_cpu_seconds_total", vm=vm) > 0
            assert parsed.one("procurator_vm_network_receive_bytes_total", vm=vm, device="eth0") >= 0
        assert parsed.one("procurator_vm_block_written_bytes_total", vm="web", device="vol-data") >= 0
        assert parsed.one("procurator_reconcile_total", trigger="api", result="success") == 1
        assert parsed.one("procurator_last_apply_success") == 1
        assert parsed.one("procurator_last_apply_timestamp_seconds") > 1.7e9
        assert parsed.one("procurator_reconcile_duration_seconds_count") >= 1

    # kill -9 web's hypervisor: restarted after its backoff (1 s), restarts 1, same generation.
    web = daemon.vms()["web"]
    killed_at = time.time()
    kill9(web["pid"])
    again = wait_for("web to be restarted", lambda: restarted(daemon, "web", web["pid"], 1))
    assert again["bundle"] == web["bundle"]
    assert record(vm_host, "web")["started_at"] - killed_at >= 1.0  # not before the backoff
    assert record(vm_host, "web")["last_exit"] == "hypervisor killed by SIGKILL"
    assert_converged(vm_host, example_build.bundles)

    # api (on-failure, maxRestarts 3): three restarts with growing backoff, then the crash loop is given up.
    pid = daemon.vms()["api"]["pid"]
    for n in (1, 2, 3):
        old = kill9(pid)

        def api_restarted(n: int = n, old: int = old) -> dict[str, Any] | None:
            return restarted(daemon, "api", old, n)

        pid = wait_for(f"api restart {n}", api_restarted, timeout=40)["pid"]
    kill9(pid)
    api = wait_for(
        "api to be given up",
        lambda: daemon.vms()["api"] if daemon.vms()["api"]["state"] == "failed" else None,
    )
    assert api["pid"] is None
    assert "crash loop: 3 restarts" in record(vm_host, "api")["last_exit"]
    assert vm_host.ps()["api"]["state"] == "failed"  # the CLI sees it too: the daemon holds no lock
    # Timer reconciles (every 2 s) neither restart a failed VM nor undo `procurator stop`.
    vm_host.ok("stop", "web")
    time.sleep(5)
    vms = daemon.vms()
    assert (vms["api"]["state"], vms["web"]["state"]) == ("failed", "stopped")
    parsed = parse_exposition(daemon.metrics())
    assert parsed.one("procurator_vm_state", vm="api", state="failed") == 1
    assert parsed.one("procurator_vm_up", vm="api") == 0
    assert parsed.one("procurator_vm_restarts_total", vm="api") == 3
    assert parsed.one("procurator_worker_restarts_total") == 4
    # `procurator start` takes a failed VM back; the daemon supervises it again.
    vm_host.ok("start", "api", "web")
    assert {v["state"] for v in daemon.vms().values()} == {"running"}

    # SIGTERM: the daemon exits 0 and leaves the VMs running.
    before = {n: v["pid"] for n, v in daemon.vms().items()}
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0, daemon.output()
    assert not daemon.socket.exists()
    assert {n: v["pid"] for n, v in vm_host.ps().items()} == before
    assert_converged(vm_host, example_build.bundles)
    assert "stopped; VMs keep running" in daemon.output()


def test_kill_9_mid_apply_then_restart_adopts_and_converges(
    vm_host: VmHost, example_build: ExampleBuild, release2: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    slow = {"CHDOUBLE_BOOT_DELAY": "1.5"}  # each vm.boot takes 1.5 s: time to be killed in the middle
    daemon = start_daemon(**slow)
    assert daemon.apply(example_build.deployment)["success"]
    first = {n: v["pid"] for n, v in vm_host.ps().items()}
    old_web = record(vm_host, "web")

    # Replace web (release 2) and kill the daemon while the new web is booting: its record is not written.
    outcome: list[BaseException | dict[str, Any]] = []

    def apply_release2() -> None:
        try:
            outcome.append(daemon.apply(release2.deployment))
        except WorkerUnavailableError as exc:
            outcome.append(exc)

    applying = threading.Thread(target=apply_release2)
    applying.start()

    def new_web_booting() -> bool:
        found = [p for p in vm_host.processes() if "vms/web/" in p and "cloud-hypervisor" in p]
        path = vm_host.state / "vms" / "web" / "record.json"
        return bool(found) and not path.exists() and not process.alive(old_web["pid"], old_web["start_time"])

    wait_for("the new web generation to be booting", new_web_booting, poll=0.02)
    kill9(daemon.proc.pid)
    applying.join(timeout=30)
    assert not applying.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], WorkerUnavailableError)  # the connection died with the daemon
    orphans = [p for p in vm_host.processes() if "vms/web/" in p]
    assert len(orphans) == 1, orphans  # the half-started hypervisor outlived its daemon
    assert process.alive(first["api"], record(vm_host, "api")["start_time"])  # kill -9 stopped no VM

    # A new daemon sweeps the orphan, adopts api (same pid) and converges to the profile: the last
    # deployment that applied successfully (the interrupted one was never recorded).
    daemon = start_daemon(**slow)
    wait_for("the start reconcile", lambda: daemon.status()["worker"]["last_apply"])
    status = daemon.status()
    assert status["worker"]["last_apply"]["trigger"] == "start"
    assert status["worker"]["last_apply"]["success"] is True
    assert status["worker"]["deployment"]["path"] == str(example_build.deployment)
    assert_converged(vm_host, example_build.bundles)
    assert vm_host.ps()["api"]["pid"] == first["api"]
    assert "sweep: killed pid" in daemon.output()
    assert "adopted 1 running VM(s): api" in daemon.output()

    # Asked again, it converges to release 2; api keeps its process throughout.
    with daemon.client() as client:
        plan = client.plan(release2.deployment)
    assert {a["name"]: a["kind"] for a in plan["actions"]} == {"api": "keep", "web": "replace"}
    assert daemon.apply(release2.deployment)["success"]
    assert_converged(vm_host, release2.bundles)
    assert vm_host.ps()["api"]["pid"] == first["api"]

    # And once more a plain kill -9 of an idle daemon: the next one adopts both, restarting nothing.
    pids = {n: v["pid"] for n, v in vm_host.ps().items()}
    kill9(daemon.proc.pid)
    daemon = start_daemon()
    wait_for("adoption", lambda: "adopted" in daemon.output())
    assert "adopted 2 running VM(s): api, web" in daemon.output()
    assert {n: v["pid"] for n, v in daemon.vms().items()} == pids
    assert daemon.status()["worker"]["last_apply"] is None  # nothing to do: no reconcile ran
    assert_converged(vm_host, release2.bundles)


def test_ready_is_notified_after_the_socket_is_bound_and_the_vms_adopted(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    assert daemon.apply(example_build.deployment)["success"]
    kill9(daemon.proc.pid)
    notify_path = vm_host.root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:  # what systemd listens on
        systemd.bind(str(notify_path))
        systemd.settimeout(30)
        daemon = start_daemon(NOTIFY_SOCKET=str(notify_path))
        ready = systemd.recv(4096).decode().splitlines()
        assert ready[0] == "READY=1"
        assert ready[1] == f"STATUS=serving on {daemon.socket}; 2 VM(s) adopted"
        assert "adopted 2 running VM(s): api, web" in daemon.output()  # adoption came first
        daemon.proc.send_signal(signal.SIGTERM)
        assert systemd.recv(4096) == b"STOPPING=1"
        assert daemon.proc.wait(timeout=30) == 0


def test_pause_and_resume_through_the_worker_survive_its_restart(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    assert daemon.apply(example_build.deployment)["success"]
    with daemon.client() as client:
        web = client.pause("web")
    assert web["state"] == "paused"
    api = ApiClient(vm_host.state / "vms" / "web" / "api.sock", timeout=10)
    with api:
        assert api.get("vm.info")["state"] == "Paused"  # the double, as the real one, says so
    parsed = parse_exposition(daemon.metrics())
    assert parsed.one("procurator_vm_state", vm="web", state="paused") == 1
    assert parsed.one("procurator_vm_up", vm="web", backend="cloud-hypervisor") == 1

    kill9(daemon.proc.pid)  # a paused VM survives a worker restart as paused, not restarted
    daemon = start_daemon()
    wait_for("adoption", lambda: "adopted" in daemon.output())
    assert daemon.vms()["web"]["state"] == "paused"
    assert daemon.vms()["web"]["pid"] == web["pid"]
    with daemon.client() as client:
        assert client.resume("web")["state"] == "running"
        with pytest.raises(WorkerApiError, match="expect") as caught:
            client._request("POST", "/pause", json={"vm": 3})
        assert caught.value.status == 400
        with pytest.raises(WorkerApiError, match="no VM named 'ghost'") as caught:
            client.pause("ghost")
        assert caught.value.status == 404
    with api:
        assert api.get("vm.info")["state"] == "Running"
    assert_converged(vm_host, example_build.bundles)


def test_a_damaged_record_is_set_aside_and_the_rest_supervised(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    assert daemon.apply(example_build.deployment)["success"]
    kill9(daemon.proc.pid)
    web = record(vm_host, "web")
    path = vm_host.state / "vms" / "web" / "record.json"
    path.write_text(json.dumps({**web, "name": "api"}))  # a name that is not its directory's

    daemon = start_daemon()  # starts all the same
    wait_for("adoption", lambda: "adopted" in daemon.output())
    vms = daemon.vms()
    assert vms["web"]["state"] == "damaged"
    assert "'api' is not the name of its directory 'web'" in vms["web"]["problem"]
    assert vms["api"]["state"] == "running"
    assert process.alive(web["pid"], web["start_time"])  # the damaged VM's guest is left running
    parsed = parse_exposition(daemon.metrics())
    assert parsed.one("procurator_vm_state", vm="web", state="damaged") == 1
    assert parsed.one("procurator_vm_state", vm="api", state="running") == 1
    assert f"web: not supervised: {path}: damaged state file: name:" in daemon.output()

    api = vms["api"]
    kill9(api["pid"])  # the rest is supervised: api comes back
    wait_for("api to be restarted", lambda: restarted(daemon, "api", api["pid"], 1))
    assert daemon.output().count("web: not supervised") == 1  # logged once, not at every pass

    done = vm_host.run("down", "web")  # the documented fix, while the worker runs
    assert done.returncode == 0, done.stderr
    assert not process.alive(web["pid"], web["start_time"])
    assert "web" not in daemon.vms()
    assert daemon.apply(example_build.deployment)["success"]
    assert_converged(vm_host, example_build.bundles)


def test_a_guest_power_off_follows_the_restart_policy(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon("--interval", "1")
    assert daemon.apply(example_build.deployment)["success"]
    before = {n: v["pid"] for n, v in daemon.vms().items()}
    api_started = record(vm_host, "api")["start_time"]
    for name in ("web", "api"):  # the guests power off; under --no-shutdown their hypervisors stay
        with ApiClient(vm_host.state / "vms" / name / "api.sock") as api:
            api.put("vm.power-button")

    # web (always) boots again; api (on-failure) stays down: a power-off is no failure.
    wait_for("web to boot again", lambda: restarted(daemon, "web", before["web"], 1))
    assert record(vm_host, "web")["last_exit"] == "guest powered off"
    api = wait_for(
        "api to be left down", lambda: daemon.vms()["api"]["state"] == "exited" and daemon.vms()["api"]
    )
    assert api["pid"] is None
    assert (
        record(vm_host, "api")["last_exit"]
        == "guest powered off; restart policy on-failure restarts only crashes"
    )
    assert not process.alive(before["api"], api_started)  # its idle hypervisor was stopped
    assert [p for p in vm_host.processes() if "cloud-hypervisor" in p and "vms/api/" in p] == []
    assert len(vm_host.taps()) == 1  # api's TAP went with its hypervisor
    time.sleep(2.5)  # timer reconciles leave it to its policy ...
    assert daemon.vms()["api"]["state"] == "exited"
    # ... an apply of the deployment does not: the deployment says it runs.
    report = daemon.apply(example_build.deployment)
    assert {a["name"]: (a["kind"], a["outcome"]) for a in report["result"]["actions"]} == {
        "api": ("start", "ok"),
        "web": ("keep", "ok"),
    }
    assert_converged(vm_host, example_build.bundles)


def test_a_guest_that_resets_inside_cloud_hypervisor_is_a_crash_loop(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    """cloud-hypervisor serves a guest reset (a panic under panic=-1) in the same process: no exit, no
    shutdown event, only vm/rebooting and vm/rebooted (vmm/src/lib.rs vm_reboot), under Landlock (the
    default here) as well, its serial socket's directory granted. Supervision must see the reset."""
    daemon = start_daemon("--interval", "1", CHDOUBLE_GUEST_RESET="1.0")
    assert daemon.apply(example_build.deployment)["success"]
    first = daemon.vms()["api"]["pid"]
    # api (on-failure, maxRestarts 3): each boot resets a second later; three restarts, then given up.
    api = wait_for(
        "api to be given up",
        lambda: daemon.vms()["api"] if daemon.vms()["api"]["state"] == "failed" else None,
        timeout=90,
    )
    assert api["pid"] is None
    last_exit = record(vm_host, "api")["last_exit"]
    assert last_exit.startswith("guest reset (a reboot, or a panic under panic=-1); crash loop: 3 restarts")
    assert record(vm_host, "api")["restarts"] == 3
    assert vm_host.ps()["api"]["state"] == "failed"
    assert not any("vms/api/" in p for p in vm_host.processes() if "cloud-hypervisor" in p)
    assert daemon.vms()["web"]["pid"] != first


def test_api_errors_and_a_second_daemon(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    with daemon.client() as client:
        with pytest.raises(WorkerApiError, match="no desired deployment") as caught:
            client.plan()
        assert caught.value.status == 404
        with pytest.raises(WorkerApiError, match="not a deployment") as caught:
            client.apply(vm_host.root)
        assert caught.value.status == 400
        plan = client.plan(example_build.deployment)
        assert {a["name"]: a["kind"] for a in plan["actions"]} == {"api": "create", "web": "create"}
    transport = WorkerClient(daemon.socket)._client  # raw requests: what the typed client never sends
    for method, path, body, status in [
        ("GET", "/nope", None, 404),
        ("GET", "/apply", None, 405),
        ("POST", "/apply", b"{not json", 400),
        ("POST", "/apply", b'{"deployment": 3}', 400),
        (
            "POST",
            "/apply",
            json.dumps({"deployment": str(example_build.deployment), "wait": "x"}).encode(),
            400,
        ),
        ("POST", "/apply", json.dumps({"deployment": "/" + "a" * 100_000}).encode(), 400),  # too long
        ("POST", "/apply", json.dumps({"deployment": "/" + "a/" * 2000}).encode(), 400),  # a name too long
        ("POST", "/apply", json.dumps({"deployment": "/nix/store/x\u0000y"}).encode(), 400),
        ("POST", "/apply", json.dumps({"deployment": "relative/path"}).encode(), 400),
        ("GET", "/plan?deployment=" + "a" * 5000, None, 400),
    ]:
        response = transport.request(method, path, content=body)
        assert response.status_code == status, (method, path[:80], response.text[:200])
        assert set(response.json()) == {"error", "type"}
        assert len(response.json()["error"]) < 300, response.text[:300]  # a reason, not the input back
    assert transport.get("/apply").headers["allow"] == "POST"
    transport.close()

    second = subprocess.run(
        [str(PROCURATOR), "worker", "--api-socket", str(daemon.socket)],
        env=vm_host.env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert second.stderr.strip().endswith(
        f"error: {daemon.socket}: another worker already serves this API socket; stop it first"
    )
    assert daemon.proc.poll() is None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    with pytest.raises(WorkerUnavailableError, match="no worker answers"):
        daemon.status()


def test_cli_apply_goes_through_the_worker_and_host_shutdown_comes_back(
    vm_host: VmHost, start_daemon: Callable[..., Daemon], example_build: ExampleBuild
) -> None:
    config = json.loads(vm_host.config_path.read_text())
    config["apiSocket"] = str(vm_host.root / "api.sock")
    vm_host.config_path.write_text(json.dumps(config))
    daemon = start_daemon()

    done = vm_host.run("apply", str(example_build.deployment), "--wait", "booted")
    assert done.returncode == 0, done.stderr
    assert f"applying through the worker on {vm_host.root / 'api.sock'}" in done.stderr
    assert_converged(vm_host, example_build.bundles)
    assert {vm["name"] for vm in daemon.status()["vms"]} == {"api", "web"}

    # plan, ps and rollback ask the worker too; what they print is what they print without one
    planned = json.loads(vm_host.ok("plan", str(example_build.deployment), "--json"))
    with daemon.client() as client:
        assert planned == client.plan(example_build.deployment)
    assert [(a["name"], a["kind"]) for a in planned["actions"]] == [("api", "keep"), ("web", "keep")]

    def steady(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {name: {k: v for k, v in row.items() if k != "uptime"} for name, row in rows.items()}

    assert steady(vm_host.ps()) == steady({vm["name"]: vm for vm in daemon.status()["vms"]})
    back = vm_host.run("rollback", "--json")
    assert back.returncode == 1  # generation 1 is the only one: nothing to roll back to
    assert "rolling back through the worker" in back.stderr
    assert "error: " in back.stderr
    assert back.stderr.count("\n") == 2, back.stderr

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    assert_converged(vm_host, example_build.bundles)  # the VMs outlive the daemon

    down = vm_host.run("shutdown")
    assert down.returncode == 0, down.stderr
    assert sorted(down.stderr.splitlines()) == ["api: shut down (graceful)", "web: shut down (graceful)"]
    assert {n: v["state"] for n, v in vm_host.ps().items()} == {"api": "exited", "web": "exited"}
    assert record(vm_host, "web")["last_exit"] == "host shutdown"
    assert [p for p in vm_host.processes() if "cloud-hypervisor" in p] == []

    start_daemon()  # the host is back: the worker boots what the shutdown stopped
    wait_for(
        "the VMs to run again",
        lambda: all(v["state"] == "running" for v in vm_host.ps().values()) or None,
        timeout=60,
    )
    assert_converged(vm_host, example_build.bundles)
