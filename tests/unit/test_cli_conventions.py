"""CLI conventions: --version, shell completion (installed from share/completions, VM names from the
state directory), global options after the subcommand, help text on every option, exit codes."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import click
import pytest

from procurator.cli.app import cli
from tests.support.cli import PROCURATOR

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`procurator ARGS` with state directory `state` (which it may create: always under tmp_path)."""
    base = {"PATH": "/usr/bin:/bin", "PROCURATOR_STATE_DIR": str(state)}
    return subprocess.run(
        [str(PROCURATOR), *args], capture_output=True, text=True, timeout=60, check=False, env={**base, **env}
    )


def test_version(tmp_path: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = run("--version", state=tmp_path)
    assert (done.returncode, done.stdout) == (0, f"procurator {version}\n")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_installed_completion_scripts_are_current(shell: str, tmp_path: Path) -> None:
    done = run(_PROCURATOR_COMPLETE=f"{shell}_source", state=tmp_path)
    assert done.returncode == 0
    assert (REPO / "share" / "completions" / f"procurator.{shell}").read_text() == done.stdout, (
        "regenerate: _PROCURATOR_COMPLETE={shell}_source procurator > share/completions/procurator.{shell}"
    )


@pytest.mark.parametrize("command", ["logs", "console", "down", "stop", "start"])
def test_vm_names_complete_from_the_state_directory(command: str, tmp_path: Path) -> None:
    for name in ("web", "api", "db"):
        (tmp_path / "vms" / name).mkdir(parents=True)
    done = run(_PROCURATOR_COMPLETE="bash_complete", COMP_WORDS=f"procurator {command} ", COMP_CWORD="2",
               state=tmp_path)  # fmt: skip
    assert done.stdout.split() == ["plain,api", "plain,db", "plain,web"]
    other = tmp_path / "other"
    (other / "vms" / "x1").mkdir(parents=True)
    done = run(_PROCURATOR_COMPLETE="bash_complete", COMP_WORDS=f"procurator --state-dir {other} {command} x",
               COMP_CWORD="4", state=tmp_path)  # fmt: skip
    assert done.stdout.split() == ["plain,x1"]


def test_global_options_after_the_subcommand(tmp_path: Path) -> None:
    (tmp_path / "vms").mkdir()
    before = run("--state-dir", str(tmp_path), "ps", "--json", state=tmp_path / "unused")
    after = run("ps", "--json", "--state-dir", str(tmp_path / "nothing-here"), state=tmp_path / "unused")
    assert (before.returncode, json.loads(before.stdout)) == (0, [])
    assert (after.returncode, json.loads(after.stdout)) == (0, [])
    config = tmp_path / "worker.json"
    config.write_text("{not json")
    done = run("ps", "--config", str(config), state=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {config}: cannot read the worker configuration")


def options_without_help(command: click.Command, path: str) -> list[str]:
    ctx = click.Context(cli)
    if isinstance(command, click.Group):
        return [
            found
            for name in command.list_commands(ctx)
            for found in options_without_help(command.get_command(ctx, name) or command, f"{path} {name}")
        ]
    return [f"{path} {p.opts}" for p in command.params if isinstance(p, click.Option) and not p.help]


def test_every_option_has_help_text() -> None:
    assert options_without_help(cli, "procurator") == []


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("down", "--purge", "ghost"), 0),  # nothing to remove: done
        (("down", "ghost"), 1),  # no such VM
        (("ps",), 0),  # a state directory that does not exist has no VMs
        (("ps", "--bogus"), 2),
        (("down",), 2),
        (("logs",), 2),
        (("start", "--wait", "forever", "web"), 2),
        (("net", "up", "--bogus"), 2),
        (("nosuchcommand",), 2),
    ],
)
def test_one_exit_code_per_kind_of_outcome(args: tuple[str, ...], code: int, tmp_path: Path) -> None:
    done = run(*args, state=tmp_path / "state")
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr


def test_down_json(tmp_path: Path) -> None:
    done = run("down", "--purge", "--json", "ghost", state=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"name": "ghost", "was_running": False, "graceful": None, "steps": [], "purged": True}
    ]
