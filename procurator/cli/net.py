"""`procurator net up|down|status`: the host side of VM networking."""

from __future__ import annotations

import click

from procurator import lifecycle, network
from procurator.cli.context import host
from procurator.cli.render import emit_json, emit_table, note
from procurator.errors import ConflictError


def _render(status: network.NetStatus, as_json: bool) -> None:
    if as_json:
        emit_json(status.to_json())
        return
    b = status.bridge
    where = f" in netns {status.netns}" if status.netns else ""
    state = ("up" if b.up else "down") if b.present else "absent"
    click.echo(f"bridge {b.name}{where}: {state} {' '.join(b.addresses)}".rstrip())
    n = status.nat
    nat = (
        f"masquerade out of {n.uplink}" if n.masquerade else ("forwarding only" if n.table_present else "off")
    )
    click.echo(f"nat: {nat} (ip_forward {'on' if n.ip_forward else 'off'})")
    if status.taps:
        emit_table(
            ["TAP", "VM", "IFACE", "MAC", "MASTER", "UP"],
            [[t.name, t.vm, t.iface, t.mac, t.master, "yes" if t.up else "no"] for t in status.taps],
        )


@click.group()
def net() -> None:
    """The bridge, TAPs and NAT that VMs use."""


@net.command("up")
@click.option("--json", "as_json", is_flag=True, help="Print the network status as JSON.")
@click.pass_context
def net_up(ctx: click.Context, as_json: bool) -> None:
    """Create the bridge (and NAT when an uplink is configured); idempotent."""
    h = host(ctx)
    with h.state.lock():
        _render(network.net_up(h.net), as_json)


@net.command("down")
@click.option("--force", is_flag=True, help="Tear down even while VMs are running (they lose their network).")
@click.option("--json", "as_json", is_flag=True, help="Print the network status as JSON.")
@click.pass_context
def net_down(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Remove the bridge, the NAT table and every Procurator TAP."""
    h = host(ctx)
    with h.state.lock():
        running = [s.record.name for s in lifecycle.status(h) if s.status is lifecycle.Status.RUNNING]
        if running and not force:
            raise ConflictError(
                f"VMs still running: {', '.join(running)}; `procurator down` them first or pass --force"
            )
        status = network.net_down(h.net)
    if not as_json:
        note(f"network down: bridge {h.net.bridge}, NAT and TAPs removed")
    _render(status, as_json)


@net.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the network status as JSON.")
@click.pass_context
def net_status(ctx: click.Context, as_json: bool) -> None:
    """Show the bridge, NAT and TAPs."""
    _render(network.net_status(host(ctx).net), as_json)
