"""`up`, `down`, `stop`, `start`, `ps`, `logs`: VMs on this host."""

from __future__ import annotations

import time

import click

from procurator import console as consoles
from procurator import lifecycle, logfiles
from procurator.cli.context import host, vm_commands, vm_names, worker
from procurator.cli.render import emit_json, note
from procurator.config import BACKENDS
from procurator.errors import ConflictError, UsageError
from procurator.hypervisor.base import StopResult
from procurator.lifecycle import WaitFor
from procurator.resolve import resolve
from procurator.worker.commands import Stopped, check_name

FOLLOW_POLL = 0.25


def _how(result: StopResult | None) -> str:
    """How a VM went down, for people: graceful, or the stop ladder's steps."""
    return Stopped.of("", result).how


def _names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names given, each checked before anything is done."""
    for name in names:
        check_name(name)
    return names


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
    """Build and boot the bundles REF... (a deployment REF boots all of its VMs).

    When a worker daemon answers on the configured API socket, it boots them (and supervises them)."""
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
    with vm_commands(h, "up") as ops:
        for bundle in bundles:
            vm = ops.vm_up(bundle, backend=backend, wait=WaitFor(wait)).vm
            note(f"{vm['name']}: up ({vm['backend']}, pid {vm['pid']}, ip {vm['ip'] or '-'})")
        if as_json:
            emit_json(ops.vm_rows(names))


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--purge", is_flag=True, help="Also delete the VM's volumes and release its IP lease.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done to each VM as a JSON array.")
@click.pass_context
def down(ctx: click.Context, names: tuple[str, ...], purge: bool, as_json: bool) -> None:
    """Stop VMs gracefully and remove them from this host (through the worker when one answers)."""
    h = host(ctx)
    done = []
    with vm_commands(h, "down") as ops:
        for name in _names(names):
            stopped = ops.vm_down(name, purge=purge)
            done.append(stopped.row())
            if not as_json:
                note(f"{name}: down ({stopped.how}){' and purged' if purge else ''}")
    if as_json:
        emit_json(done)


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print what was done to each VM as a JSON array.")
@click.pass_context
def stop(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Stop VMs but keep them (record, lease, volumes) for `start`.

    When a worker daemon answers on the configured API socket, it stops them: it does not restart a VM
    stopped this way, whatever its restart policy."""
    h = host(ctx)
    done = []
    with vm_commands(h, "stop") as ops:
        for name in _names(names):
            stopped = ops.vm_stop(name)
            done.append(stopped.row())
            if not as_json:
                note(f"{name}: stopped ({'forced' if stopped.graceful is False else 'graceful'})")
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
    """Boot stopped VMs again (same generation, lease and volumes).

    When a worker daemon answers on the configured API socket, it boots them and supervises them again."""
    h = host(ctx)
    with vm_commands(h, "start") as ops:
        for name in _names(names):
            started = ops.vm_start(name, wait=WaitFor(wait))
            if not as_json:
                note(f"{name}: started (pid {started.pid})")
        if as_json:
            emit_json(ops.vm_rows(names))


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print the VMs afterwards as JSON (as `ps --json`).")
@click.pass_context
def pause(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Pause running VMs' guests (their vCPUs stop; memory, devices and network stay)."""
    _pause_or_resume(ctx, names, as_json, pause=True)


@click.command()
@click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
@click.option("--json", "as_json", is_flag=True, help="Print the VMs afterwards as JSON (as `ps --json`).")
@click.pass_context
def resume(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Run paused VMs' guests again."""
    _pause_or_resume(ctx, names, as_json, pause=False)


def _pause_or_resume(ctx: click.Context, names: tuple[str, ...], as_json: bool, *, pause: bool) -> None:
    done = "paused" if pause else "resumed"
    with vm_commands(host(ctx), "pause" if pause else "resume") as ops:
        for name in _names(names):
            changed = ops.vm_pause(name, pause=pause).changed
            if not as_json:
                note(f"{name}: {done}" if changed else f"{name}: already {done}; nothing to do")
        if as_json:
            emit_json(ops.vm_rows(names))


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
    """Stop every running VM gracefully for a host shutdown; the worker boots them again at start.

    Refused while a worker answers on the configured API socket: it would boot them again at once (the
    NixOS unit runs this after the worker has stopped)."""
    h = host(ctx)
    client = worker(h)
    if client is not None:
        client.close()
        raise ConflictError(
            f"a worker answers on {h.config.api_socket}: it supervises the VMs and boots again what a "
            "shutdown stops; stop it first (systemctl stop procurator-worker), then run `procurator shutdown`"
        )
    results = lifecycle.shutdown_all(h, parallel=parallel)
    for name, result in sorted(results.items()):
        note(f"{name}: shut down ({_how(result)})")
    if not results:
        note("no VM was running")
