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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_guests import Guests, build_example, wait_http

from procurator import network
from procurator.hypervisor.qemu import build_argv
from procurator.network import NetworkConfig

RUNS = int(os.environ.get("BENCH_BOOT_RUNS", "6"))
TARGET = 1.05


def by_hand(guests: Guests, argv: list[str], cfg: NetworkConfig, ip: str) -> float:
    """The same QEMU command, started by hand on the same network: seconds to the first HTTP answer."""
    network.net_up(cfg)
    network.attach_vm(cfg, "web", ["eth0"], 0, 1, ip=ip)  # the same network as `up` makes
    started = time.monotonic()
    qemu = subprocess.Popen(
        ["ip", "netns", "exec", guests.ns, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    took = wait_http(guests.ns, ip) - started
    qemu.kill()
    qemu.wait(timeout=10)
    (guests.work / "hand.qmp").unlink(missing_ok=True)
    (guests.work / "hand-console.sock").unlink(missing_ok=True)
    network.detach_vm(cfg, "web", ip=ip)
    return took


def via_up(guests: Guests, bundle: Path, ip: str) -> float:
    """From invoking `procurator up` to the guest's first HTTP answer, polled while `up` is still
    finishing, as a person watching for it would; then `down`."""
    started = time.monotonic()
    up = guests.popen("up", str(bundle))
    took = wait_http(guests.ns, ip) - started
    if up.wait(timeout=120) != 0:
        raise SystemExit("procurator up failed")
    guests.run("down", "web")
    return took


def interleaved(sides: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """RUNS rounds, one boot per side each, the order alternating, so that the machine's load drifts over
    the sides alike and the spread of the ratios says how far one round is from another."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(RUNS):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(sides[name]())
    return times


def report(what: str, ours: list[float], hand: list[float]) -> None:
    p, h = statistics.median(ours), statistics.median(hand)
    ratios = sorted(a / b for a, b in zip(ours, hand, strict=True))
    print(f"boot to HTTP, median of {RUNS} interleaved rounds: {what} {p:.2f} s, QEMU by hand {h:.2f} s")
    print(f"  {what} runs: {', '.join(f'{x:.2f}' for x in ours)}")
    print(f"  by-hand runs: {', '.join(f'{x:.2f}' for x in hand)}")
    print(
        f"  per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)} (spread {ratios[-1] - ratios[0]:.3f})"
    )
    # Paired by round, the differences cancel the load both sides of a round shared; their middle half
    # (quartiles) says whether the median difference is more than the noise.
    diffs = sorted(a - b for a, b in zip(ours, hand, strict=True))
    q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else (diffs[0], 0.0, diffs[0])
    print(
        f"  what {what} adds, per round: median {statistics.median(diffs) * 1000:.0f} ms, middle half "
        f"{q1 * 1000:.0f} to {q3 * 1000:.0f} ms ({(statistics.median(diffs) / h):.1%} of a boot by hand)"
    )
    print(f"  ratio {p / h:.3f} (target <= {TARGET:.2f}): {'met' if p / h <= TARGET else 'NOT met'}")


def main() -> int:
    bundle = build_example("web")
    with Guests(subnet="10.125.0.0/24") as guests:
        work = guests.work
        # One untimed round learns the VM's leased address (it is the same on every later start).
        guests.run("up", str(bundle))
        ip = str(guests.ps()["web"]["ip"])
        config = json.loads((guests.state / "vms" / "web" / "vm-config.runtime.json").read_text())
        guests.run("down", "web")
        # the VM's directory goes with `down`: the hand-started QEMU keeps its files in `work`
        config["serial"] = {"mode": "File", "file": str(work / "hand-serial.log")}
        config["console"] = {"mode": "Socket", "socket": str(work / "hand-console.sock")}
        argv = build_argv(config, qmp_socket=work / "hand.qmp", accel="tcg")
        cfg = NetworkConfig(bridge="pcbench0", subnet="10.125.0.0/24", netns=guests.ns)

        def hand() -> float:
            return by_hand(guests, argv, cfg, ip)

        def up() -> float:
            return via_up(guests, bundle, ip)

        # `up` alone: a fresh interpreter imports the CLI, the core and pyroute2 before the first TAP
        cold = interleaved({"up": up, "hand": hand})
        report("procurator up", cold["up"], cold["hand"])
        # `up` answered by a running worker (as on a host with the NixOS module): the CLI only asks it
        with guests.worker():
            warm = interleaved({"up": up, "hand": hand})
        report("procurator up through a worker", warm["up"], warm["hand"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
