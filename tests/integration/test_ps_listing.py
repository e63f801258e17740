"""`procurator ps` answered by a running worker without Click (cli/listing.py) prints exactly what the
Click command prints, and anything but a plain `ps` goes to the Click command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator import configfile, lifecycle, process
from procurator.cli import listing
from procurator.config import WorkerConfig
from procurator.hypervisor.registry import factory
from procurator.state import StateDir, VmRecord

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    """A worker's API (the daemon's own code, in this process) serving a state directory of three running
    VMs and one damaged record; yields the worker configuration naming its socket and state."""
    from procurator.worker import Settings, Worker, api  # noqa: PLC0415 - only this fixture serves

    state = StateDir(tmp_path / "state")
    pid = os.getpid()
    for i, name in enumerate(["web", "api", "db"]):
        state.save_record(
            VmRecord(name=name, bundle=f"/nix/store/{'a' * 32}-procurator-vm-{name}", generation="a" * 32,
                     backend="cloud-hypervisor", pid=pid, start_time=process.process_start_time(pid) or 0,
                     api_socket=f"{state.root}/vms/{name}/api.sock", vm_dir=f"{state.root}/vms/{name}",
                     ip=f"10.100.0.{i + 2}", started_at=time.time(), last_exit="x" * 80)
        )  # fmt: skip
    (state.vm_dir("bad")).mkdir(parents=True)
    (state.vm_dir("bad") / "record.json").write_text("{not json")
    sock = tmp_path / "api.sock"
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"stateDir": str(state.root), "apiSocket": str(sock)}))
    loaded = WorkerConfig.load(config)  # as the worker loads it: `ps` asks only a worker of this very file
    host = lifecycle.Host(state=state, config=loaded, hypervisors=factory(loaded.hypervisor))
    servers = api.serve(Worker(host, Settings(api_socket=sock)), sock, None)
    try:
        yield config
    finally:
        for server in servers:
            server.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI's `main` in a fresh interpreter; stderr ends with whether Click was imported."""
    code = (
        "import sys\nfrom procurator.cli import main\nrc = main(sys.argv[1:])\n"
        "print('click imported:', 'click' in sys.modules, file=sys.stderr)\nsys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PROCURATOR_STATE_DIR", "PROCURATOR_CONFIG")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _steady(out: str) -> object:
    """The output without the uptimes, which move between two runs (the JSON field, the table column)."""
    if out.startswith("["):
        return [{k: v for k, v in row.items() if k != "uptime"} for row in json.loads(out)]
    return [line.split()[:6] + line.split()[7:] for line in out.splitlines()]


@pytest.mark.parametrize("form", [["ps", "--json"], ["ps"]])
def test_ps_answered_by_the_worker_prints_what_the_click_command_prints(
    served: Path, form: list[str]
) -> None:
    fast = _cli("--config", str(served), *form)
    slow = _cli("--config", str(served), *form, "--debug")  # --debug: the Click command, which asks too
    assert fast.returncode == slow.returncode == 0, fast.stderr + slow.stderr
    assert fast.stderr.endswith("click imported: False\n")
    assert slow.stderr.endswith("click imported: True\n")
    assert _steady(fast.stdout) == _steady(slow.stdout)
    notes = [line for line in fast.stderr.splitlines() if line.startswith("bad: ")]
    assert len(notes) == 1  # the damaged record is reported on stderr, as the Click command does
    assert notes == [line for line in slow.stderr.splitlines() if line.startswith("bad: ")]
    if form == ["ps", "--json"]:
        rows = json.loads(fast.stdout)
        assert [(r["name"], r["state"]) for r in rows] == [
            ("api", "running"), ("bad", "damaged"), ("db", "running"), ("web", "running"),
        ]  # fmt: skip
    else:
        assert fast.stdout.splitlines()[0].split() == [*listing.HEADERS[:-1], "LAST", "EXIT"]
        assert "x" * 57 + "..." in fast.stdout


def test_the_options_after_ps_and_the_environment_count_the_same(served: Path) -> None:
    state = json.loads(served.read_text())["stateDir"]
    wanted = _steady(_cli("--config", str(served), "ps", "--json").stdout)
    for args in (
        ["ps", "--json", "--config", str(served)],
        [f"--config={served}", "ps", "--json", "--state-dir", state],
    ):
        done = _cli(*args)
        assert done.returncode == 0, done.stderr
        assert _steady(done.stdout) == wanted
        assert done.stderr.endswith("click imported: False\n")


def test_a_worker_of_another_state_directory_is_not_asked_and_the_state_is_read_here(
    served: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-state"
    done = _cli("--config", str(served), "--state-dir", str(other), "ps", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert done.stderr.endswith("click imported: False\n")


def test_without_a_worker_ps_prints_what_the_click_command_prints(served: Path) -> None:
    """No worker answers (its socket gone): both read the records and the process table, alike."""
    state = json.loads(served.read_text())["stateDir"]
    served.write_text(json.dumps({"stateDir": state, "apiSocket": str(served.parent / "none.sock")}))
    for form in (["ps", "--json"], ["ps"]):
        fast = _cli("--config", str(served), *form)
        slow = _cli("--config", str(served), *form, "--debug")
        assert fast.returncode == slow.returncode == 0, fast.stderr + slow.stderr
        assert fast.stderr.endswith("click imported: False\n")
        assert _steady(fast.stdout) == _steady(slow.stdout)
        assert len(fast.stdout.splitlines()) > 1
        notes = [line for line in fast.stderr.splitlines() if line.startswith("bad: ")]
        assert len(notes) == 1
        assert notes == [line for line in slow.stderr.splitlines() if line.startswith("bad: ")]


def test_a_configuration_file_changed_since_the_worker_loaded_it_is_read_whole(served: Path) -> None:
    """The first try reads apiSocket and stateDir without config.py's reader, trusting them only for
    the bytes the worker validated (their digest in GET /vms). Bytes changed since are read whole: a now
    invalid file gets the Click command's one-line error, a valid one the worker's listing."""
    original = served.read_text()
    data = json.loads(original)
    served.write_text(json.dumps({**data, "snapshotKeep": 0}))
    done = _cli("--config", str(served), "ps", "--json")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert str(served) in errors[0]
    assert "snapshotKeep" in errors[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert done.stderr.endswith("click imported: True\n")  # the error is the Click command's
    served.write_text(json.dumps(data, indent=4))  # the same settings, other bytes
    done = _cli("--config", str(served), "ps", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 4  # read whole, then listed as the Click command lists
    served.write_text(original)
    assert _cli("--config", str(served), "ps", "--json").stderr.endswith("click imported: False\n")


def test_the_digest_is_of_the_bytes_load_read(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    path.write_bytes(b'{"stateDir": "/srv/p"}')
    loaded = WorkerConfig.load(path)
    assert loaded.digest == configfile.digest(b'{"stateDir": "/srv/p"}')
    assert loaded.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert WorkerConfig().digest is None
    assert WorkerConfig.load(None).digest is None
    assert loaded == WorkerConfig(state_dir=Path("/srv/p"))  # the digest is not a setting


@pytest.mark.parametrize(
    "args",
    [
        ["ps", "--json"],
        ["ps"],
        ["--config", "/x.json", "ps"],
        ["--config=/x.json", "ps", "--state-dir", "/s"],
        ["ps", "--json", "--state-dir=/s", "--config", "/x.json"],
    ],
)
def test_plain_ps_forms_are_recognised(args: list[str]) -> None:
    assert listing.parse(args) is not None


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["logs", "ps"],
        ["ps", "web"],
        ["--json", "ps"],
        ["ps", "--json", "--json"],
        ["ps", "--help"],
        ["ps", "--debug"],
        ["--config", "a", "--config", "b", "ps"],
        ["ps", "--config"],
        ["ps", "--config", "--json"],
        ["ps", "--state-dir="],
        ["ps", "--stat", "x"],
        ["ps", "ps"],
    ],
)
def test_anything_else_goes_to_the_click_command(args: list[str]) -> None:
    assert listing.parse(args) is None
