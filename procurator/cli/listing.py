"""`procurator ps` without Click: its rows as text, from a running worker or from the state.

Click (its import, the command table, parsing) was about a sixth of `ps`'s time when a worker answers,
and some 25 ms of it when none does. `answer(args)` recognises exactly the invocations it can answer as
the Click command would: `ps` or `ps --json`, with the global `--config FILE` and `--state-dir DIR`
(each at most once, before or after `ps`, as `--opt VALUE` or `--opt=VALUE`) and the environment's
PROCURATOR_CONFIG / PROCURATOR_STATE_DIR. A worker of that state directory that loaded the very same
configuration file (by its digest: procurator/configfile.py) is asked first, without even importing
config.py's reader; else the file is read whole and `listed` does what the Click command does (ask the
worker, else read the records and the process table). For anything else (another command, --help,
--debug, an option it does not know, any error, which includes a configuration that does not load) it
returns False and the Click command runs, so every error and every other output stays the Click
command's. Both print through `render` and `listed` below.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # as in procurator/worker/__init__.py: no typing import for `ps`
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from procurator.config import WorkerConfig

DAMAGED = "damaged"  # lifecycle.DAMAGED, the state of a VM whose record cannot be read
HEADERS = ["NAME", "STATE", "GENERATION", "BACKEND", "IP", "PID", "UPTIME", "RESTARTS", "LAST EXIT"]
_VALUED = ("--config", "--state-dir")


def render(rows: list[dict[str, Any]], as_json: bool) -> tuple[str, list[str]]:
    """What `ps` prints: (stdout without its final newline, the lines for stderr)."""
    from procurator.cli.render import json_text, table  # noqa: PLC0415 - render imports click lazily

    rows = sorted(rows, key=lambda row: str(row["name"]))
    notes = [f"{row['name']}: {row['problem']}" for row in rows if row["state"] == DAMAGED]
    if as_json:
        return json_text(rows), notes
    cells = [
        [
            j["name"],
            j["state"],
            (j["generation"] or "-")[:12],
            j["backend"] or "-",
            j["ip"],
            j["pid"],
            _fmt_uptime(j["uptime"]),
            "-" if j["restarts"] is None else j["restarts"],
            _fmt_exit(j.get("last_exit")),
        ]
        for j in rows
    ]
    return table(HEADERS, cells), notes


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fmt_exit(text: str | None, width: int = 60) -> str:
    """The last exit in one table cell: `ps --json` has it whole."""
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 3] + "..."


def parse(args: list[str]) -> tuple[dict[str, str], bool] | None:
    """({"--config": ..., "--state-dir": ...} as given, --json) for a plain `ps`; None for anything else."""
    given: dict[str, str] = {}
    seen_ps = as_json = False
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg == "ps" and not seen_ps:
            seen_ps = True
        elif arg == "--json" and seen_ps and not as_json:
            as_json = True
        elif name in _VALUED and name not in given:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if not value or value.startswith("-"):
                return None
            given[name] = value
        else:
            return None
        i += 1
    return (given, as_json) if seen_ps else None


def answer(args: list[str]) -> bool:
    """Print `ps` if `args` are a plain `ps`: as a running worker that loaded the same configuration file
    lists the VMs, else as the Click command would (the file read whole, then the worker asked or the
    state read here). True if it printed (then exit 0), False when the Click command must run: for
    every error, which the Click command reports."""
    parsed = parse(args)
    if parsed is None:
        return False
    given, as_json = parsed
    from procurator import configfile  # noqa: PLC0415 - only for a plain ps
    from procurator.worker import client  # noqa: PLC0415

    config_arg = given.get("--config") or os.environ.get("PROCURATOR_CONFIG") or None
    state_arg = given.get("--state-dir") or os.environ.get("PROCURATOR_STATE_DIR") or None
    if (config_arg is not None and os.path.isdir(config_arg)) or (
        state_arg is not None and os.path.isfile(state_arg)
    ):
        return False  # Click's path checks say what is wrong
    where = _where(config_arg)
    rows = None
    if where is not None:  # a worker that loaded this very file: its listing
        api_socket, state_dir, digest = where
        state = state_arg or state_dir or configfile.STATE_DIR
        rows = client.listing(api_socket, state, config_digest=digest)
    if rows is None:  # the configuration read whole, and `ps` as the Click command does it
        from pathlib import Path  # noqa: PLC0415 - not when the worker answered

        from procurator.cli import setup_logging  # noqa: PLC0415
        from procurator.config import DEFAULT_STATE_DIR, WorkerConfig  # noqa: PLC0415
        from procurator.errors import ProcuratorError  # noqa: PLC0415

        setup_logging(False)
        try:
            config = WorkerConfig.load(Path(config_arg) if config_arg else None)
            rows = listed(config, Path(state_arg) if state_arg else config.state_dir or DEFAULT_STATE_DIR)
        except ProcuratorError:
            return False  # the Click command says what is wrong, as it says every error
    out, notes = render(rows, as_json)
    for line in notes:
        sys.stderr.write(line + "\n")
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return True


def listed(config: WorkerConfig, state_dir: Path) -> list[dict[str, Any]]:
    """The rows of `ps`: as a running worker of `state_dir` lists them, else read here from the records
    and the process table."""
    from procurator import lifecycle  # noqa: PLC0415 - not when the worker answers
    from procurator.worker import client  # noqa: PLC0415

    rows = client.listing(config.api_socket, state_dir)
    if rows is None:
        statuses, damaged = lifecycle.listing(lifecycle.Host.of(config, state_dir))
        rows = [s.to_json() for s in statuses] + [lifecycle.damaged_json(d) for d in damaged]
    return rows


def _where(config_arg: str | None) -> tuple[str, str | None, str | None] | None:
    """(apiSocket, stateDir or None, the file's configfile.digest) of the configuration at `config_arg`
    (the defaults without one), read without config.py's reader: the worker's answer must then name the
    same digest (procurator/configfile.py), else the file is read whole. None for a file that is not
    even JSON with those keys as strings."""
    from procurator import configfile  # noqa: PLC0415 - see answer

    if config_arg is None:
        return configfile.API_SOCKET, None, None
    try:
        with open(config_arg, "rb") as f:
            raw = f.read(configfile.MAX_BYTES + 1)
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    if len(raw) > configfile.MAX_BYTES or not isinstance(data, dict):
        return None
    api_socket, state_dir = data.get("apiSocket"), data.get("stateDir")
    if not isinstance(api_socket, str | None) or not isinstance(state_dir, str | None):
        return None
    return api_socket or configfile.API_SOCKET, state_dir or None, configfile.digest(raw)
