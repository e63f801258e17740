"""`procurator ps`: as a running worker of this state directory lists the VMs (one request on its socket,
without the imports of the rest of the tool), else from the records and the process table."""

from __future__ import annotations

import click

from procurator.cli.paths import where
from procurator.cli.render import emit_json, emit_table, note
from procurator.worker import client as worker_client

DAMAGED = "damaged"  # lifecycle.DAMAGED, the state of a VM whose record cannot be read


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


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
    rows.sort(key=lambda row: str(row["name"]))
    for row in rows:
        if row["state"] == DAMAGED:
            note(f"{row['name']}: {row['problem']}")
    if as_json:
        emit_json(rows)
        return
    emit_table(
        ["NAME", "STATE", "GENERATION", "BACKEND", "IP", "PID", "UPTIME", "RESTARTS", "LAST EXIT"],
        [
            [
                j["name"],
                j["state"],
                (j["generation"] or "-")[:12],
                j["backend"] or "-",
                j["ip"],
                j["pid"],
                _fmt_uptime(j["uptime"]),
                "-" if j["restarts"] is None else j["restarts"],
                _fmt_exit(j.get("last_exit")),
            ]
            for j in rows
        ],
    )


def _fmt_exit(text: str | None, width: int = 60) -> str:
    """The last exit in one table cell: `ps --json` has it whole."""
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 3] + "..."
