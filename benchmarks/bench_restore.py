"""restart.fromSnapshot: time from `procurator start` to the guest's health check answering, after a cold
boot and after a restore of the snapshot `procurator shutdown` took, the same VM in the same run, QEMU;
median of RUNS each, alternating (target: the restore is faster than the cold boot, ratio below 1).

Run as root: `.venv/bin/python benchmarks/bench_restore.py`. It builds the `web` example with
`restart.fromSnapshot = true`, and works in a network namespace it creates and deletes (the host's
interfaces are never touched). Each round: `procurator stop` then `procurator start` (a cold boot: the
stop leaves no snapshot to resume), and `procurator shutdown` (snapshot, then kill) then `procurator
start` (the restore). The clock runs from invoking `start` to the first answer of the guest's health
check (HTTP GET /health on port 80), polled every 50 ms in both cases.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procurator.netns import connect_tcp

REPO = Path(__file__).resolve().parents[1]
PROCURATOR = REPO / ".venv" / "bin" / "procurator"
RUNS = int(os.environ.get("BENCH_RESTORE_RUNS", "5"))
DEADLINE = 120.0
OVERRIDES = "{ web = { restart = { fromSnapshot = true; }; }; }"


def wait_health(ns: str, ip: str) -> float:
    """Poll until the guest answers GET /health with 200; the monotonic time it did."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            with connect_tcp(ns, ip, 80, 0.5) as sock:
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                if sock.recv(16).split(b" ")[1:2] == [b"200"]:
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the guest at {ip} did not pass its health check within {DEADLINE:.0f}s")


def build_web() -> Path:
    out = subprocess.run(
        ["nix-build", str(REPO / "examples" / "minimal.nix"), "-A", "web", "--no-out-link",
         "--arg", "overrides", OVERRIDES],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return Path(out.stdout.strip())


def main() -> int:
    bundle = build_web()
    ns = f"pcbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    work = Path(tempfile.mkdtemp(prefix="procurator-bench-restore-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # this checkout's procurator, whichever the venv was installed from
        "PROCURATOR_STATE_DIR": str(work / "state"),
        "PROCURATOR_CONFIG": str(work / "worker.json"),
    }
    (work / "worker.json").write_text(
        json.dumps({"hypervisor": {"backend": "qemu", "accel": "tcg"},
                    "network": {"bridge": "pcbench0", "subnet": "10.126.0.0/24", "netns": ns}})
    )  # fmt: skip

    def cli(*args: str) -> str:
        done = subprocess.run(
            [str(PROCURATOR), *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"procurator {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stderr

    def timed_start() -> float:
        started = time.monotonic()
        start = subprocess.Popen([str(PROCURATOR), "start", "web"], env=env)
        answered = wait_health(ns, ip) - started
        if start.wait(timeout=300) != 0:
            raise SystemExit("procurator start failed")
        return answered

    def last_exit() -> str:
        record = json.loads((work / "state" / "vms" / "web" / "record.json").read_text())
        return str(record["last_exit"])

    cold: list[float] = []
    restored: list[float] = []
    try:
        cli("up", str(bundle), "--wait", "healthy")  # untimed: learns the VM's address, warms the caches
        ip = json.loads(cli_out("ps", "--json", env=env))[0]["ip"]
        for _ in range(RUNS):
            cli("stop", "web")
            cold.append(timed_start())
            if last_exit().startswith("restored"):
                raise SystemExit("a start after `stop` restored a snapshot: no cold boot to measure")
            said = cli("shutdown")
            if "snapshot" not in said:
                raise SystemExit(f"procurator shutdown took no snapshot: {said.strip()}")
            restored.append(timed_start())
            if not last_exit().startswith("restored from snapshot"):
                raise SystemExit(f"the start after `shutdown` did not restore: {last_exit()}")
    finally:
        subprocess.run([str(PROCURATOR), "down", "--purge", "web"], env=env, capture_output=True, timeout=120,
                       check=False)  # fmt: skip
        subprocess.run(["ip", "netns", "del", ns], timeout=10, check=False)
        subprocess.run(["rm", "-rf", str(work)], timeout=30, check=False)

    c, r = statistics.median(cold), statistics.median(restored)
    print(f"start to health check, web (QEMU TCG), median of {RUNS}: cold boot {c:.2f} s, restore {r:.2f} s")
    print(f"  cold boots: {', '.join(f'{x:.2f}' for x in cold)}")
    print(f"  restores:   {', '.join(f'{x:.2f}' for x in restored)}")
    print(f"ratio restore/cold {r / c:.3f} (target < 1: restore faster): {'met' if r < c else 'NOT met'}")
    return 0


def cli_out(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [str(PROCURATOR), *args], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout


if __name__ == "__main__":
    sys.exit(main())
