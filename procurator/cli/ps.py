"""`procurator ps`: as a running worker of this state directory lists the VMs (one request on its socket,
without the imports of the rest of the tool), else from the records and the process table."""

from __future__ import annotations

import click

from procurator.cli import listing
from procurator.cli.paths import where
from procurator.cli.render import note
from procurator.worker import client as worker_client


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (stable fields, see README).")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List the VMs on this host (as its running worker lists them, if one answers)."""
    config, state_dir = where(ctx)
    rows = worker_client.listing(config.api_socket, state_dir)
    if rows is None:  # no worker: read the records and the process table here
        from procurator import lifecycle  # noqa: PLC0415 - not needed when a worker answers
        from procurator.cli.context import host  # noqa: PLC0415

        statuses, damaged = lifecycle.listing(host(ctx))
        rows = [s.to_json() for s in statuses] + [lifecycle.damaged_json(d) for d in damaged]
    out, notes = listing.render(rows, as_json)
    for line in notes:
        note(line)
    click.echo(out)
