"""`worker`: the daemon that reconciles this host, supervises its VMs and serves the API."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path
from types import FrameType

import click

from procurator.cli.app import Globals
from procurator.cli.context import host
from procurator.lifecycle import WaitFor
from procurator.supervision import DEFAULT_INTERVAL, DEFAULT_POLL, Limits


@click.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Worker configuration JSON (same as the global --config).",
)
@click.option(
    "--api-socket",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Serve the API on this UNIX socket [default: the configuration's apiSocket].",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    default=None,
    help="Also serve /metrics over TCP here [default: the configuration's metricsListen].",
)
@click.option(
    "--status-listen",
    metavar="HOST:PORT",
    default=None,
    help="Also serve the status page over TCP here [default: the configuration's statusListen].",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_INTERVAL,
    show_default=True,
    help="Seconds between timer reconciles.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.05),
    default=DEFAULT_POLL,
    show_default=True,
    help="Seconds between supervision passes (how soon a crash is noticed).",
)
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True, help="Actions at once.")
@click.option(
    "--wait",
    type=click.Choice([w.value for w in WaitFor]),
    default=WaitFor.HEALTHY.value,
    show_default=True,
    help="What reconciles wait for after booting a VM.",
)
@click.option(
    "--crash-window",
    type=click.FloatRange(min=1.0),
    default=Limits.window,
    show_default=True,
    help="maxRestarts restarts within this many seconds make a crash loop (the VM is marked failed).",
)
@click.option(
    "--max-backoff",
    type=click.FloatRange(min=0.0),
    default=Limits.max_backoff,
    show_default=True,
    help="Cap of the exponential restart backoff, in seconds.",
)
@click.pass_context
def worker(  # noqa: PLR0917 - one parameter per option, as Click passes them
    ctx: click.Context,
    config: Path | None,
    api_socket: Path | None,
    metrics_listen: str | None,
    status_listen: str | None,
    interval: float,
    poll: float,
    parallel: int,
    wait: str,
    crash_window: float,
    max_backoff: float,
) -> None:
    """Run the worker daemon until SIGTERM: reconcile on start, on a new deployment and on a timer,
    restart crashed VMs by their policy, serve the API. Stopping it leaves the VMs running."""
    root = ctx.find_root()
    g: Globals = root.obj
    if config is not None:
        root.obj = dataclasses.replace(g, config=config)
    h = host(ctx)
    if not g.debug:
        logging.getLogger("procurator").setLevel(logging.INFO)
    from procurator.worker import Settings, Worker  # noqa: PLC0415 - the daemon's imports only for it

    settings = Settings(
        api_socket=api_socket or h.config.api_socket,
        metrics_listen=metrics_listen or h.config.metrics_listen,
        status_listen=status_listen or h.config.status_listen,
        status_actions=h.config.status_actions,
        interval=interval,
        poll=poll,
        limits=Limits(window=crash_window, max_backoff=max_backoff),
        parallel=parallel,
        wait=WaitFor(wait),
        watchdog=h.config.watchdog,
    )
    daemon = Worker(h, settings)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        daemon.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
