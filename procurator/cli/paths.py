"""Where this command's host is: its worker configuration and state directory, from the global options.

Kept apart from cli/context.py (which builds the whole Host) so that `ps` answered by a running worker
imports no more than it needs."""

from __future__ import annotations

from pathlib import Path

import click

from procurator.cli.app import Globals
from procurator.config import WorkerConfig


def where(ctx: click.Context) -> tuple[WorkerConfig, Path]:
    """The worker configuration and the state directory (the option, else the configuration's)."""
    g: Globals = ctx.find_root().obj
    config = WorkerConfig.load(g.config)
    state_dir = g.state_dir if g.state_dir_given or config.state_dir is None else config.state_dir
    return config, state_dir
