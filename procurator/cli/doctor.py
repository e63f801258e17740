"""`doctor`: check this host for running VMs, one line per check with its fix; optionally boot one VM."""

from __future__ import annotations

import click

from procurator import doctor as checks
from procurator.cli.context import host
from procurator.cli.render import emit_json
from procurator.errors import ProcuratorError, UsageError
from procurator.resolve import resolve


def _line(check: checks.Check) -> str:
    line = f"{check.status.value:<4}  {check.name:<10}  {check.detail}"
    return (
        f"{line}\n      {'':<10}  fix: {check.fix}"
        if check.fix and check.status is not checks.Status.OK
        else line
    )


@click.command()
@click.option(
    "--vm",
    "ref",
    metavar="REF",
    default=None,
    help="Also boot this bundle end to end (health-checked, then stopped and purged).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema 1).")
@click.pass_context
def doctor(ctx: click.Context, ref: str | None, as_json: bool) -> None:
    """Check that this host can run VMs: KVM, the hypervisor, TAPs, bridge and NAT, nftables, state."""
    h = host(ctx)
    bundle = None
    if ref is not None:
        resolved = resolve(ref)
        if resolved.bundle is None:
            raise UsageError(f"{ref} is a deployment; give `doctor --vm` one VM's bundle")
        bundle = resolved.bundle
    report = checks.run(h, bundle, on_check=None if as_json else lambda c: click.echo(_line(c)))
    if as_json:
        emit_json(report.to_json())
    failed = [c.name for c in report.checks if c.status is checks.Status.FAIL]
    if failed:
        raise ProcuratorError(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
