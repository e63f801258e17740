"""Fan-out of `procurator deploy`: three hosts in parallel against one host alone, as a ratio of wall
times (target: at most 1.3).

Four fake worker hosts (tests/support/sshhost.py: real sshd in network namespaces of their own, each
with its own Nix store, VMs on the cloud-hypervisor double) and the real CLI from a deployer namespace:

  first    a fresh host: pre-flight, build (cached), `nix copy` of the whole closure, apply creating
           two VMs (web and api)
  change   the same hosts again with web changed: pre-flight, build, copy of the new bundle, apply
           replacing web (stop the old generation, start the new one)

Each is measured with `--on solo` (one host) and `--on p1,p2,p3 --parallel 3` (three hosts at once);
`change` alternates between two releases RUNS times. The deployments are built once beforehand, so the
figures are the deploy's own work, not Nix evaluation of a cold cache.

    .venv/bin/python benchmarks/bench_deploy.py        (as root; BENCH_DEPLOY_RUNS=5 by default)

Exit status 0; the figures are the result.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.sshhost import FakeFleet, HostDecl, fake_fleet

RUNS = int(os.environ.get("BENCH_DEPLOY_RUNS", "5"))
BOOT_DELAY = 2.0  # seconds: a guest that takes as long as a small real VM to boot
TARGET = 1.3
PARALLEL = ("p1", "p2", "p3")
SEQUENTIAL = ("s1", "s2", "s3")  # the same three hosts' work, one host at a time (--parallel 1)
HOSTS = ("solo", *PARALLEL, *SEQUENTIAL)
RELEASES = ('cmdline = "procurator.release=bench-a";', 'cmdline = "procurator.release=bench-b";')


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
    busy: float  # CPU seconds the whole machine spent meanwhile (both sides, and anything else running)


def machine_busy() -> float:
    """CPU seconds the machine has been busy since boot (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(fleet: FakeFleet, hosts: Path, on: str, parallel: int = 3) -> Sample:
    before, busy = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy()
    t0 = time.monotonic()
    done = fleet.deploy(str(hosts), "--on", on, "--parallel", str(parallel), "--json")
    took = time.monotonic() - t0
    after, busy = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy() - busy
    if done.returncode != 0:
        raise SystemExit(f"deploy --on {on} failed ({done.returncode}):\n{done.stderr}")
    results = {h["name"]: h["result"] for h in json.loads(done.stdout)["hosts"]}
    if set(results.values()) != {"deployed"}:
        raise SystemExit(f"deploy --on {on}: expected every host deployed, got {results}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(took, cpu, busy)


def show(label: str, one: list[Sample], three: list[Sample], sequential: list[Sample] | None = None) -> float:
    print(f"  {label}, median of {len(one)}:")
    rows = [("1 host", one), ("3 hosts", three)]
    if sequential:
        rows.append(("3 hosts, --parallel 1", sequential))
    for name, samples in rows:
        wall = statistics.median(s.wall for s in samples)
        cpu = statistics.median(s.cpu for s in samples)
        busy = statistics.median(s.busy / s.wall for s in samples) / (os.cpu_count() or 1)
        runs = " ".join(f"{s.wall:.2f}" for s in samples)
        print(f"    {name + ':':<22} {wall:5.2f} s wall, deployer CPU {cpu:4.2f} s, machine busy {busy:4.0%}")
        print(f"    {'':<22} runs {runs}")
    ratio = statistics.median(s.wall for s in three) / statistics.median(s.wall for s in one)
    print(f"    ratio 3 hosts / 1 host: {ratio:.2f}")
    if sequential:
        seq = statistics.median(s.wall for s in sequential) / statistics.median(s.wall for s in three)
        print(f"    one at a time / in parallel: {seq:.2f}")
    return ratio


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
        files = [hosts_file(fleet, 0), hosts_file(fleet, 1)]
        for f in files:
            prebuild(f)
        first = [timed(fleet, files[0], "solo")], [timed(fleet, files[0], ",".join(PARALLEL))]
        timed(fleet, files[0], ",".join(SEQUENTIAL))
        instant = changes(fleet, files, range(RUNS), sequential=True)
        for host in fleet.hosts.values():
            host.set_env(CHDOUBLE_VALIDATE="0", CHDOUBLE_BOOT_DELAY=str(BOOT_DELAY))
        booting = changes(fleet, files, range(RUNS, 2 * RUNS))[:2]
    print(f"procurator deploy fan-out, {cores} cores; the fake hosts run on this machine too, 2 VMs each")
    show("first deploy (copy the whole closure, create 2 VMs)", *first)
    ratio = show("change one VM (copy its bundle, replace it), the double boots at once", *instant)
    slow = show(f"the same, each VM taking {BOOT_DELAY:g} s to boot", *booting)
    print(f"ratio 3 hosts in parallel / 1 host: {ratio:.2f} (target {TARGET})")
    print(f"  {slow:.2f} with VMs that take {BOOT_DELAY:g} s to boot")
    print("  (machine busy near 100% means the three hosts' own work, here on the same cores, is the limit)")


if __name__ == "__main__":
    main()
