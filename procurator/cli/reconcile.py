"""`plan`, `apply`, `history`, `rollback`: make this host run a deployment, and go back to an earlier one.

Exit codes: 0 success (whether or not anything changed), 1 failure (an action failed or was rolled back,
or nothing could be done), 2 usage error. With `--exit-code`, a success that changed something (or, for
`plan`, a plan with something to do) exits 4 instead of 0.
"""

from __future__ import annotations

import click

from procurator import history as deployment_history
from procurator import reconcile
from procurator.cli.context import host, worker
from procurator.cli.render import emit_json, emit_table, note
from procurator.errors import ApplyError, UsageError
from procurator.lifecycle import WaitFor
from procurator.models import Deployment
from procurator.resolve import resolve

EXIT_CHANGED = 4

_WAIT = click.option(
    "--wait",
    type=click.Choice([w.value for w in WaitFor]),
    default=WaitFor.HEALTHY.value,
    show_default=True,
    help="What a started VM must reach: booted (the hypervisor runs it) or healthy (its health checks "
    "pass within their budget; a replacement that does not is rolled back).",
)
_PARALLEL = click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="How many VMs to change at once.",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable fields, see README).")
_EXIT_CODE = click.option(
    "--exit-code", is_flag=True, help=f"Exit {EXIT_CHANGED} instead of 0 when something changed (or would)."
)


def _deployment(ref: str) -> Deployment:
    resolved = resolve(ref)
    if resolved.deployment is None:
        name = resolved.bundle.name if resolved.bundle is not None else "?"
        raise UsageError(
            f"{ref} is the bundle of VM {name!r}, not a deployment; boot a single bundle with "
            f"`procurator up {ref}`, or list it in a deployment (lib.mkDeployment) and apply that"
        )
    return resolved.deployment


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


@click.command()
@click.argument("deployment")
@_JSON
@_EXIT_CODE
@click.pass_context
def plan(ctx: click.Context, deployment: str, as_json: bool, exit_code: bool) -> None:
    """Show what `apply DEPLOYMENT` would do to each VM (and the bundle diff of each replacement)."""
    h = host(ctx)
    d = _deployment(deployment)
    client = worker(h)
    if client is None:
        report = reconcile.PlanReport.of(d, reconcile.make_plan(h, d))
    else:  # the worker owns the VMs: its view of them is the one an apply would act on
        with client:
            report = reconcile.PlanReport.from_json(
                client.plan(d.path), f"GET /plan on {h.config.api_socket}"
            )
    the_plan = report.plan
    if as_json:
        emit_json(report.to_json())
    else:
        for action in the_plan.actions:
            click.echo(action.line())
            if action.diff:
                click.echo(_indent(action.diff))
        note(f"plan: {the_plan.summary()}")
    if exit_code and the_plan.changed:
        ctx.exit(EXIT_CHANGED)


def _finish(
    ctx: click.Context, result: reconcile.ApplyResult, *, as_json: bool, exit_code: bool, what: str
) -> None:
    if as_json:
        emit_json(result.to_json())
    else:
        for line in (r.line for r in result.actions):
            click.echo(line)
    if result.failed:
        failures = [f"{r.action.name} {r.outcome.value}" for r in result.actions if r.outcome.value != "ok"]
        if result.error:
            failures.append(result.error)
        raise ApplyError(f"{what} failed: {'; '.join(failures)}")
    changed = sum(1 for r in result.actions if r.action.changes)
    if result.history is not None:
        recorded = f"; deployment history generation {result.history}"
    elif what == "apply":
        recorded = "; not recorded in the deployment history (only deployments in the Nix store are)"
    else:
        recorded = ""
    how = f"{changed} VM(s) changed" if changed else "no change"
    note(f"{what}: {how} in {result.duration:.1f}s{recorded}")
    if exit_code and result.changed:
        ctx.exit(EXIT_CHANGED)


@click.command()
@click.argument("deployment")
@_PARALLEL
@_WAIT
@_JSON
@_EXIT_CODE
@click.pass_context
def apply(  # noqa: PLR0917 - click passes each option as a parameter
    ctx: click.Context, deployment: str, parallel: int, wait: str, as_json: bool, exit_code: bool
) -> None:
    """Make this host run DEPLOYMENT: create, replace, start and remove VMs; record it in the history.

    When a worker daemon answers on the configured API socket, the apply runs in the worker (which owns
    the VMs' processes; --parallel is then the worker's own setting).
    """
    h = host(ctx)
    d = _deployment(deployment)
    client = worker(h)
    if client is None:
        result = reconcile.apply(h, d, parallel=parallel, wait=WaitFor(wait))
    else:
        note(f"applying through the worker on {h.config.api_socket}")
        with client:
            report = client.apply(d.path, wait=WaitFor(wait))
        if report.get("result") is None:
            raise ApplyError(f"apply failed in the worker: {report.get('error') or 'no result'}")
        result = reconcile.ApplyResult.from_json(report["result"])
    _finish(ctx, result, as_json=as_json, exit_code=exit_code, what="apply")


@click.command()
@click.option("--to", "to", type=click.IntRange(min=1), default=None, help="Generation number (see history).")
@_PARALLEL
@_WAIT
@_JSON
@_EXIT_CODE
@click.pass_context
def rollback(  # noqa: PLR0917 - click passes each option as a parameter
    ctx: click.Context, to: int | None, parallel: int, wait: str, as_json: bool, exit_code: bool
) -> None:
    """Apply an earlier deployment from the history (default: the one before the current one).

    When a worker daemon answers on the configured API socket, the rollback runs in the worker."""
    h = host(ctx)
    client = worker(h)
    if client is None:
        result = reconcile.rollback(h, to=to, parallel=parallel, wait=WaitFor(wait))
    else:
        note(f"rolling back through the worker on {h.config.api_socket}")
        with client:
            result = reconcile.ApplyResult.from_json(client.rollback(to, wait=WaitFor(wait)))
    _finish(ctx, result, as_json=as_json, exit_code=exit_code, what="rollback")


@click.command()
@_JSON
@click.pass_context
def history(ctx: click.Context, as_json: bool) -> None:
    """List the deployments applied on this host (generations of the deployment profile)."""
    read = deployment_history.read(host(ctx).state)
    generations = list(read.generations)
    if as_json:
        emit_json(read.to_json())
        return
    if not generations:
        note("no deployment history yet; `procurator apply` records one")
        return
    emit_table(
        ["GENERATION", "DATE", "DEPLOYMENT", "CURRENT"],
        [[g.number, g.date, g.deployment, "*" if g.current else ""] for g in generations],
    )
