"""The Click group and its shared options. Commands live one per module and only parse, call, render."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import click

from procurator.state import DEFAULT_STATE_DIR


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
    "ps": "procurator.cli.vms:ps",
    "logs": "procurator.cli.vms:logs",
    "console": "procurator.cli.vms:console",
    "shutdown": "procurator.cli.vms:shutdown",
    "net": "procurator.cli.net:net",
    "worker": "procurator.cli.worker:worker",
    "deploy": "procurator.cli.deploy:deploy",
    "doctor": "procurator.cli.doctor:doctor",
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
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


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
