"""`up`, `stop`, `start`, `down`, `pause`, `resume` through a running worker (worker/commands.py): the CLI as
a subprocess, the worker as a subprocess in the throwaway host's network namespace serving its API on a
real UNIX socket, the cloud-hypervisor double, real Nix builds of examples/minimal.nix. A VM stopped
through the worker is not restarted by it; `start` puts it back under supervision; `down --purge` leaves
nothing; what the commands print is what they print without a worker; a worker killed mid-stop leaves a
state one re-run (without it) converges."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procurator import process
from tests.integration.conftest import ExampleBuild
from tests.integration.test_worker import CH, Daemon, kill9, record, restarted, start_daemon, wait_for
from tests.support.cli import PROCURATOR
from tests.support.host import VmHost

__all__ = ["start_daemon"]  # the fixture, shared with test_worker.py

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)


def use_worker_socket(host: VmHost) -> Path:
    """Point the host's configuration at the socket `start_daemon` serves (as a real host's is)."""
    config = json.loads(host.config_path.read_text())
    config["apiSocket"] = str(host.root / "api.sock")
    host.config_path.write_text(json.dumps(config))
    return host.root / "api.sock"


def hypervisors(host: VmHost) -> list[str]:
    return [p for p in host.processes() if "cloud-hypervisor" in p]


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def zombies(ppid: int) -> list[int]:
    """Children of `ppid` that exited and were not reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, parent_pid = entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" and int(parent_pid) == ppid:
            found.append(int(entry.name))
    return found


def leased(host: VmHost) -> set[str]:
    path = host.state / "leases.json"
    return set(json.loads(path.read_text())["leases"]) if path.exists() else set()


def steady(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without what differs between two boots of the same VM (pid, uptime) and between where they
    were booted: `ip netns exec` mounts a sysfs of its own without the cgroup hierarchy, so the VMs the
    worker boots here have no group to read `resources` from, and the command's own have."""
    return [{k: v for k, v in row.items() if k not in {"pid", "uptime", "resources"}} for row in rows]


def test_stop_start_down_through_the_worker_print_what_they_print_without_it(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    api_socket = use_worker_socket(vm_host)
    daemon = start_daemon()
    web, api = str(example_build.web), str(example_build.api)

    up = vm_host.run("--debug", "up", web, api, "--json")
    assert up.returncode == 0, up.stderr
    assert f"up through the worker on {api_socket}" in up.stderr
    rows = json.loads(up.stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("api", "running"), ("web", "running")]
    assert all(parent(r["pid"]) == daemon.proc.pid for r in rows)  # the worker started them
    assert steady(rows) == steady([daemon.vms()["api"], daemon.vms()["web"]])

    stopped = vm_host.run("--debug", "stop", "web", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stop through the worker on {api_socket}" in stopped.stderr
    via_worker_stop = json.loads(stopped.stdout)
    steps = ["power-button", "vmm.shutdown"]
    graceful = {"name": "web", "was_running": True, "graceful": True, "steps": steps}
    assert via_worker_stop == [graceful]
    assert record(vm_host, "web")["desired"] == "stopped"

    # The worker supervises api and not web: a crash of api is restarted, web stays stopped meanwhile.
    api_pid = daemon.vms()["api"]["pid"]
    kill9(api_pid)
    wait_for("the worker to restart api", lambda: restarted(daemon, "api", api_pid, 1), timeout=60)
    assert daemon.vms()["web"]["state"] == "stopped"
    assert len(hypervisors(vm_host)) == 1
    assert zombies(daemon.proc.pid) == []  # the worker reaped the hypervisor it stopped

    started = vm_host.run("start", "web", "--json")
    assert started.returncode == 0, started.stderr
    via_worker_start = json.loads(started.stdout)
    assert [(r["name"], r["state"]) for r in via_worker_start] == [("web", "running")]
    web_pid = via_worker_start[0]["pid"]
    assert parent(web_pid) == daemon.proc.pid
    kill9(web_pid)  # back under supervision: restarted by its policy
    wait_for("the worker to restart web", lambda: restarted(daemon, "web", web_pid, 1), timeout=60)

    # pause and resume ask the worker too, and say when there was nothing to do
    assert vm_host.run("pause", "web").stderr == "web: paused\n"
    again = vm_host.run("pause", "web", "--json")
    assert again.returncode == 0
    assert [r["state"] for r in json.loads(again.stdout)] == ["paused"]
    assert vm_host.run("resume", "web").stderr == "web: resumed\n"
    assert vm_host.run("resume", "web").stderr == "web: already resumed; nothing to do\n"

    # Errors from the worker: one line, the exit code the command has without a worker.
    via_worker_errors = {
        args: vm_host.run(*args)
        for args in [("stop", "ghost"), ("stop", "Not_A_Name"), ("start", "api"), ("down", "../vms/web")]
    }
    assert [record(vm_host, n)["desired"] for n in ("api", "web")] == ["running", "running"]
    for args, done in via_worker_errors.items():
        assert done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith("error: "), (args, done.stderr)
    assert via_worker_errors["stop", "ghost"].returncode == 1
    assert "no VM named 'ghost' on this host" in via_worker_errors["stop", "ghost"].stderr
    assert via_worker_errors["stop", "Not_A_Name"].returncode == 2
    already = "error: VM 'api' is already running; nothing to start\n"
    assert via_worker_errors["start", "api"].stderr == already

    down = vm_host.run("--debug", "down", "--purge", "web", "--json")
    assert down.returncode == 0, down.stderr
    assert f"down through the worker on {api_socket}" in down.stderr
    via_worker_down = json.loads(down.stdout)
    assert via_worker_down == [{**graceful, "purged": True}]
    assert set(vm_host.ps()) == {"api"}
    assert len(hypervisors(vm_host)) == 1
    assert len(vm_host.taps()) == 1
    assert leased(vm_host) == {"api"}
    assert sorted(p.name for p in (vm_host.state / "vms").iterdir()) == ["api"]
    assert zombies(daemon.proc.pid) == []

    # The same commands without a worker (the socket file stays, nobody answers): the same output.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    up_here = vm_host.run("--debug", "up", web, "--json")
    assert up_here.returncode == 0, up_here.stderr
    assert "through the worker" not in up_here.stderr
    assert steady(json.loads(up_here.stdout)) == steady([r for r in rows if r["name"] == "web"])
    assert json.loads(vm_host.ok("stop", "web", "--json")) == via_worker_stop
    assert steady(json.loads(vm_host.ok("start", "web", "--json"))) == steady(via_worker_start)
    for args, via_worker in via_worker_errors.items():
        here = vm_host.run(*args)
        assert (here.returncode, here.stderr) == (via_worker.returncode, via_worker.stderr), args
    assert json.loads(vm_host.ok("down", "--purge", "web", "--json")) == via_worker_down
    assert set(vm_host.ps()) == {"api"}
    assert leased(vm_host) == {"api"}


def test_api_refuses_bad_vm_commands(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon()
    with daemon.client() as client:
        transport = client._client  # raw requests: what the typed client never sends
        for method, path, body, status in [
            ("POST", "/vm/ghost/stop", b"{}", 404),
            ("POST", "/vm/ghost/start", None, 404),
            ("POST", "/vm/..%2Fvms%2Fx/stop", b"{}", 400),
            ("POST", "/vm/" + "a" * 300 + "/down", b"{}", 400),
            ("POST", "/vm/web/down", b'{"purge": "yes"}', 400),
            ("POST", "/vm/web/start", b'{"wait": "forever"}', 400),
            ("POST", "/vm/web/stop", b"[1]", 400),
            ("POST", "/vm/web/stop", b"{not json", 400),
            ("GET", "/vm/web/stop", None, 405),
            ("POST", "/vm/web/reboot", b"{}", 404),
            ("POST", "/up", b"{}", 400),
            ("POST", "/up", json.dumps({"bundle": "relative/web"}).encode(), 400),
            ("POST", "/up", json.dumps({"bundle": str(example_build.web), "backend": "xen"}).encode(), 400),
            ("POST", "/up", json.dumps({"bundle": str(vm_host.root)}).encode(), 400),
        ]:
            response = transport.request(method, path, content=body)
            assert response.status_code == status, (method, path[:80], response.text[:200])
            assert set(response.json()) == {"error", "type"}
            assert len(response.json()["error"]) < 300, response.text[:300]
        answer = transport.post("/up", json={"bundle": str(example_build.web), "wait": "booted"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["schema"] == 1
        assert answer.json()["vm"]["state"] == "running"
    assert daemon.proc.poll() is None
    assert [(n, v["state"]) for n, v in vm_host.ps().items()] == [("web", "running")]


def test_kill_9_of_the_worker_mid_stop_then_one_rerun_converges(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    use_worker_socket(vm_host)
    daemon = start_daemon(CHDOUBLE_POWEROFF_DELAY="3")  # its hypervisors take 3s to power off
    vm_host.ok("up", str(example_build.web), str(example_build.api))
    web = record(vm_host, "web")
    assert parent(web["pid"]) == daemon.proc.pid

    stop = subprocess.Popen(
        [str(PROCURATOR), "stop", "web"], env=vm_host.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for("the worker to record the stop", lambda: record(vm_host, "web")["desired"] == "stopped")
        assert process.alive(web["pid"], web["start_time"])  # powering off, not yet down
        kill9(daemon.proc.pid)
        _, err = stop.communicate(timeout=60)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait(timeout=10)
    assert stop.returncode == 1
    assert err.decode().count("\n") == 1, err
    assert err.decode().startswith("error: the worker on "), err
    assert "went away during POST /vm/web/stop" in err.decode(), err

    rerun = vm_host.run("stop", "web")
    assert rerun.returncode == 0, rerun.stderr
    vms = vm_host.ps()
    assert {n: v["state"] for n, v in vms.items()} == {"api": "running", "web": "stopped"}
    assert not process.alive(web["pid"], web["start_time"])
    assert len(hypervisors(vm_host)) == 1
    assert len(vm_host.taps()) == 1
    assert record(vm_host, "web")["pid"] == 0
    assert leased(vm_host) == {"api", "web"}  # a stop keeps the lease for `start`

    daemon = start_daemon()  # a worker again: web stays stopped, and starts when asked
    wait_for("adoption", lambda: "adopted" in daemon.output())
    assert daemon.vms()["web"]["state"] == "stopped"
    assert vm_host.run("start", "web").returncode == 0
    assert {n: v["state"] for n, v in vm_host.ps().items()} == {"api": "running", "web": "running"}
    assert parent(record(vm_host, "web")["pid"]) == daemon.proc.pid
    assert len(hypervisors(vm_host)) == 2


def test_snapshot_and_restore_through_the_worker_and_no_shutdown_beside_it(
    vm_host: VmHost, example_build: ExampleBuild, start_daemon: Callable[..., Daemon]
) -> None:
    api_socket = use_worker_socket(vm_host)
    daemon = start_daemon()
    vm_host.ok("up", str(example_build.web))

    taken = vm_host.run("--debug", "snapshot", "web", "--json")
    assert taken.returncode == 0, taken.stderr
    assert f"snapshot through the worker on {api_socket}" in taken.stderr
    snap = json.loads(taken.stdout)
    assert (snap["vm"], snap["guest_paused"], snap["pruned"]) == ("web", False, [])
    assert Path(snap["path"]).is_dir()
    assert daemon.vms()["web"]["state"] == "running"  # resumed after the snapshot

    refused = vm_host.run("shutdown")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"error: a worker answers on {api_socket}: it supervises the VMs and boots again what a shutdown "
        "stops; stop it first (systemctl stop procurator-worker), then run `procurator shutdown`\n"
    )
    assert daemon.vms()["web"]["state"] == "running"

    vm_host.ok("stop", "web")
    bad = vm_host.run("restore", "web", "--id", "../../etc")
    assert (bad.returncode, bad.stderr.count("\n")) == (2, 1), bad.stderr
    restored = vm_host.run("--debug", "restore", "web", "--json")
    assert restored.returncode == 0, restored.stderr
    assert f"restore through the worker on {api_socket}" in restored.stderr
    rows = json.loads(restored.stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("web", "running")]
    assert parent(rows[0]["pid"]) == daemon.proc.pid  # the worker's child, under its supervision
    kill9(rows[0]["pid"])
    wait_for("the worker to restart web", lambda: restarted(daemon, "web", rows[0]["pid"], 1), timeout=60)

    # Without a worker: the same documents, the same refusal of a bad id.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    here = json.loads(vm_host.ok("snapshot", "web", "--json"))
    assert sorted(here) == sorted(snap)
    assert (here["vm"], here["guest_paused"]) == ("web", False)
    vm_host.ok("stop", "web")
    again = vm_host.run("restore", "web", "--id", "../../etc")
    assert (again.returncode, again.stderr) == (bad.returncode, bad.stderr)
    assert sorted(json.loads(vm_host.ok("restore", "web", "--json"))[0]) == sorted(rows[0])
