"""The Click group and its shared options. Commands live one per module and only parse, call, render."""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from procurator import __version__
from procurator.config import DEFAULT_STATE_DIR


@dataclass(frozen=True)
class Globals:
    state_dir: Path
    state_dir_given: bool  # from --state-dir or PROCURATOR_STATE_DIR (wins over the config file)
    config: Path | None
    debug: bool


# Each command's module is imported only when that command runs (or for --help): `ps` must not pay for
# the imports of `worker` or `deploy` at every start-up.
COMMANDS = {
    "build": "procurator.cli.build:build",
    "plan": "procurator.cli.reconcile:plan",
    "apply": "procurator.cli.reconcile:apply",
    "history": "procurator.cli.reconcile:history",
    "rollback": "procurator.cli.reconcile:rollback",
    "up": "procurator.cli.vms:up",
    "down": "procurator.cli.vms:down",
    "stop": "procurator.cli.vms:stop",
    "start": "procurator.cli.vms:start",
    "pause": "procurator.cli.vms:pause",
    "resume": "procurator.cli.vms:resume",
    "snapshot": "procurator.cli.snapshots:snapshot",
    "restore": "procurator.cli.snapshots:restore",
    "snapshots": "procurator.cli.snapshots:listing",
    "ps": "procurator.cli.ps:ps",
    "logs": "procurator.cli.vms:logs",
    "console": "procurator.cli.vms:console",
    "shutdown": "procurator.cli.vms:shutdown",
    "net": "procurator.cli.net:net",
    "worker": "procurator.cli.worker:worker",
    "deploy": "procurator.cli.deploy:deploy",
    "doctor": "procurator.cli.doctor:doctor",
    "init": "procurator.cli.init:init",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (Click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module, _, attr = COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{COMMANDS[cmd_name]} is not a click command")
            _accept_globals(command)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


def _accept_globals(command: click.Command) -> None:
    """Let `procurator ps --state-dir X` mean `procurator --state-dir X ps`: the global options are
    accepted after the (sub)command too, where it has no option of that name itself."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_globals(sub)
        return
    taken = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for option in _global_options():
        if not set(option.opts) & taken:
            command.params.append(option)


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is None or value is False:
        return
    root = ctx.find_root()
    g: Globals = root.obj
    if param.name == "late_state_dir":
        root.obj = dataclasses.replace(g, state_dir=value, state_dir_given=True)
    elif param.name == "late_config":
        root.obj = dataclasses.replace(g, config=value)
    else:
        root.obj = dataclasses.replace(g, debug=True)


def _global_options() -> list[click.Option]:
    common: dict[str, Any] = {"expose_value": False, "callback": _set_global, "is_eager": True}
    return [
        click.Option(
            ["--state-dir", "late_state_dir"],
            type=click.Path(path_type=Path, file_okay=False),
            help="State directory (as the global option).",
            **common,
        ),
        click.Option(
            ["--config", "late_config"],
            type=click.Path(path_type=Path, dir_okay=False),
            help="Worker configuration JSON (as the global option).",
            **common,
        ),
        click.Option(["--debug", "late_debug"], is_flag=True, help="As the global option.", **common),
    ]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=f"State directory [env PROCURATOR_STATE_DIR; default {DEFAULT_STATE_DIR}].",
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Worker configuration JSON [env PROCURATOR_CONFIG].",
)
@click.option("--debug", is_flag=True, help="Log every command run and show tracebacks.")
@click.version_option(__version__, prog_name="procurator", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, state_dir: Path | None, config: Path | None, debug: bool) -> None:
    """Build microVMs with Nix and run them on this host."""
    env_state = os.environ.get("PROCURATOR_STATE_DIR")
    env_config = os.environ.get("PROCURATOR_CONFIG")
    given = state_dir or (Path(env_state) if env_state else None)
    ctx.obj = Globals(
        state_dir=given or DEFAULT_STATE_DIR,
        state_dir_given=given is not None,
        config=config or (Path(env_config) if env_config else None),
        debug=debug,
    )
