"""Fan-out of `procurator deploy`: three hosts in parallel against one host alone, as a ratio of the
deployer's own critical path (target: at most 1.3), with the plain ratio of wall times beside it.

Four fake worker hosts (tests/support/sshhost.py: real sshd in network namespaces of their own, each
with its own Nix store, VMs on the cloud-hypervisor double) and the real CLI from a deployer namespace:

  first    a fresh host: pre-flight, build (cached), `nix copy` of the whole closure, apply creating
           two VMs (web and api)
  change   the same hosts again with web changed: pre-flight, build, copy of the new bundle, apply
           replacing web (stop the old generation, start the new one)

Each is measured with `--on solo` (one host) and `--on p1,p2,p3 --parallel 3` (three hosts at once);
`first` resets the hosts (no VMs, no state, an empty store) before each of its RUNS runs, `change`
alternates between two releases RUNS times. The deployments are built once beforehand, so the figures
are the deploy's own work, not Nix evaluation of a cold cache.

The fake hosts share this machine's cores with the deployer, so three hosts applying at once slow each
other (and the deployer) down in a way three real machines would not. Beside the wall time, each run
is split by the deploy's own progress lines (stderr, one per change of a host's phase, timestamped as
they arrive): start-up (CLI and the inventory's `nix eval`), pre-flight, build, copy, the remote apply
and the tail (results, closing the shared connections). The deployer's own critical path is the wall
time without the remote applies: the latest moment a host's apply started, plus the tail after the
last one ended. CPU is counted per side: the deployer (`procurator deploy` and everything it ran: nix,
ssh) and the hosts (each host's sshd and everything it ran: `nix-store --serve`, `procurator apply`).
The deployer runs on the first core(s) and the hosts on the last one (CPU affinity, `BENCH_DEPLOY_PIN=0`
turns it off), so that the hosts' work does not take the deployer's CPU, as on separate machines; the
three hosts still share their one core (their side of the ssh handshake and of `nix copy`, and their
applies, which the deployer's own path leaves out).

    .venv/bin/python benchmarks/bench_deploy.py        (as root; BENCH_DEPLOY_RUNS=5 by default)

Exit status 0; the figures are the result.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.sshhost import FakeFleet, HostDecl, SshHost, fake_fleet, remove_tree

RUNS = int(os.environ.get("BENCH_DEPLOY_RUNS", "5"))
PIN = os.environ.get("BENCH_DEPLOY_PIN", "1") != "0" and (os.cpu_count() or 1) > 1
CORES = sorted(os.sched_getaffinity(0))
DEPLOYER_CORES, HOST_CORES = (CORES[:-1], CORES[-1:]) if PIN else (CORES, CORES)
BOOT_DELAY = 2.0  # seconds: a guest that takes as long as a small real VM to boot
TARGET = 1.3
PARALLEL = ("p1", "p2", "p3")
SEQUENTIAL = ("s1", "s2", "s3")  # the same three hosts' work, one host at a time (--parallel 1)
HOSTS = ("solo", *PARALLEL, *SEQUENTIAL)
RELEASES = ('cmdline = "procurator.release=bench-a";', 'cmdline = "procurator.release=bench-b";')
DEPLOY_TIMEOUT = 300.0
SETTLE_TIMEOUT = 10.0  # seconds for a host's sshd to reap its connection after the deploy closed it
# `<host>: <phase> (...)` and `<host>: <result> in 1.2s ...`: the deploy's plain progress lines.
PROGRESS = re.compile(r"^([a-z0-9-]+): (checking|waiting|building|copying|applying|[a-z-]+ in )")


def hosts_file(fleet: FakeFleet, release: int) -> Path:
    decls = {n: HostDecl(FakeFleet.example(n, web=RELEASES[release])) for n in HOSTS}
    return fleet.write_hosts(decls, f"release-{release}.nix")


def prebuild(path: Path) -> None:
    argv = ["nix-build", str(path), "--no-out-link"]
    for name in HOSTS:
        argv += ["-A", f"hosts.{name}.deployment"]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds, the whole `procurator deploy`
    cpu: float  # CPU seconds of the deploying side: procurator deploy, its ssh clients and nix
    host_cpu: float  # CPU seconds of the hosts deployed to: their sshd and all it ran
    busy: float  # CPU seconds the whole machine spent meanwhile (both sides, and anything else running)
    steps: dict[str, float]  # seconds per step (the slowest host's, for per-host steps)
    own: float  # the deployer's own critical path: the wall time without the remote applies


STEPS = ("start-up", "pre-flight", "build", "copy", "apply (remote)", "tail")


def machine_busy() -> float:
    """CPU seconds the machine has been busy since boot (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def host_cpu(host: SshHost) -> float:
    """CPU seconds of a host's sshd and every process it ran and reaped (proc(5): utime, stime, cutime,
    cstime). Waits (bounded) until sshd has reaped the deploy's connection, which ends a moment after
    the deploy closed it."""
    assert host.sshd is not None
    pid = host.sshd.pid
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while Path(f"/proc/{pid}/task/{pid}/children").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.02)
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def steps_of(lines: list[tuple[float, str]], t0: float, t_end: float) -> tuple[dict[str, float], float]:
    """Seconds per step from the timestamped progress lines, and the deployer's own critical path."""
    seen: dict[str, dict[str, float]] = {}
    for when, line in lines:
        match = PROGRESS.match(line)
        if match:
            phase = "done" if match[2].endswith(" in ") else match[2]
            if phase == "waiting" and line.endswith("(built)"):  # built with the others, until its turn
                phase = "built"
            seen.setdefault(match[1], {}).setdefault(phase, when)
    hosts = seen.values()

    def slowest(start: str, end: str) -> float:
        return max(h[end] - h[start] for h in hosts)

    last_done = max(h["done"] for h in hosts)
    steps = {
        "start-up": min(h["checking"] for h in hosts) - t0,
        "pre-flight": slowest("checking", "waiting"),
        "build": max(h.get("built", h["copying"]) - h["building"] for h in hosts),
        "copy": slowest("copying", "applying"),
        "apply (remote)": slowest("applying", "done"),
        "tail": t_end - last_done,
    }
    own = max(h["applying"] for h in hosts) - t0 + steps["tail"]
    return steps, own


def timed(fleet: FakeFleet, hosts: Path, on: str, parallel: int = 3) -> Sample:
    targets = [fleet.hosts[name] for name in on.split(",")]
    argv = fleet.deploy_argv(str(hosts), "--on", on, "--parallel", str(parallel), "--json")
    argv = ["taskset", "--cpu-list", ",".join(map(str, DEPLOYER_CORES)), *argv]
    lines: list[tuple[float, str]] = []
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hosts0, busy0 = sum(host_cpu(h) for h in targets), machine_busy()
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        stderr = proc.stderr

        def read_progress() -> None:
            for line in stderr:
                lines.append((time.monotonic(), line.rstrip("\n")))

        reader = threading.Thread(target=read_progress, daemon=True)
        reader.start()
        out = proc.stdout.read()
        code = proc.wait(DEPLOY_TIMEOUT)
        t_end = time.monotonic()
        reader.join(DEPLOY_TIMEOUT)
    cpu1, busy = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy() - busy0
    if code != 0:
        raise SystemExit(f"deploy --on {on} failed ({code}):\n" + "\n".join(line for _, line in lines))
    results = {h["name"]: h["result"] for h in json.loads(out)["hosts"]}
    if set(results.values()) != {"deployed"}:
        raise SystemExit(f"deploy --on {on}: expected every host deployed, got {results}")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    steps, own = steps_of(lines, t0, t_end)
    return Sample(t_end - t0, cpu, sum(host_cpu(h) for h in targets) - hosts0, busy, steps, own)


def reset(fleet: FakeFleet, names: tuple[str, ...]) -> None:
    """Put hosts back as they were before their first deploy: no VMs, no state, an empty /nix."""
    for name in names:
        host = fleet.hosts[name]
        for vm in host.ps():
            host.ok("down", "--purge", vm)
        shutil.rmtree(host.state, ignore_errors=True)
        for sub in (host.root / "nix" / "store", host.root / "nix" / "var" / "nix"):
            for entry in list(sub.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    remove_tree(entry)
                else:
                    entry.unlink()


def median(values: list[float]) -> float:
    return statistics.median(values)


def show(label: str, one: list[Sample], three: list[Sample], sequential: list[Sample] | None = None) -> float:
    """Print the samples' medians; return the ratio of the deployer's own critical paths."""
    print(f"  {label}, median of {len(one)}:")
    rows = [("1 host", one), ("3 hosts", three)]
    if sequential:
        rows.append(("3 hosts, --parallel 1", sequential))
    for name, samples in rows:
        wall = median([s.wall for s in samples])
        cpu = median([s.cpu for s in samples])
        hcpu = median([s.host_cpu for s in samples])
        busy = median([s.busy / s.wall for s in samples]) / (os.cpu_count() or 1)
        runs = " ".join(f"{s.wall:.2f}" for s in samples)
        print(
            f"    {name + ':':<22} {wall:5.2f} s wall, own path {median([s.own for s in samples]):4.2f} s, "
            f"CPU deployer {cpu:4.2f} s, hosts {hcpu:4.2f} s, machine busy {busy:4.0%}"
        )
        steps = ", ".join(f"{k} {median([s.steps[k] for s in samples]):.2f}" for k in STEPS)
        print(f"    {'':<22} steps (s): {steps}")
        print(f"    {'':<22} runs {runs}")
    wall_ratio = median([s.wall for s in three]) / median([s.wall for s in one])
    ratio = median([s.own for s in three]) / median([s.own for s in one])
    print(f"    ratio 3 hosts / 1 host: deployer's own path {ratio:.2f}, wall {wall_ratio:.2f}")
    if sequential:
        seq = median([s.wall for s in sequential]) / median([s.wall for s in three])
        print(f"    one at a time / in parallel: {seq:.2f}")
    return ratio


def verdict(what: str, ratio: float) -> None:
    met = "met" if ratio <= TARGET else "NOT met"
    print(f"{what}: {ratio:.2f}, target <= {TARGET}: {met} (ratio {ratio / TARGET:.2f})")


def changes(
    fleet: FakeFleet, files: list[Path], runs: range, *, sequential: bool = False
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Alternate the releases (release 0 is deployed before run 0): every deploy replaces web."""
    one, three, seq = [], [], []
    for run in runs:
        hosts = files[(run + 1) % 2]
        one.append(timed(fleet, hosts, "solo"))
        three.append(timed(fleet, hosts, ",".join(PARALLEL)))
        if sequential:
            seq.append(timed(fleet, hosts, ",".join(SEQUENTIAL), parallel=1))
    return one, three, seq


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root: network namespaces, mounts and sshd need it")
    cores = os.cpu_count()
    with (
        tempfile.TemporaryDirectory(prefix="procurator-bench-deploy-") as tmp,
        fake_fleet(Path(tmp) / "fleet", dict.fromkeys(HOSTS, "double")) as fleet,
    ):
        for host in fleet.hosts.values():
            # The double's own check of vm.create against the spec (~0.4 s of CPU per VM start, covered
            # by the tests) would make this a benchmark of the double on a small machine.
            host.set_env(CHDOUBLE_VALIDATE="0")
            assert host.sshd is not None
            os.sched_setaffinity(host.sshd.pid, HOST_CORES)  # what sshd starts from now on inherits it
        files = [hosts_file(fleet, 0), hosts_file(fleet, 1)]
        for f in files:
            prebuild(f)
        first: tuple[list[Sample], list[Sample]] = ([], [])
        for run in range(RUNS):
            if run:
                reset(fleet, ("solo", *PARALLEL))
            first[0].append(timed(fleet, files[0], "solo"))
            first[1].append(timed(fleet, files[0], ",".join(PARALLEL)))
        timed(fleet, files[0], ",".join(SEQUENTIAL))
        instant = changes(fleet, files, range(RUNS), sequential=True)
        for host in fleet.hosts.values():
            host.set_env(CHDOUBLE_VALIDATE="0", CHDOUBLE_BOOT_DELAY=str(BOOT_DELAY))
        booting = changes(fleet, files, range(RUNS, 2 * RUNS))[:2]
    print(f"procurator deploy fan-out, {cores} cores; the fake hosts run on this machine too, 2 VMs each")
    if PIN:
        print(f"  the deployer on core(s) {DEPLOYER_CORES}, the hosts on core(s) {HOST_CORES}")
    first_ratio = show("first deploy (copy the whole closure, create 2 VMs)", *first)
    ratio = show("change one VM (copy its bundle, replace it), the double boots at once", *instant)
    slow = show(f"the same, each VM taking {BOOT_DELAY:g} s to boot", *booting)
    print("deployer's own critical path, 3 hosts in parallel / 1 host (the wall time without the remote")
    pinned = "pinned to their own core" if PIN else "unpinned"
    print(f"applies, which run on the hosts' CPU; hosts {pinned}):")
    verdict("  deploy 3 hosts vs 1, first deploy", first_ratio)
    verdict("  deploy 3 hosts vs 1, change one VM", ratio)
    verdict(f"  deploy 3 hosts vs 1, change one VM, {BOOT_DELAY:g} s boots", slow)
    print("  (machine busy near 100%: the CPU, shared with the hosts and all else here, is the limit)")


if __name__ == "__main__":
    main()
