"""`up`, `down`, `stop`, `start`, `ps`, `logs`: VMs on this host."""

from __future__ import annotations

import time
from collections.abc import Callable

import click

from procurator import console as consoles
from procurator import lifecycle, logfiles
from procurator.cli.context import host, vm_names
from procurator.cli.render import emit_json, emit_table, note
from procurator.config import BACKENDS
from procurator.errors import UsageError
from procurator.hypervisor.base import StopResult
from procurator.lifecycle import WaitFor
from procurator.resolve import resolve

FOLLOW_POLL = 0.25


def _how(result: StopResult | None) -> str:
    """How a VM went down, for people: graceful, or the stop ladder's steps."""
    if result is None:
        return "was not running"
    return "graceful" if result.graceful else " -> ".join(result.steps)


def _stopped_json(name: str, result: StopResult | None) -> dict[str, object]:
    """How a VM went down, for `down --json` and `stop --json`."""
    return {
        "name": name,
        "was_running": result is not None,
        "graceful": None if result is None else result.graceful,
        "steps": [] if result is None else list(result.steps),
    }


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
@click.argument("refs", nargs=-1, required=True)
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Override the worker's backend.")
@click.option(
    "--wait",
    type=click.Choice([w.value for w in WaitFor]),
    default=WaitFor.BOOTED.value,
    show_default=True,
    help="booted: the hypervisor runs the guest; healthy: the bundle's health checks pass.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the started VMs as JSON.")
@click.pass_context
def up(ctx: click.Context, refs: tuple[str, ...], backend: str | None, wait: str, as_json: bool) -> None:
    """Build and boot the bundles REF... (a deployment REF boots all of its VMs)."""
    h = host(ctx)
    bundles = []
    for ref in refs:
        resolved = resolve(ref)
        if resolved.bundle is not None:
            bundles.append(resolved.bundle)
        elif resolved.deployment is not None:
            bundles.extend(resolved.deployment.bundles())
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise UsageError(f"two bundles share one VM name in {', '.join(names)}; give each VM its own name")
    started = []
    for bundle in bundles:
        record = lifecycle.up(h, bundle, backend=backend, wait=WaitFor(wait))
        started.append(record)
        note(f"{record.name}: up ({record.backend}, pid {record.pid}, ip {record.ip or '-'})")
    if as_json:
        emit_json([s.to_json() for s in lifecycle.status(h) if s.record.name in names])


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--purge", is_flag=True, help="Also delete the VM's volumes and release its IP lease.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done to each VM as a JSON array.")
@click.pass_context
def down(ctx: click.Context, names: tuple[str, ...], purge: bool, as_json: bool) -> None:
    """Stop VMs gracefully and remove them from this host."""
    h = host(ctx)
    done = []
    for name in names:
        result = lifecycle.down(h, name, purge=purge)
        done.append({**_stopped_json(name, result), "purged": purge})
        if not as_json:
            note(f"{name}: down ({_how(result)}){' and purged' if purge else ''}")
    if as_json:
        emit_json(done)


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print what was done to each VM as a JSON array.")
@click.pass_context
def stop(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Stop VMs but keep them (record, lease, volumes) for `start`."""
    h = host(ctx)
    done = []
    for name in names:
        result = lifecycle.stop(h, name)
        done.append(_stopped_json(name, result))
        if not as_json:
            note(f"{name}: stopped ({'graceful' if result is None or result.graceful else 'forced'})")
    if as_json:
        emit_json(done)


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option(
    "--wait",
    type=click.Choice([w.value for w in WaitFor]),
    default=WaitFor.BOOTED.value,
    show_default=True,
    help="Return once each VM is booted, or healthy (its health checks pass), or at once (none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the started VMs as JSON (as `ps --json`).")
@click.pass_context
def start(ctx: click.Context, names: tuple[str, ...], wait: str, as_json: bool) -> None:
    """Boot stopped VMs again (same generation, lease and volumes)."""
    h = host(ctx)
    for name in names:
        record = lifecycle.start(h, name, wait=WaitFor(wait))
        if not as_json:
            note(f"{name}: started (pid {record.pid})")
    if as_json:
        emit_json([s.to_json() for s in lifecycle.status(h) if s.record.name in names])


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print the VMs afterwards as JSON (as `ps --json`).")
@click.pass_context
def pause(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Pause running VMs' guests (their vCPUs stop; memory, devices and network stay)."""
    _pause_or_resume(ctx, names, as_json, lifecycle.pause, "paused")


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print the VMs afterwards as JSON (as `ps --json`).")
@click.pass_context
def resume(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Run paused VMs' guests again."""
    _pause_or_resume(ctx, names, as_json, lifecycle.resume, "resumed")


def _pause_or_resume(
    ctx: click.Context,
    names: tuple[str, ...],
    as_json: bool,
    act: Callable[[lifecycle.Host, str], bool],
    done: str,
) -> None:
    h = host(ctx)
    for name in names:
        changed = act(h, name)
        if not as_json:
            note(f"{name}: {done}" if changed else f"{name}: already {done}; nothing to do")
    if as_json:
        emit_json([s.to_json() for s in lifecycle.status(h) if s.record.name in names])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (stable fields, see README).")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List the VMs on this host."""
    statuses, damaged = lifecycle.listing(host(ctx))
    rows = sorted(
        [s.to_json() for s in statuses] + [lifecycle.damaged_json(d) for d in damaged],
        key=lambda row: str(row["name"]),
    )
    for bad in damaged:
        note(f"{bad.name}: {bad.error}")
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
                _fmt_exit(j["last_exit"]),
            ]
            for j in rows
        ],
    )


def _fmt_exit(text: str | None, width: int = 60) -> str:
    """The last exit in one table cell: `ps --json` has it whole."""
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 3] + "..."


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.option("-n", "lines", type=click.IntRange(min=0), default=50, show_default=True, help="Lines to show.")
@click.option("-f", "follow", is_flag=True, help="Keep printing new output until interrupted (Ctrl-C).")
@click.pass_context
def logs(ctx: click.Context, name: str, lines: int, follow: bool) -> None:
    """Show a VM's serial console output."""
    h = host(ctx)
    path = lifecycle.serial_log(h, name)
    for line in logfiles.tail(path, lines):
        click.echo(line)
    if not follow:
        return
    with open(path, "rb") as f:
        f.seek(0, 2)
        checked = time.monotonic()
        while True:  # until Ctrl-C, or until the VM stops running (checked once a second)
            chunk = f.read()
            if chunk:
                click.echo(chunk.decode("utf-8", "replace"), nl=False)
                continue
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                states = {s.record.name: s.status for s in lifecycle.status(h)}
                if states.get(name) is not lifecycle.Status.RUNNING:
                    note(f"{name} is no longer running")
                    return
            time.sleep(FOLLOW_POLL)


@click.command()
@click.argument("name", shell_complete=vm_names)
@click.option(
    "--quiet-after",
    type=float,
    default=1.0,
    show_default=True,
    help="Not a terminal: stop once the guest is quiet this long after the end of input.",
)
@click.option(
    "--limit",
    type=float,
    default=30.0,
    show_default=True,
    help="Not a terminal: stop after this many seconds in all.",
)
@click.pass_context
def console(ctx: click.Context, name: str, quiet_after: float, limit: float) -> None:
    """Attach to a VM's interactive console (virtio console, hvc0). Detach with Ctrl-]."""
    path = lifecycle.console_path(host(ctx), name)
    note(f"connected to {name}'s console; detach with {consoles.DETACH_NAME}")
    consoles.attach(path, name, quiet=quiet_after, limit=limit)
    note(f"\r\ndetached from {name}")


@click.command()
@click.option(
    "--parallel", type=click.IntRange(min=1), default=8, show_default=True, help="VMs stopped at once."
)
@click.pass_context
def shutdown(ctx: click.Context, parallel: int) -> None:
    """Stop every running VM gracefully for a host shutdown; the worker boots them again at start."""
    results = lifecycle.shutdown_all(host(ctx), parallel=parallel)
    for name, result in sorted(results.items()):
        note(f"{name}: shut down ({_how(result)})")
    if not results:
        note("no VM was running")
