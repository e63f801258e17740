"""The worker's status page: HTML rendered with jinja2 (autoescape on), served by the worker's API.

`GET /` shows every VM (state, generation, IP, uptime, restarts, last exit, health, CPU and memory), the
deployment and its history, and the last apply with each action's outcome and each replace's diff;
`GET /vm/NAME` one VM with the tail of its serial log, which the page follows through
`GET /vm/NAME/log?offset=N` (new bytes as JSON text, never HTML). The page refreshes itself by polling
`GET /status`; it is plain HTML and CSS with a little script, no external asset, readable on a phone.

Actions (restart a VM, apply the desired deployment, roll back) exist only with `statusActions`, as POST
forms carrying the page's CSRF token, and only over the UNIX socket or from a loopback address.
"""

from __future__ import annotations

import functools
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from procurator.errors import UsageError

if TYPE_CHECKING:
    import jinja2

LOG_LINES = 200  # lines of the serial log a VM page starts with
LOG_CHUNK = 64 * 1024  # at most this many new bytes per GET /vm/NAME/log


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return ""
    s = round(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s % 60}s"
    return f"{s}s"


@functools.cache
def _env() -> jinja2.Environment:
    """The templates' environment, made when a page is first asked for: jinja2 costs the daemon
    megabytes of memory, and most workers never serve a page."""
    import jinja2  # noqa: PLC0415 - deferred on purpose, see above

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("procurator.worker", "templates"),
        autoescape=True,  # every value is text: a VM's serial output or name never becomes markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = _duration
    return env


def _template(name: str) -> jinja2.Template:
    return _env().get_template(name)


class Csrf:
    """The token the page's forms carry; one per worker run, compared in constant time."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(32)

    def check(self, form: Mapping[str, list[str]]) -> None:
        given = (form.get("csrf") or [""])[-1]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise UsageError("the form's CSRF token is missing or stale; reload the page and try again")


def parse_form(body: bytes) -> dict[str, list[str]]:
    """An application/x-www-form-urlencoded body."""
    try:
        return parse_qs(body.decode("ascii"), strict_parsing=False, max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"the form is not url-encoded: {exc}") from exc


def _row(vm: Mapping[str, Any], details: Mapping[str, Any], now: float) -> dict[str, Any]:
    """One VM as the templates show it: `ps --json`'s fields and the status page's details; `now` is the
    worker's wall clock, for the age of the last health check."""
    health = details.get("health")
    checked = "" if health is None else f" ({_duration(max(0.0, now - float(health['at'])))} ago)"
    cpu = details.get("cpu_seconds")
    memory = details.get("memory_bytes")
    return {
        **vm,
        "last_exit": details.get("last_exit", ""),
        "health_text": ""
        if health is None
        else ("ok" if health["ok"] else f"failing: {health['detail']}") + checked,
        "health_class": "" if health is None else ("ok" if health["ok"] else "bad"),
        "cpu": "" if cpu is None else f"{cpu:.1f} s",
        "memory": f"{memory / 1048576:.0f} MiB" if memory else "",
    }


def index(status: Mapping[str, Any], history: Mapping[str, Any], *, actions: bool, csrf: str) -> str:
    details = status.get("details", {})
    generations = list(history.get("generations", []))
    now = float(status["worker"]["started_at"]) + float(status["worker"]["uptime"])
    return _template("index.html").render(
        worker=status["worker"],
        vms=[_row(vm, details.get(vm["name"], {}), now) for vm in status["vms"]],
        last_apply=status["worker"].get("last_apply"),
        generations=generations,
        current=next((g for g in generations if g.get("current")), None),
        actions=actions,
        csrf=csrf,
    )


def vm_page(
    vm: Mapping[str, Any],
    details: Mapping[str, Any],
    lines: list[str],
    offset: int,
    *,
    actions: bool,
    csrf: str,
    now: float | None = None,
) -> str:
    when = time.time() if now is None else now
    return _template("vm.html").render(
        vm=_row(vm, details, when), lines=lines, offset=offset, actions=actions, csrf=csrf
    )


def log_since(path: Path, offset: int) -> dict[str, Any]:
    """What the serial log gained since byte `offset`: `{"offset", "text", "reset"}`; `reset` when the log
    was rotated or emptied meanwhile (then `text` is its start), at most LOG_CHUNK bytes at once."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            reset = offset > size
            start = 0 if reset else offset
            f.seek(start)
            data = f.read(LOG_CHUNK)
    except FileNotFoundError:
        return {"offset": 0, "text": "", "reset": offset > 0}
    end = start + len(data)
    if end < size:  # cut at the last whole line, so that a UTF-8 sequence is never split
        cut = data.rfind(b"\n") + 1
        if cut > 0:
            data, end = data[:cut], start + cut
    return {"offset": end, "text": data.decode("utf-8", "replace"), "reset": reset}


def log_json(path: Path, offset: int) -> bytes:
    return (json.dumps(log_since(path, offset)) + "\n").encode()
