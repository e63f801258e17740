"""Build the core's Host from the global options, once per command; find the worker that answers for
it; complete VM names."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.shell_completion import CompletionItem

from procurator.cli.paths import where
from procurator.config import WorkerConfig
from procurator.errors import ProcuratorError
from procurator.lifecycle import Host
from procurator.state import DEFAULT_STATE_DIR, StateDir

if TYPE_CHECKING:
    from procurator.worker.client import WorkerClient
    from procurator.worker.commands import Commands

log = logging.getLogger("procurator.cli")


def host(ctx: click.Context) -> Host:
    return Host.of(*where(ctx))


def worker(h: Host) -> WorkerClient | None:
    """A client of the worker daemon on the configured API socket, if one answers (else the command runs
    here)."""
    from procurator.worker import client  # noqa: PLC0415 - httpx only when a worker may be asked

    return client.connect(h.config.api_socket)


@contextlib.contextmanager
def vm_commands(h: Host, what: str) -> Iterator[Commands]:
    """Where the VM commands run: through the worker when one answers (it supervises the VMs, so it does
    what changes them, under its own lock), else in this process. Both print the same."""
    from procurator.worker import commands  # noqa: PLC0415 - as `worker`

    client = worker(h)
    if client is None:
        yield commands.Here(h)
        return
    log.info("%s through the worker on %s", what, h.config.api_socket)
    with client:
        yield commands.Routed(client, commands.Here(h), str(h.config.api_socket))


def vm_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Shell completion of a VM name: the VM directories of this host's state directory.

    At completion time no command runs (Click parses resiliently), so the state directory is found
    from the parsed global options, the environment and the worker configuration here.
    """
    del param
    root = ctx.find_root()
    env_state = os.environ.get("PROCURATOR_STATE_DIR")
    env_config = os.environ.get("PROCURATOR_CONFIG")
    given = root.params.get("state_dir") or (Path(env_state) if env_state else None)
    try:
        if given is None:
            config_path = root.params.get("config") or (Path(env_config) if env_config else None)
            given = WorkerConfig.load(config_path).state_dir
        vms = StateDir(given or DEFAULT_STATE_DIR).vms_dir
        names = sorted(entry.name for entry in vms.iterdir() if entry.is_dir())
    except (OSError, ProcuratorError):
        return []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]
