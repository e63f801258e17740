"""`procurator ps` with 200 VMs (target: at most 150 ms; at most 60 ms when a worker answers), end to end as
a person runs it.

Run: `.venv/bin/python benchmarks/bench_ps.py`. The state directory is synthesised: 200 records whose
pid and start time are this benchmark's own live process (so each counts as running; `ps` reads only
records and the process table, never a hypervisor). Reports the median of RUNS runs of the real CLI
(interpreter start-up and imports included) and of the core call alone; then the same with a worker's
API serving this state directory on a socket (the daemon's own API code, in this process), which `ps`
asks instead of reading the state itself.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procurator import lifecycle, process
from procurator.config import WorkerConfig
from procurator.hypervisor.registry import factory
from procurator.state import StateDir, VmRecord

REPO = Path(__file__).resolve().parents[1]
VMS = 200
RUNS = 15
TARGET_MS = 150.0
WORKER_TARGET_MS = 60.0


def main() -> int:
    pid = os.getpid()
    start = process.process_start_time(pid) or 0
    with tempfile.TemporaryDirectory(prefix="procurator-bench-ps-") as tmp:
        state = StateDir(Path(tmp))
        for i in range(VMS):
            name = f"vm{i:03d}"
            state.save_record(
                VmRecord(name=name, bundle=f"/nix/store/{'a' * 32}-procurator-vm-{name}", generation="a" * 32,
                         backend="cloud-hypervisor", pid=pid, start_time=start,
                         api_socket=f"{tmp}/vms/{name}/api.sock", vm_dir=f"{tmp}/vms/{name}",
                         ip=f"10.100.{i // 250}.{i % 250 + 2}", started_at=time.time())
            )  # fmt: skip
        env = {**os.environ, "PROCURATOR_STATE_DIR": tmp}
        cli = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            out = subprocess.run(
                [str(REPO / ".venv/bin/procurator"), "ps", "--json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            cli.append((time.perf_counter() - t0) * 1000)
            assert out.count('"running"') == VMS, "every synthesised VM must show as running"
        host = lifecycle.Host(
            state=state, config=WorkerConfig(), hypervisors=factory(WorkerConfig().hypervisor)
        )
        core = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            rows = lifecycle.status(host)
            core.append((time.perf_counter() - t0) * 1000)
            assert len(rows) == VMS
        served = through_worker(host, Path(tmp), env)
    c, k, w = statistics.median(cli), statistics.median(core), statistics.median(served)
    print(f"procurator ps --json with {VMS} VMs, median of {RUNS}: {c:.1f} ms (core status: {k:.1f} ms)")
    print(
        f"target <= {TARGET_MS:.0f} ms: {'met' if c <= TARGET_MS else 'NOT met'} (ratio {c / TARGET_MS:.2f})"
    )
    print(f"procurator ps --json answered by a worker, median of {RUNS}: {w:.1f} ms")
    print(
        f"target <= {WORKER_TARGET_MS:.0f} ms: {'met' if w <= WORKER_TARGET_MS else 'NOT met'} "
        f"(ratio {w / WORKER_TARGET_MS:.2f})"
    )
    return 0


def through_worker(host: lifecycle.Host, root: Path, env: dict[str, str]) -> list[float]:
    """`ps` timed while the worker's API (worker/api.py, serving a Worker of this host) answers."""
    from procurator.worker import Settings, Worker, api  # noqa: PLC0415 - only for this part

    sock = root / "api.sock"
    config = root / "worker.json"
    config.write_text(json.dumps({"stateDir": str(root), "apiSocket": str(sock)}))
    # the worker loads the configuration `ps` is given, as on a NixOS host (PROCURATOR_CONFIG for both)
    loaded = WorkerConfig.load(config)
    served_host = lifecycle.Host(state=host.state, config=loaded, hypervisors=host.hypervisors)
    worker = Worker(served_host, Settings(api_socket=sock))
    servers = api.serve(worker, sock, None)
    try:
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            out = subprocess.run(
                [str(REPO / ".venv/bin/procurator"), "--config", str(config), "ps", "--json"],
                env={k: v for k, v in env.items() if k != "PROCURATOR_STATE_DIR"},
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout  # fmt: skip
            times.append((time.perf_counter() - t0) * 1000)
            assert out.count('"running"') == VMS, "the worker must list every VM as running"
        return times
    finally:
        for server in servers:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
