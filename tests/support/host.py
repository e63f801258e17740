"""A throwaway Procurator host for tests: state dir, worker config in a private network namespace, and
the real `procurator` CLI run against it, plus observers that list what is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import PROCURATOR
from tests.support.netns import Netns, throwaway_netns

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class VmHost:
    root: Path
    ns: Netns
    config: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "worker.json"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PROCURATOR_STATE_DIR": str(self.state),
            "PROCURATOR_CONFIG": str(self.config_path),
            **extra,
        }

    def run(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PROCURATOR), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env(**env),
        )

    def ok(self, *args: str, timeout: float = 180, **env: str) -> str:
        done = self.run(*args, timeout=timeout, **env)
        assert done.returncode == 0, f"procurator {' '.join(args)} failed:\n{done.stderr}"
        return done.stdout

    def ps(self) -> dict[str, dict[str, Any]]:
        return {vm["name"]: vm for vm in json.loads(self.ok("ps", "--json"))}

    def processes(self) -> list[str]:
        """Command lines of live processes that mention this host's state directory, serial keepers aside."""
        return [p for p in processes_mentioning(str(self.root)) if SERIAL_KEEPER not in p]

    def keepers(self) -> list[str]:
        """Command lines of the live serial keepers of this host's VMs (one per cloud-hypervisor VM)."""
        return [p for p in processes_mentioning(str(self.root)) if SERIAL_KEEPER in p]

    def taps(self) -> set[str]:
        return {n for n in self.ns.link_names() if n.startswith("pc-")}

    def leftovers(self) -> dict[str, Any]:
        vms = sorted(p.name for p in (self.state / "vms").iterdir()) if (self.state / "vms").exists() else []
        sockets = sorted(str(p) for p in self.state.rglob("*.sock")) if self.state.exists() else []
        return {
            "processes": self.processes() + self.keepers(),
            "taps": sorted(self.taps()),
            "vms": vms,
            "sockets": sockets,
        }


SERIAL_KEEPER = "procurator.serial_keeper"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose command line contains `text`."""
    return [cmdline for _, cmdline in _live_processes(text)]


def pids_mentioning(text: str) -> list[int]:
    return [pid for pid, _ in _live_processes(text)]


def _live_processes(text: str) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry.name), cmdline.strip()))
    return found


@pytest.fixture
def vm_host(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[VmHost]:
    """A host in its own namespace. Parametrise with indirect=True to pass config overrides."""
    overrides: dict[str, Any] = getattr(request, "param", {}) or {}
    with contextlib.ExitStack() as stack:
        if "user" in overrides or "vmUsers" in overrides:  # an unprivileged hypervisor reaches its state
            tmp_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="procurator-test-")))
            tmp_path.chmod(0o755)
        yield from _host(tmp_path, overrides)


def _host(tmp_path: Path, overrides: dict[str, Any]) -> Iterator[VmHost]:
    with throwaway_netns("pch") as ns:
        config: dict[str, Any] = {
            "hypervisor": {"backend": "qemu", "accel": "tcg"},
            "network": {"bridge": "pcbr0", "subnet": "10.124.0.0/24", "netns": ns.name},
        }
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        host = VmHost(tmp_path, ns, config)
        host.config_path.write_text(json.dumps(config))
        try:
            yield host
        finally:
            for name in host.ps() if host.state.exists() else {}:
                host.run("down", "--purge", name)
