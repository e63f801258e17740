"""The deploy of many hosts: pre-flight every host, then build, copy and apply host by host, a bounded
number at a time (see the package's docstring)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from procurator.deploy.fleet import Fleet, FleetRef, HostSpec
from procurator.deploy.host import HostRun
from procurator.deploy.model import (
    DeployResult,
    Event,
    HostResult,
    Options,
    Phase,
    Progress,
    Result,
    Stage,
    ignore,
)
from procurator.deploy.pool import Bounded
from procurator.deploy.remote import HostFailedError, Remote, preflight
from procurator.errors import ProcuratorError, UsageError
from procurator.models import Deployment

PREFLIGHT_PARALLEL = 16  # pre-flight checks at once (at least; --parallel if higher)
CONTROL_EXIT_TIMEOUT = 10.0  # seconds for `ssh -O exit` (local: it talks to the master's socket)
CONTROL_PATH_MAX = 100  # a UNIX socket path has room for 107 bytes; %C adds 40 to the directory

log = logging.getLogger("procurator.deploy")


def deploy(
    fleet: Fleet,
    hosts: Sequence[HostSpec],
    options: Options,
    *,
    progress: Progress = ignore,
    stop: threading.Event | None = None,
) -> DeployResult:
    """Deploy (or with `options.dry_run`, plan) `hosts` of `fleet`. Never raises for a host's failure:
    each host's outcome is in the result, in the order of `hosts`."""
    if options.parallel < 1:
        raise UsageError(f"parallel must be at least 1, got {options.parallel}")
    if options.wait not in ("booted", "healthy"):
        raise UsageError(f"wait must be booted or healthy, got {options.wait!r}")
    in_flight: set[str] = set()
    with _shared_connections(hosts, options, in_flight) as control_dir:
        return _deploy(fleet, hosts, options, progress, stop or threading.Event(), control_dir, in_flight)


@contextlib.contextmanager
def _shared_connections(
    hosts: Sequence[HostSpec], options: Options, in_flight: set[str]
) -> Iterator[Path | None]:
    """A private directory for the ssh connections shared per host (ControlPath), closed at the end
    (`ssh -O exit`) except those of hosts still applying when the deploy stopped waiting (`in_flight`):
    closing those would cut their apply off. None when sharing is off or the path would be too long."""
    if not options.share_connections:
        yield None
        return
    control_dir = Path(tempfile.mkdtemp(prefix="procurator-ssh-"))
    if len(str(control_dir)) + 41 > CONTROL_PATH_MAX:
        control_dir.rmdir()
        yield None
        return
    try:
        yield control_dir
    finally:
        if any(control_dir.iterdir()):

            def close(host: HostSpec) -> None:
                try:
                    Remote(host, options.connect_timeout, control_dir).close_shared(CONTROL_EXIT_TIMEOUT)
                except ProcuratorError as exc:
                    log.warning("%s: closing the shared ssh connection: %s", host.name, exc)

            # All at once (bounded): each is a round trip to its master, and the deploy ends after them.
            idle = [h for h in hosts if h.name not in in_flight]
            Bounded(idle, close, lambda h: h.name, PREFLIGHT_PARALLEL, threading.Event()).wait()
        shutil.rmtree(control_dir, ignore_errors=True)


def _build_together(
    fleet: Fleet, hosts: Sequence[HostSpec], stop: threading.Event, progress: Progress
) -> tuple[dict[str, Path], bool]:
    """Every host's deployment built by one `nix build`, so the fleet is evaluated once and not once per
    host: the deployments by host name, and whether the deploy was interrupted meanwhile (the terminal's
    Ctrl-C reaches nix too). Empty for a single host, when that build fails (then each host builds its
    own and a failure stays with its host), or when the outputs do not name each host once (they are
    matched by the host each deployment names, not by nix's order). The build runs on a pool thread, so
    that a Ctrl-C finds this thread waiting, as it finds the hosts' own builds."""
    if len(hosts) < 2 or stop.is_set():
        return {}, False
    for host in hosts:
        progress(Event(host.name, Phase.BUILDING, fleet.ref.deployment_attr(host.name)))

    def build(ref: FleetRef) -> dict[str, Path]:
        try:
            paths = ref.build_all([("hosts", h.name, "deployment") for h in hosts])
            deployments = [Deployment.load(p) for p in paths]
        except ProcuratorError as exc:
            log.info("building the hosts' deployments together failed, each builds its own: %s", exc)
            return {}
        by_host = {d.host: d.path for d in deployments}
        if len(by_host) != len(deployments) or set(by_host) != {h.name for h in hosts}:
            log.info("the deployments built together do not name each host once: each builds its own")
            return {}
        return by_host

    batch = Bounded([fleet.ref], build, lambda _ref: "build", 1, stop)
    batch.wait()
    if batch.interrupted:
        return {}, True
    built = batch.done.get("build", {})
    for name in built:  # until its turn to copy
        progress(Event(name, Phase.WAITING, "built"))
    return built, False


def _deploy(  # noqa: PLR0917 - the private body of deploy()
    fleet: Fleet,
    hosts: Sequence[HostSpec],
    options: Options,
    progress: Progress,
    stop: threading.Event,
    control_dir: Path | None,
    in_flight: set[str],
) -> DeployResult:
    started = time.monotonic()
    results: dict[str, HostResult] = {}

    def finish(result: HostResult) -> HostResult:
        progress(Event(result.name, Phase.DONE, result.result.value, result))
        return result

    for host in hosts:
        progress(Event(host.name, Phase.QUEUED))

    # 1. Pre-flight, every host at once (bounded), before any build.
    def check(host: HostSpec) -> bool:
        progress(Event(host.name, Phase.CHECKING, host.target))
        t0 = time.monotonic()
        try:
            preflight(host, options.connect_timeout, control_dir)
        except HostFailedError as exc:
            took = time.monotonic() - t0
            results[host.name] = finish(
                HostResult(host.name, host.target, exc.result, exc.stage, exc.message, duration=took)
            )
            return False
        progress(Event(host.name, Phase.WAITING, "reachable"))
        return True

    first = Bounded(hosts, check, lambda h: h.name, max(options.parallel, PREFLIGHT_PARALLEL), stop)
    first.wait()
    interrupted = first.interrupted

    # 2. Per host: build, copy, apply (or plan), `parallel` at a time, in the order given.
    if not interrupted:
        reachable = [h for h in hosts if first.done.get(h.name)]
        built, interrupted = _build_together(fleet, reachable, stop, progress)
        for host in reachable if interrupted else ():
            results[host.name] = finish(
                HostResult(
                    host.name,
                    host.target,
                    Result.INTERRUPTED,
                    Stage.BUILD,
                    "interrupted while building; host unchanged",
                    duration=time.monotonic() - started,
                )
            )

        def run(host: HostSpec) -> HostResult:
            one = HostRun(fleet.ref, host, options, stop, progress, control_dir, built=built.get(host.name))
            return finish(one.run())

        second = Bounded([] if interrupted else reachable, run, lambda h: h.name, options.parallel, stop)
        second.wait()
        results.update(second.done)
        interrupted = interrupted or second.interrupted
        in_flight.update(second.running)
        for name in sorted(second.running):
            results[name] = finish(
                HostResult(
                    name,
                    fleet.hosts[name].target,
                    Result.INTERRUPTED,
                    error="still in flight when the deploy stopped waiting; a remote apply may still run "
                    "there: check `procurator history` and `procurator ps` on the host",
                    duration=time.monotonic() - started,
                )
            )
    for host in hosts:
        if host.name not in results:
            results[host.name] = finish(
                HostResult(host.name, host.target, Result.SKIPPED, error="interrupted before its turn")
            )
    return DeployResult(
        ref=fleet.ref.ref,
        dry_run=options.dry_run,
        hosts=tuple(results[h.name] for h in hosts),
        duration=time.monotonic() - started,
        interrupted=interrupted,
    )
