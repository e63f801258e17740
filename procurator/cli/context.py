"""Build the core's Host from the global options, once per command."""

from __future__ import annotations

import click

from procurator.cli.app import Globals
from procurator.config import WorkerConfig
from procurator.hypervisor.registry import factory
from procurator.lifecycle import Host
from procurator.state import StateDir


def host(ctx: click.Context) -> Host:
    g: Globals = ctx.find_root().obj
    config = WorkerConfig.load(g.config)
    state_dir = g.state_dir if g.state_dir_given or config.state_dir is None else config.state_dir
    return Host(state=StateDir(state_dir), config=config, hypervisors=factory(config.hypervisor))
