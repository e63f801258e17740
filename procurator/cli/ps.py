"""`procurator ps`: as a running worker of this state directory lists the VMs (one request on its socket,
without the imports of the rest of the tool), else from the records and the process table."""

from __future__ import annotations

import click

from procurator.cli import listing
from procurator.cli.paths import where
from procurator.cli.render import note


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (stable fields, see README).")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List the VMs on this host (as its running worker lists them, if one answers)."""
    out, notes = listing.render(listing.listed(*where(ctx)), as_json)
    for line in notes:
        note(line)
    click.echo(out)
