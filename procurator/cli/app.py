"""The Click group and its shared options. Commands live one per module and only parse, call, render."""

from __future__ import annotations

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
