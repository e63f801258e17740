"""`snapshot`, `restore`, `snapshots`: a VM's state saved and booted again (procurator/snapshots.py)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from procurator import snapshots
from procurator.cli.context import host, vm_commands, vm_names
from procurator.cli.render import emit_json, emit_table, note
from procurator.lifecycle import WaitFor
from procurator.worker.commands import Here, check_name

_DIR = click.Path(file_okay=False, path_type=Path)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size}B"
    value, unit = float(size) / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.option("--to", "to", type=_DIR, default=None, help="Write it to this (new or empty) directory only.")
@click.option(
    "--keep", type=click.IntRange(min=1), default=None, help="Keep this many per VM (default: snapshotKeep)."
)
@click.option("--stay-paused", is_flag=True, help="Leave the guest paused afterwards (resume it yourself).")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot (and what was pruned) as JSON.")
@click.pass_context
def snapshot(  # noqa: PLR0917 - click passes each option as a parameter
    ctx: click.Context, name: str, to: Path | None, keep: int | None, stay_paused: bool, as_json: bool
) -> None:
    """Save a running VM's state (memory, devices): its guest is paused meanwhile, then resumed.

    When a worker daemon answers on the configured API socket, it takes the snapshot (into the state
    directory; one written `--to` a directory of yours is taken here: the worker may not reach it)."""
    h = host(ctx)
    check_name(name)
    if to is not None:
        taken = Here(h).vm_snapshot(name, keep=keep, stay_paused=stay_paused, to=to)
    else:
        with vm_commands(h, "snapshot") as ops:
            taken = ops.vm_snapshot(name, keep=keep, stay_paused=stay_paused)
    if as_json:
        emit_json(taken.doc)
        return
    note(f"{name}: snapshot {taken.id} ({_size(taken.size)}) at {taken.path}")
    for old in taken.pruned:
        note(f"{name}: removed the older snapshot {old}")
    if taken.guest_paused:
        note(f"{name}: the guest stays paused; run `procurator resume {name}`")


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.option("--from", "source", type=_DIR, default=None, help="The snapshot directory (`snapshot --to`).")
@click.option("--id", "ident", default=None, help="Which one (`procurator snapshots NAME`); default newest.")
@click.option("--paused", is_flag=True, help="Leave the restored guest paused.")
@click.option(
    "--wait",
    type=click.Choice([w.value for w in WaitFor]),
    default=WaitFor.BOOTED.value,
    show_default=True,
    help="Return once the VM runs, or is healthy (its health checks pass), or at once (none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the VM afterwards as JSON (as `ps --json`).")
@click.pass_context
def restore(  # noqa: PLR0917 - click passes each option as a parameter
    ctx: click.Context,
    name: str,
    source: Path | None,
    ident: str | None,
    paused: bool,
    wait: str,
    as_json: bool,
) -> None:
    """Boot a stopped VM from a snapshot of its current generation (the newest unless told).

    When a worker daemon answers on the configured API socket, it boots it and supervises it (from the
    state directory's snapshots; one `--from` a directory of yours is restored here)."""
    if source is not None and ident is not None:
        raise click.UsageError("give --from or --id, not both")
    h = host(ctx)
    check_name(name)
    if source is not None:
        restored = Here(h).vm_restore(name, ident=None, paused=paused, wait=WaitFor(wait), source=source)
    else:
        with vm_commands(h, "restore") as ops:
            restored = ops.vm_restore(name, ident=ident, paused=paused, wait=WaitFor(wait))
    if as_json:
        emit_json([restored.vm])
        return
    how = f"pid {restored.pid}{', paused' if paused else ''}"
    note(f"{name}: restored from snapshot {restored.snapshot} ({how})")


@click.command("snapshots")
@click.argument("name", shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON: {schema, vm, snapshots, damaged}.")
@click.pass_context
def listing(ctx: click.Context, name: str, as_json: bool) -> None:
    """List a VM's snapshots, oldest first."""
    h = host(ctx)
    good, bad = snapshots.listing(h.state, name)
    if as_json:
        emit_json(
            {
                "schema": snapshots.SNAPSHOT_SCHEMA,
                "vm": name,
                "snapshots": [s.to_json() for s in good],
                "damaged": [{"path": str(e.path), "problem": e.message} for e in bad],
            }
        )
        return
    rows = [
        [
            s.id,
            s.meta.generation,
            s.meta.backend,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.meta.created)),
            _size(s.meta.size),
        ]
        for s in good
    ]
    emit_table(["ID", "GENERATION", "BACKEND", "CREATED", "SIZE"], rows)
    for error in bad:
        note(f"warning: {error.message}")
