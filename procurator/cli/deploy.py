"""`procurator deploy [REF]`: build each host's deployment, copy it over SSH and apply it there.

Live status goes to stderr: on a terminal one line per host, rewritten in place; otherwise one plain
line per change. The result goes to stdout: a table (and each host's plan with `--dry-run`), or with
`--json` one JSON document. Exit status: 0 when every host deployed (or planned), 1 when any did not,
2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

import click

from procurator import deploy as core
from procurator.cli.render import emit_json, emit_table, note
from procurator.deploy import Event, HostResult, HostSpec, Phase, Result
from procurator.errors import DeployError, DeployInterruptedError

TICK = 0.5  # seconds between redraws of the live lines on a terminal
_GREEN, _RED, _YELLOW, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[0m"


def _counts(r: HostResult) -> str:
    if r.counts is None:
        return ""
    planned = r.result is Result.PLANNED
    verbs = (
        ("create", "replace", "remove", "start") if planned else ("created", "replaced", "removed", "started")
    )
    numbers = [r.count(k) for k in ("create", "replace", "remove", "start")]
    parts = [f"{n} {v}" for n, v in zip(numbers, verbs, strict=True)]
    return ", ".join(parts[:3] + (parts[3:] if numbers[3] else []))


def _color(result: Result) -> str:
    if result in core.OK_RESULTS:
        return _GREEN
    if result in (Result.SKIPPED, Result.INTERRUPTED, Result.ROLLED_BACK):
        return _YELLOW
    return _RED


class LiveStatus:
    """One status line per host. On a terminal (`tty`) the block is redrawn in place (ANSI: cursor up,
    clear line) every TICK and at each event, and erased on close; otherwise each event is one line."""

    def __init__(self, hosts: list[HostSpec], stream: TextIO, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.names = [h.name for h in hosts]
        self.width = max((len(n) for n in self.names), default=4)
        self.phase: dict[str, Phase] = dict.fromkeys(self.names, Phase.QUEUED)
        self.detail: dict[str, str] = dict.fromkeys(self.names, "")
        self.since: dict[str, float] = {}
        self.result: dict[str, HostResult] = {}
        self._lock = threading.Lock()
        self._drawn = 0
        self._closed = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> LiveStatus:
        if self.tty:
            self._draw()
            self._ticker = threading.Thread(target=self._tick, name="deploy-status", daemon=True)
            self._ticker.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join(2 * TICK)
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write(f"\x1b[{self._drawn}A\x1b[J")
                self.stream.flush()
                self._drawn = 0

    def event(self, e: Event) -> None:
        with self._lock:
            if self._closed.is_set() or e.host not in self.phase:
                return
            self.phase[e.host] = e.phase
            self.detail[e.host] = e.detail
            if e.phase is not Phase.QUEUED:
                self.since.setdefault(e.host, time.monotonic())
            if e.result is not None:
                self.result[e.host] = e.result
            if self.tty:
                self._draw_locked()
            elif e.phase is not Phase.QUEUED:
                self.stream.write(self._plain(e) + "\n")
                self.stream.flush()

    def _plain(self, e: Event) -> str:
        if e.result is not None:
            return f"{e.host}: {self._summary(e.result)}"
        return f"{e.host}: {e.phase.value}" + (f" ({e.detail})" if e.detail else "")

    @staticmethod
    def _summary(r: HostResult) -> str:
        counts = _counts(r)
        text = f"{r.result.value} in {r.duration:.1f}s" + (f" ({counts})" if counts else "")
        return text + (f": {r.error}" if r.error and not r.ok else "")

    def line(self, name: str, now: float) -> str:
        """The live line of one host (without colour)."""
        r = self.result.get(name)
        if r is not None:
            state, seconds, detail = r.result.value, r.duration, _counts(r) or r.error
        else:
            state, detail = self.phase[name].value, self.detail[name]
            seconds = now - self.since[name] if name in self.since else 0.0
        return f"{name:<{self.width}}  {state:<15} {seconds:6.1f}s  {detail}".rstrip()

    def _tick(self) -> None:
        while not self._closed.wait(TICK):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._draw_locked()

    def _draw_locked(self) -> None:
        columns = shutil.get_terminal_size((100, 24)).columns
        now = time.monotonic()
        out = [f"\x1b[{self._drawn}A"] if self._drawn else []
        for name in self.names:
            text = self.line(name, now)[: max(columns - 1, 20)]
            r = self.result.get(name)
            if r is not None:
                text = f"{_color(r.result)}{text}{_RESET}"
            out.append(f"\r\x1b[2K{text}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self.names)


def _plan_lines(r: HostResult) -> list[str]:
    lines = []
    for a in r.plan.plan.actions if r.plan is not None else ():
        lines.append(f"  {a.line()}")
        lines += [f"      {line}" for line in a.diff.splitlines()]
    return lines or ["  (no VMs)"]


def render(result: core.DeployResult) -> None:
    """The table for people (stdout), each host's plan with --dry-run, then failures on stderr."""
    rows = [
        [
            r.name,
            r.result.value,
            r.count("create"),
            r.count("replace"),
            r.count("remove"),
            f"{r.duration:.1f}s",
        ]
        for r in result.hosts
    ]
    heads = ["CREATE", "REPLACE", "REMOVE"] if result.dry_run else ["CREATED", "REPLACED", "REMOVED"]
    emit_table(["HOST", "RESULT", *heads, "DURATION"], rows)
    if result.dry_run:
        for r in result.hosts:
            if r.plan is not None:
                click.echo(f"\n{r.name} ({r.target}):")
                for line in _plan_lines(r):
                    click.echo(line)
    for r in result.failed:
        note(f"{r.name}: {r.result.value}" + (f" at {r.stage.value}" if r.stage else "") + f": {r.error}")


def _fail(result: core.DeployResult) -> None:
    failed = result.failed
    if result.interrupted:
        raise DeployInterruptedError(
            f"interrupted: {', '.join(f'{r.name} ({r.result.value})' for r in result.hosts)}"
        )
    if failed:
        what = "dry run" if result.dry_run else "deploy"
        names = ", ".join(f"{r.name} ({r.result.value})" for r in failed)
        raise DeployError(f"{what} failed on {len(failed)} of {len(result.hosts)} host(s): {names}")


@click.command()
@click.argument("ref", default=".", required=False)
@click.option(
    "--on",
    "on",
    metavar="HOST,@TAG,...",
    help="Only these hosts: names and @tags, comma-separated (default: every host).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Build and copy each deployment, then show each host's plan; no VM changes.",
)
@click.option(
    "--parallel", type=click.IntRange(min=1), default=4, show_default=True, help="Hosts deployed at once."
)
@click.option(
    "--wait",
    type=click.Choice(["booted", "healthy"]),
    default="healthy",
    show_default=True,
    help="What each started VM must reach on its host for the apply to succeed.",
)
@click.option(
    "--substitute-on-destination",
    "-s",
    "substitute",
    is_flag=True,
    help="Let hosts fetch store paths from their own binary caches (nix copy -s).",
)
@click.option(
    "--connect-timeout",
    type=click.IntRange(min=1, max=600),
    default=core.CONNECT_TIMEOUT,
    show_default=True,
    help="Seconds ssh may take to connect.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (per-host results).")
def deploy(  # noqa: PLR0917 - click passes each option as a parameter
    ref: str,
    on: str | None,
    dry_run: bool,
    parallel: int,
    wait: str,
    substitute: bool,
    connect_timeout: int,
    as_json: bool,
) -> None:
    """Deploy the hosts of REF (a lib.mkHosts: FLAKE[#attr], default attr procuratorHosts, or
    FILE.nix[#attr]; default `.`): pre-flight SSH, then per host build, nix copy, apply, roll back
    on failure."""
    fleet = core.Fleet.load(ref)
    hosts = fleet.select(on)
    if not hosts:
        raise DeployError(f"{ref}: the fleet has no hosts")
    options = core.Options(
        dry_run=dry_run,
        parallel=parallel,
        wait=wait,
        substitute_on_destination=substitute,
        connect_timeout=connect_timeout,
    )
    tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    with LiveStatus(hosts, sys.stderr, tty=tty) as live:
        result = core.deploy(fleet, hosts, options, progress=live.event)
    if as_json:
        emit_json(result.to_json())
    else:
        render(result)
    _fail(result)
