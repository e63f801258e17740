"""Boot overhead: wall time from `procurator up` to the guest's HTTP answer, against the very same QEMU
command started by hand, median of RUNS interleaved rounds, as a ratio (target: at most 1.05), with the
spread of the per-round ratios.

Run as root: `.venv/bin/python benchmarks/bench_boot.py`. It builds the `web` example, and works in a
network namespace it creates and deletes (the host's interfaces are never touched). Both sides poll the
guest's HTTP port the same way (qemu_guests.wait_http), so the difference is what Procurator adds:
resolving the bundle, state, lock, network, the runtime config, spawning and waiting for QMP.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_guests import Guests, build_example, wait_http

from procurator import network
from procurator.hypervisor.qemu import build_argv
from procurator.network import NetworkConfig

RUNS = int(os.environ.get("BENCH_BOOT_RUNS", "6"))
TARGET = 1.05


def main() -> int:
    bundle = build_example("web")
    with Guests(subnet="10.125.0.0/24") as guests:
        ns, work = guests.ns, guests.work
        via_procurator, by_hand = [], []
        # One untimed round learns the VM's leased address (it is the same on every later start).
        guests.run("up", str(bundle))
        ip = str(guests.ps()["web"]["ip"])
        config = json.loads((guests.state / "vms" / "web" / "vm-config.runtime.json").read_text())
        guests.run("down", "web")
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
                    up = guests.popen("up", str(bundle))
                    via_procurator.append(wait_http(ns, ip) - started)
                    if up.wait(timeout=120) != 0:
                        raise SystemExit("procurator up failed")
                    guests.run("down", "web")
                    continue
                network.net_up(cfg)
                network.attach_vm(cfg, "web", ["eth0"], 0, 1, ip=ip)  # the same network as `up` makes
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
                network.detach_vm(cfg, "web", ip=ip)

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
