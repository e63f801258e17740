"""Host networking benchmark: Procurator's pyroute2 path against the same steps done with `ip`.

Run as root: `.venv/bin/python benchmarks/bench_network.py`. Everything happens in a network namespace
this script creates and deletes; the host's own interfaces are never touched.

  1. N TAPs created and attached (owner, bridge, alias, up), then deleted.
     Procurator: `attach_vm` of one VM with N interfaces (one session; every TAP measured, created,
     verified), then `detach_vm` (one bulk kernel delete).
     ip: per TAP `ip tuntap add ... user`, `ip link set ... master ... alias ... up`, then `ip link del`
     (no checks at all).
  2. The same, one single-interface VM at a time through the public API (a session per call), which is
     what starting and stopping one VM costs.
  3. 500 TAPs set up through `attach_vm` and torn down by `net_down`.

Deleting a network device makes the kernel wait for an RCU grace period (~20 ms here) whoever asks;
one request deleting many devices waits once. Each figure is the best of three interleaved rounds, to
keep other load on the machine out of the comparison.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procurator import network, process
from procurator.network import NetworkConfig

UID = 1000
N = 100
ONE_BY_ONE = 40
MANY = 500
ROUNDS = 3
TIMEOUT = 30.0


def ip(ns: str, *args: str) -> None:
    process.run(["ip", "-n", ns, *args], timeout=TIMEOUT)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def batch_procurator(cfg: NetworkConfig, n: int) -> tuple[float, float]:
    ids = [f"eth{i}" for i in range(n)]
    setup = timed(lambda: network.attach_vm(cfg, "bench", ids, UID, vcpus=1))
    delete = timed(lambda: network.detach_vm(cfg, "bench"))
    return setup, delete


def _ip_make(ns: str, name: str, alias: str) -> None:
    ip(ns, "tuntap", "add", "dev", name, "mode", "tap", "user", str(UID))
    ip(ns, "link", "set", "dev", name, "master", "procurator0", "alias", alias, "up")


def batch_ip(ns: str, n: int) -> tuple[float, float]:
    names = [f"ipb{i}" for i in range(n)]

    def make_all() -> None:
        for i, name in enumerate(names):
            _ip_make(ns, name, f"procurator:bench:eth{i}")

    def delete_all() -> None:
        for name in names:
            ip(ns, "link", "del", "dev", name)

    return timed(make_all), timed(delete_all)


def single_procurator(cfg: NetworkConfig, n: int) -> tuple[float, float]:
    setup = delete = 0.0
    for i in range(n):
        vm = f"one{i}"
        started = time.perf_counter()
        network.attach_vm(cfg, vm, ["eth0"], UID, vcpus=1)
        setup += time.perf_counter() - started
        started = time.perf_counter()
        network.detach_vm(cfg, vm)
        delete += time.perf_counter() - started
    return setup, delete


def single_ip(ns: str, n: int) -> tuple[float, float]:
    setup = delete = 0.0
    for i in range(n):
        name = f"ipo{i}"
        started = time.perf_counter()
        _ip_make(ns, name, f"procurator:one{i}:eth0")
        setup += time.perf_counter() - started
        started = time.perf_counter()
        ip(ns, "link", "del", "dev", name)
        delete += time.perf_counter() - started
    return setup, delete


def many(cfg: NetworkConfig, vms: int, ifaces: int) -> tuple[float, float]:
    ids = [f"eth{j}" for j in range(ifaces)]
    up = timed(lambda: [network.attach_vm(cfg, f"m{i}", ids, UID, vcpus=1) for i in range(vms)])
    count = len(network.list_taps(cfg))
    if count != vms * ifaces:
        raise SystemExit(f"expected {vms * ifaces} TAPs, found {count}")
    down = timed(lambda: network.net_down(cfg))
    network.net_up(cfg)
    return up, down


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in runs), min(r[1] for r in runs)


def table(title: str, n: int, ours: tuple[float, float], theirs: tuple[float, float]) -> None:
    print(f"{title}: per TAP (ms), best of {ROUNDS}")
    print(f"  {'step':<18}{'procurator':>12}{'ip':>10}{'ip / procurator':>18}")
    rows = (
        ("create + attach", ours[0], theirs[0]),
        ("delete", ours[1], theirs[1]),
        ("whole cycle", ours[0] + ours[1], theirs[0] + theirs[1]),
    )
    for label, p, i in rows:
        print(f"  {label:<18}{p / n * 1000:>12.2f}{i / n * 1000:>10.2f}{i / p:>17.1f}x")


def main() -> int:
    if os.geteuid() != 0:
        print("bench_network: needs root (network namespaces, TAPs)", file=sys.stderr)
        return 1
    ns = f"pcbench-{os.getpid()}-{secrets.token_hex(2)}"
    process.run(["ip", "netns", "add", ns], timeout=TIMEOUT)
    try:
        cfg = NetworkConfig(netns=ns)
        network.net_up(cfg)
        batch_procurator(cfg, 5)  # warm up imports and caches
        batch_ip(ns, 5)

        runs: dict[str, list[tuple[float, float]]] = {"bp": [], "bi": [], "sp": [], "si": []}
        for _ in range(ROUNDS):
            runs["bp"].append(batch_procurator(cfg, N))
            runs["bi"].append(batch_ip(ns, N))
            runs["sp"].append(single_procurator(cfg, ONE_BY_ONE))
            runs["si"].append(single_ip(ns, ONE_BY_ONE))
        table(f"1. {N} TAPs of one VM", N, best(runs["bp"]), best(runs["bi"]))
        table(f"2. {ONE_BY_ONE} one-TAP VMs, a call each", ONE_BY_ONE, best(runs["sp"]), best(runs["si"]))

        print(f"3. {MANY} TAPs set up by attach_vm, torn down by net_down (s)")
        for vms, ifaces in ((MANY, 1), (MANY // 5, 5)):
            up, down = best([many(cfg, vms, ifaces) for _ in range(ROUNDS)])
            print(
                f"  {vms:>3} VMs x {ifaces} interface(s): set up {up:.2f}, torn down {down:.2f}, "
                f"total {up + down:.2f} ({(up + down) / MANY * 1000:.2f} ms per TAP)"
            )
        network.net_down(cfg)
    finally:
        process.run(["ip", "netns", "del", ns], check=False, timeout=TIMEOUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
