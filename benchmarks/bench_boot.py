"""Boot overhead: wall time from `procurator up` to the guest's HTTP answer, against the very same QEMU
command started by hand, median of RUNS interleaved rounds, as a ratio (target: at most 1.05), with the
spread of the per-round ratios.

Run as root: `.venv/bin/python benchmarks/bench_boot.py`. It builds the `web` example, and works in a
network namespace it creates and deletes (the host's interfaces are never touched). Both sides poll the
guest's HTTP port the same way (a connect every 50 ms), so the difference is what Procurator adds:
resolving the bundle, state, lock, network, the runtime config, spawning and waiting for QMP.
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

from procurator import network
from procurator.hypervisor.qemu import build_argv
from procurator.netns import connect_tcp
from procurator.network import NetworkConfig

REPO = Path(__file__).resolve().parents[1]
PROCURATOR = REPO / ".venv" / "bin" / "procurator"
RUNS = int(os.environ.get("BENCH_BOOT_RUNS", "6"))
TARGET = 1.05
DEADLINE = 60.0


def wait_http(ns: str, ip: str) -> float:
    """Poll until the guest answers HTTP on port 80; returns the monotonic time it did."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            with connect_tcp(ns, ip, 80, 0.5) as sock:
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                if sock.recv(16).startswith(b"HTTP/"):
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the guest at {ip} did not answer HTTP within {DEADLINE:.0f}s")


def build_web() -> Path:
    out = subprocess.run(
        ["nix-build", str(REPO / "examples" / "minimal.nix"), "-A", "web", "--no-out-link"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return Path(out.stdout.strip())


def main() -> int:
    bundle = build_web()
    ns = f"pcbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    work = Path(tempfile.mkdtemp(prefix="procurator-bench-"))
    env = {
        **os.environ,
        "PROCURATOR_STATE_DIR": str(work / "state"),
        "PROCURATOR_CONFIG": str(work / "worker.json"),
    }
    (work / "worker.json").write_text(
        json.dumps({"hypervisor": {"backend": "qemu", "accel": "tcg"},
                    "network": {"bridge": "pcbench0", "subnet": "10.125.0.0/24", "netns": ns}})
    )  # fmt: skip
    try:
        via_procurator, by_hand = [], []
        # One untimed round learns the VM's leased address (it is the same on every later start).
        subprocess.run([str(PROCURATOR), "up", str(bundle)], env=env, check=True, timeout=120)
        vm = json.loads(
            subprocess.run(
                [str(PROCURATOR), "ps", "--json"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        )[0]
        ip = vm["ip"]
        config = json.loads((work / "state" / "vms" / "web" / "vm-config.runtime.json").read_text())
        subprocess.run([str(PROCURATOR), "down", "web"], env=env, check=True, timeout=120)
        # the VM's directory goes with `down`: the hand-started QEMU keeps its files in `work`
        config["serial"] = {"mode": "File", "file": str(work / "hand-serial.log")}
        config["console"] = {"mode": "Socket", "socket": str(work / "hand-console.sock")}
        argv = build_argv(config, qmp_socket=work / "hand.qmp", accel="tcg")
        cfg = NetworkConfig(bridge="pcbench0", subnet="10.125.0.0/24", netns=ns)
        # Interleaved rounds (one boot each way, the order alternating), so that the machine's load drifts
        # over both sides alike and the spread of the ratios says how far one round is from another.
        for round_ in range(RUNS):
            for side in ("procurator", "hand") if round_ % 2 == 0 else ("hand", "procurator"):
                if side == "procurator":
                    # From invoking `procurator up` to the guest's first HTTP answer, polled while `up` is
                    # still finishing, as a person watching for it would.
                    started = time.monotonic()
                    up = subprocess.Popen([str(PROCURATOR), "up", str(bundle)], env=env)
                    via_procurator.append(wait_http(ns, ip) - started)
                    if up.wait(timeout=120) != 0:
                        raise SystemExit("procurator up failed")
                    subprocess.run([str(PROCURATOR), "down", "web"], env=env, check=True, timeout=120)
                    continue
                network.net_up(cfg)
                network.attach_vm(cfg, "web", ["eth0"], 0, 1)
                started = time.monotonic()
                qemu = subprocess.Popen(
                    ["ip", "netns", "exec", ns, *argv],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                by_hand.append(wait_http(ns, ip) - started)
                qemu.kill()
                qemu.wait(timeout=10)
                (work / "hand.qmp").unlink(missing_ok=True)
                (work / "hand-console.sock").unlink(missing_ok=True)
                network.detach_vm(cfg, "web")
    finally:
        subprocess.run(
            [str(PROCURATOR), "down", "--purge", "web"],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        subprocess.run(["ip", "netns", "del", ns], timeout=10, check=False)
        subprocess.run(["rm", "-rf", str(work)], timeout=30, check=False)

    p, h = statistics.median(via_procurator), statistics.median(by_hand)
    ratios = sorted(a / b for a, b in zip(via_procurator, by_hand, strict=True))
    print(
        f"boot to HTTP, median of {RUNS} interleaved rounds: procurator up {p:.2f} s, QEMU by hand {h:.2f} s"
    )
    print(f"  procurator runs: {', '.join(f'{x:.2f}' for x in via_procurator)}")
    print(f"  by-hand runs:    {', '.join(f'{x:.2f}' for x in by_hand)}")
    print(
        f"  per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)} (spread {ratios[-1] - ratios[0]:.3f})"
    )
    print(f"ratio {p / h:.3f} (target <= {TARGET:.2f}): {'met' if p / h <= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
