"""Worker daemon benchmark: its memory and costs with 1 000 VMs in its state. Targets: peak RSS at most
50 MB; the first /metrics (device counters not cached: one vm.counters call per VM) at most 300 ms.

Run as root: `.venv/bin/python benchmarks/bench_worker.py [N]`. Everything lives in a temporary state
directory and a network namespace this script creates and deletes.

The VMs are synthetic: N records (backend cloud-hypervisor) whose pid and start time are those of one
stand-in process, which serves each record's API socket with the standard library's HTTP server
(`vmm.ping` with its pid, so that the daemon adopts every VM; `vm.counters`; everything else 404) and
counts the requests. The real `procurator worker` runs on that state (no deployment profile, so no
reconcile: it adopts, supervises and serves) and is measured from outside:

  - RSS (VmRSS) after start-up and adoption, after /status and /metrics scrapes, and its peak (VmHWM);
  - the time of /status, of a first /metrics scrape (one vm.counters call per VM) and of a cached one,
    and of one more scrape after the idle time, when the counters' ttl has passed (cold again);
  - API calls per scrape, counted by the stand-in (at most one per VM, none within the cache's ttl);
  - the daemon's CPU while idle (supervision passes over N records every second, the watchdog's pings
    and the health probes' rounds every 10 s).
The machine is shared and small: one run is noisy, the ratios are what count.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procurator import process
from procurator.errors import WorkerApiError, WorkerUnavailableError
from procurator.worker.client import WorkerClient
from tests.support.netns import throwaway_netns

N = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1000
TARGET_MB = 50.0  # peak RSS (VmHWM)
TARGET_FIRST_MS = 300.0  # a /metrics scrape whose device counters are not cached
PROCURATOR = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "procurator"
IDLE_SECONDS = 10.0
SCRAPES = 5


# --- the stand-in hypervisor process ------------------------------------------------------------------


_COUNTED: dict[str, int] = {}  # requests per endpoint: one process, one table


def _answer(endpoint: str) -> bytes:
    """The whole HTTP answer to GET /api/v1/<endpoint>, as micro_http frames one (status line, Server,
    Connection, Content-Type, Content-Length)."""
    _COUNTED[endpoint] = _COUNTED.get(endpoint, 0) + 1
    if endpoint == "vmm.ping":
        body: Any = {"build_version": "stand-in", "version": "0", "pid": os.getpid(), "features": []}
    elif endpoint == "vm.counters":
        body = {
            "eth0": {"rx_bytes": 1000, "rx_frames": 10, "tx_bytes": 800, "tx_frames": 9},
            "vol-data": {"read_bytes": 4096, "write_bytes": 512, "read_ops": 1, "write_ops": 1},
        }
    elif endpoint == "counts":
        body = _COUNTED
    else:
        return b"HTTP/1.1 404 Not Found\r\nServer: Cloud Hypervisor API\r\nContent-Length: 0\r\n\r\n"
    data = json.dumps(body).encode()
    head = (
        "HTTP/1.1 200 OK\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def serve_stand_in(vms_dir: Path, n: int) -> None:
    """Serve every VM's api.sock (and `counts.sock`) from this one process, until killed: one selector,
    GET requests without bodies (all the worker sends these sockets), keep-alive as micro_http. Written on
    raw sockets, not http.server, so that it costs about what a real cloud-hypervisor's Rust server does
    (tens of microseconds a request) and does not take the shared second core from the daemon measured."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * n + 256)), hard))
    selector = selectors.DefaultSelector()
    paths = [vms_dir / f"vm{i:04d}" / "api.sock" for i in range(n)] + [vms_dir.parent / "counts.sock"]
    for path in paths:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(64)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
    print("ready", flush=True)
    pending: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:  # a listener
                with contextlib.suppress(BlockingIOError):
                    client, _ = sock.accept()
                    client.setblocking(False)
                    selector.register(client, selectors.EVENT_READ, "client")
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                pending.pop(sock, None)
                sock.close()
                continue
            buffered = pending.pop(sock, b"") + data
            while b"\r\n\r\n" in buffered:
                head, buffered = buffered.split(b"\r\n\r\n", 1)
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                sock.setblocking(True)
                sock.sendall(_answer(target.removeprefix("/api/v1/")))
                sock.setblocking(False)
            if buffered:
                pending[sock] = buffered


# --- the benchmark ---------------------------------------------------------------------------------


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_records(state: Path, n: int, pid: int, start_time: int) -> None:
    now = time.time()
    for i in range(n):
        name = f"vm{i:04d}"
        vm_dir = state / "vms" / name
        vm_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "schema": 1,
            "name": name,
            "bundle": f"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-procurator-vm-{name}",
            "generation": "0123456789abcdfghijklmnpqrsvwxyz",
            "backend": "cloud-hypervisor",
            "pid": pid,
            "start_time": start_time,
            "api_socket": str(vm_dir / "api.sock"),
            "vm_dir": str(vm_dir),
            "taps": [],
            "ip": f"10.100.{i // 250}.{i % 250 + 2}",
            "mac": "",
            "netns": None,
            "created_at": now,
            "started_at": now,
            "restarts": 0,
            "shutdown_timeout": 30.0,
            "desired": "running",
            "last_exit": "",
        }
        (vm_dir / "record.json").write_text(json.dumps(record, indent=2, sort_keys=True))


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def counts(root: Path) -> dict[str, int]:
    with WorkerClient(root / "counts.sock") as client:  # any httpx client over a UNIX socket will do
        answer: dict[str, int] = client._client.get("/api/v1/counts").json()
    return answer


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--stand-in":
        serve_stand_in(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    root = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    state = root / "state"
    (state / "vms").mkdir(parents=True)
    for i in range(N):
        (state / "vms" / f"vm{i:04d}").mkdir()
    stand_in = subprocess.Popen(
        [sys.executable, __file__, "--stand-in", str(state / "vms"), str(N)],
        stdout=subprocess.PIPE,
        text=True,
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert stand_in.stdout is not None
        assert stand_in.stdout.readline().strip() == "ready"
        start_time = process.process_start_time(stand_in.pid)
        assert start_time is not None
        write_records(state, N, stand_in.pid, start_time)
        with throwaway_netns("pcb") as ns:
            config = root / "worker.json"
            config.write_text(
                json.dumps({"hypervisor": {"backend": "cloud-hypervisor"}, "network": {"netns": ns.name}})
            )
            api = root / "api.sock"
            env = {**os.environ, "PROCURATOR_STATE_DIR": str(state), "PROCURATOR_CONFIG": str(config),
                   "PROCURATOR_CLOUD_HYPERVISOR": "/bin/true"}  # fmt: skip
            log = (root / "worker.log").open("wb")
            began = time.perf_counter()
            daemon = subprocess.Popen(
                [str(PROCURATOR), "worker", "--api-socket", str(api), "--poll", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            client = WorkerClient(api, timeout=120)
            while True:
                try:
                    status = client.status()
                    break
                except (WorkerUnavailableError, WorkerApiError):
                    if daemon.poll() is not None or time.perf_counter() - began > 120:
                        print((root / "worker.log").read_text())
                        raise
                    time.sleep(0.05)
            ready = time.perf_counter() - began
            while "adopted" not in (root / "worker.log").read_text() and time.perf_counter() - began < 120:
                time.sleep(0.05)
            adopted = time.perf_counter() - began
            time.sleep(2)
            rss_start = rss_mb(daemon.pid)

            t_status, status = timed(client.status)
            running = sum(1 for vm in status["vms"] if vm["state"] == "running")
            before = counts(state).get("vm.counters", 0)
            t_first, text = timed(client.metrics)
            first_calls = counts(state).get("vm.counters", 0) - before
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            cached = []
            for _ in range(SCRAPES):
                t, _ = timed(client.metrics)
                cached.append(t)
            cached_calls = counts(state).get("vm.counters", 0) - before - first_calls
            rss_after = rss_mb(daemon.pid)

            cpu_before = cpu_seconds(daemon.pid)
            time.sleep(IDLE_SECONDS)
            idle_cpu = (cpu_seconds(daemon.pid) - cpu_before) / IDLE_SECONDS
            before = counts(state).get("vm.counters", 0)
            t_cold, _ = timed(client.metrics)  # IDLE_SECONDS >= the counters' ttl: every VM asked again
            cold_calls = counts(state).get("vm.counters", 0) - before
            rss_end, hwm = rss_mb(daemon.pid), rss_mb(daemon.pid, "VmHWM")
            client.close()
            daemon.terminate()
            code = daemon.wait(timeout=30)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
        stand_in.kill()
        stand_in.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("API answering after start", f"{ready * 1000:8.0f} ms"),
        ("all VMs adopted after start", f"{adopted * 1000:8.0f} ms"),
        ("GET /status", f"{t_status * 1000:8.0f} ms"),
        (
            "GET /metrics, first",
            f"{t_first * 1000:8.0f} ms  {first_calls} vm.counters calls, {series} series",
        ),
        (
            f"GET /metrics, cached (best of {SCRAPES})",
            f"{min(cached) * 1000:8.0f} ms  {cached_calls} vm.counters calls",
        ),
        (
            "GET /metrics, after the counters' ttl",
            f"{t_cold * 1000:8.0f} ms  {cold_calls} vm.counters calls",
        ),
        ("CPU while idle (1 s supervision passes)", f"{idle_cpu * 100:8.1f} % of a core"),
        ("RSS after adoption", f"{rss_start:8.1f} MB"),
        ("RSS after /status and /metrics", f"{rss_after:8.1f} MB"),
        ("RSS at the end", f"{rss_end:8.1f} MB"),
        ("peak RSS (VmHWM)", f"{hwm:8.1f} MB"),
        ("exit code on SIGTERM", f"{code:8d}"),
    ]
    print(f"procurator worker with {N} VMs in its state ({running} running, adopted)")
    for label, value in rows:
        print(f"  {label:<42}{value}")
    first_ms = min(t_first, t_cold) * 1000  # the better of the two uncached scrapes
    for what, figure, target, unit in (
        ("first /metrics (uncached counters, best of 2)", first_ms, TARGET_FIRST_MS, "ms"),
        ("peak RSS", hwm, TARGET_MB, "MB"),
    ):
        met = "met" if figure <= target else "NOT met"
        ratio = figure / target
        print(f"  {what}: {figure:.1f} {unit}, target <= {target:.0f} {unit}: {met} (ratio {ratio:.2f})")
    # what must hold whatever the machine's speed: at most one call per VM, none within the ttl
    ok = first_calls <= N and cold_calls <= N and cached_calls == 0 and code == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
