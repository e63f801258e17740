"""Apply of GUESTS real QEMU guests (small ones, --parallel PARALLEL, --wait healthy): the apply's wall time
against the ideal, the sum of the guests' boot times divided by the parallelism (target: at most 1.2 times).

Run as root: `.venv/bin/python benchmarks/bench_apply_guests.py`. It builds a deployment of GUESTS minimal
guests (nix/minimal, 1 vCPU, 128 MiB, an HTTP check of /health) and applies it with QEMU (TCG) in a
network namespace it creates and deletes. A guest's boot time is its action's time in `apply --json`
(from the start of its step to its health check passing), so what the ratio measures is how well the
engine keeps PARALLELISM boots going: a boot is slower with four at once on this 2-core machine than alone,
and the ideal counts it as slow as it was. The wall time runs from invoking `procurator apply` to its
exit (resolving the deployment, the plan, the network, the history included). RUNS applies, each from
nothing (the VMs are removed between runs).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_guests import REPO, Guests, nix_build

GUESTS = int(os.environ.get("BENCH_APPLY_GUESTS", "20"))
PARALLEL = 4
RUNS = int(os.environ.get("BENCH_APPLY_RUNS", "2"))
TARGET = 1.2

DEPLOYMENT = """
let
  minimal = import {repo}/nix/minimal {{ }};
  makeDeployment = import {repo}/nix/make-deployment.nix;
  guest = i: rec {{
    name = "g${{toString i}}";
    value = minimal.mkVm {{
      inherit name;
      vcpus = 1;
      memoryMiB = 128;
      health = [ {{ type = "http"; port = 80; path = "/health"; }} ];
    }};
  }};
in
makeDeployment {{ host = "local"; vms = builtins.listToAttrs (builtins.genList guest {count}); }}
"""


def main() -> int:
    deployment = nix_build("--expr", DEPLOYMENT.format(repo=REPO, count=GUESTS))
    ratios, walls, ideals = [], [], []
    with Guests(subnet="10.127.0.0/24") as guests:
        for _ in range(RUNS):
            started = time.monotonic()
            done = guests.run("apply", str(deployment), "--parallel", str(PARALLEL), "--json", timeout=900)
            wall = time.monotonic() - started
            result = json.loads(done.stdout)
            boots = [a["seconds"] for a in result["actions"] if a["kind"] == "create"]
            if len(boots) != GUESTS or result["failed"]:
                raise SystemExit(f"the apply did not create {GUESTS} guests: {done.stdout}")
            ideal = sum(boots) / PARALLEL
            walls.append(wall)
            ideals.append(ideal)
            ratios.append(wall / ideal)
            print(
                f"  run: wall {wall:.2f} s (apply's own {result['duration']:.2f} s), boots {min(boots):.2f}-"
                f"{max(boots):.2f} s (median {statistics.median(boots):.2f}), ideal {ideal:.2f} s, "
                f"ratio {wall / ideal:.3f}"
            )
            names = sorted(guests.ps())
            guests.run("down", *names, timeout=600)
    ratio = statistics.median(ratios)
    print(
        f"apply of {GUESTS} QEMU guests, --parallel {PARALLEL}, median of {RUNS}: wall "
        f"{statistics.median(walls):.2f} s vs sum of boots / {PARALLEL} {statistics.median(ideals):.2f} s"
    )
    print(f"ratio {ratio:.3f} (target <= {TARGET:.1f}): {'met' if ratio <= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
