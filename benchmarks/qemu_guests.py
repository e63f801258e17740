"""What the benchmarks that boot real QEMU guests share: building the example bundles, a network namespace,
a work directory and the environment the `procurator` executable runs in (this checkout's code, a state
directory and a worker configuration of its own), and polling a guest's HTTP port.

Not a benchmark itself (`make bench` runs benchmarks/bench_*.py). Run as root: a bench creates the
namespace and deletes it, with everything in it, when it is done; the host's interfaces are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from procurator import sockets
from procurator.errors import WaitTimeoutError
from procurator.health import wait_healthy
from procurator.models import HealthCheck

REPO = Path(__file__).resolve().parents[1]
PROCURATOR = REPO / ".venv" / "bin" / "procurator"
EXAMPLES = REPO / "examples" / "minimal.nix"


def nix_build(*args: str) -> Path:
    """`nix-build ARGS --no-out-link`: the one store path it prints."""
    out = subprocess.run(
        ["nix-build", *args, "--no-out-link"], capture_output=True, text=True, check=True, timeout=600
    )
    return Path(out.stdout.strip())


def build_example(attr: str = "web", overrides: str | None = None) -> Path:
    """An attribute of examples/minimal.nix (a VM's bundle, or `deployment`), with `overrides` if given."""
    extra = ["--arg", "overrides", overrides] if overrides is not None else []
    return nix_build(str(EXAMPLES), "-A", attr, *extra)


def wait_http(ns: str, ip: str, *, deadline: float = 60.0) -> float:
    """Poll until the guest answers GET /health on port 80 with 200; the monotonic time it did.

    Polled as Procurator's own health waits poll (procurator/health.py: a connect attempt every 50 ms, each
    kept in flight up to 250 ms): a blocking connect whose SYN the guest, still booting, lost would be
    resent only after TCP's one-second retransmission timeout, putting the figure that late."""
    check = HealthCheck(type="http", port=80, path="/health", timeout_seconds=2.0)
    try:
        wait_healthy((check,), ip, ns, timeout=deadline)
    except WaitTimeoutError as exc:
        raise SystemExit(f"the guest at {ip} did not answer GET /health: {exc}") from exc
    return time.monotonic()


class Guests:
    """A namespace, a work directory and a QEMU (TCG) worker configuration for `procurator` commands;
    on exit every VM of its state is removed (`down --purge`), then the namespace and the directory."""

    def __init__(self, bridge: str = "pcbench0", subnet: str = "10.126.0.0/24") -> None:
        self.ns = f"pcbench-{secrets.token_hex(3)}"
        self.bridge = bridge
        self.subnet = subnet
        self.work = Path(tempfile.mkdtemp(prefix="procurator-bench-"))
        self.state = self.work / "state"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),  # this checkout's procurator, whichever the venv was installed from
            "PROCURATOR_STATE_DIR": str(self.state),
            "PROCURATOR_CONFIG": str(self.work / "worker.json"),
        }
        self.api_socket = self.work / "api.sock"  # a worker's, when `worker()` runs one
        (self.work / "worker.json").write_text(
            json.dumps({"hypervisor": {"backend": "qemu", "accel": "tcg"}, "apiSocket": str(self.api_socket),
                        "network": {"bridge": bridge, "subnet": subnet, "netns": self.ns}})
        )  # fmt: skip

    def __enter__(self) -> Guests:
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        vms = self.state / "vms"
        names = sorted({p.name.split("@")[0] for p in vms.iterdir() if p.is_dir()}) if vms.is_dir() else []
        if names:
            subprocess.run([str(PROCURATOR), "down", "--purge", *names], env=self.env, capture_output=True,
                           timeout=300, check=False)  # fmt: skip
        subprocess.run(["ip", "netns", "del", self.ns], timeout=10, check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def argv(self, *args: str) -> list[str]:
        return [str(PROCURATOR), *args]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`procurator ARGS`, its output captured; a failure ends the benchmark with its output."""
        done = subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"procurator {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done

    def popen(
        self, *args: str, stdout: int | None = None, stderr: int | None = None
    ) -> subprocess.Popen[str]:
        """`procurator ARGS` started, not waited for (text streams for any pipe asked for)."""
        return subprocess.Popen(self.argv(*args), env=self.env, text=True, stdout=stdout, stderr=stderr)

    @contextlib.contextmanager
    def worker(self) -> Iterator[subprocess.Popen[str]]:
        """`procurator worker` on this state, answering on `api_socket` (waited for, bounded), stopped
        with SIGTERM after the block; VM commands meanwhile go through it."""
        log = (self.work / "worker.log").open("w")
        daemon = subprocess.Popen(self.argv("worker"), env=self.env, text=True, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while not sockets.answers(self.api_socket):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"procurator worker did not answer:\n{(self.work / 'worker.log').read_text()}"
                    )
                time.sleep(0.05)
            yield daemon
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=10)
            log.close()

    def ps(self) -> dict[str, dict[str, object]]:
        return {vm["name"]: vm for vm in json.loads(self.run("ps", "--json").stdout)}
