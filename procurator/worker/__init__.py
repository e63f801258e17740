"""The worker daemon, `procurator worker` (docs/architecture.md):

- `daemon.py`  the loop: start-up (sweep, adopt), reconcile triggers (start, profile change, timer, API),
               supervision actions (restart, give up, leave down)
- `exits.py`   how a supervised VM ended (exit status, the backend's `guest_end`) and what is kept of it
- `records.py` the VM records, re-read only when they change
- `probes.py`  the health of running VMs as the worker last saw it (for the status page)
- `views.py`   what the API serves: status, supervision, metrics
- `status.py`  the status page (jinja2 templates in templates/)
- `api.py`     the HTTP API on the UNIX socket, knowing the daemon only as its `Service` protocol
- `client.py`  the API's client, for every command that talks to a running worker
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (mypy treats the name as True)
if TYPE_CHECKING:
    from typing import Any

    from procurator.worker.daemon import Settings, Worker
    from procurator.worker.exits import Exit, observe_exit
    from procurator.worker.records import RecordCache
    from procurator.worker.views import ApplyReport

# Imported on first use: `procurator ps` reads a running worker through worker/client.py and must not
# pay for the daemon's imports (jinja2, the API server), nor for typing's (about 10 ms on a small host).
_LAZY = {
    "Settings": "procurator.worker.daemon",
    "Worker": "procurator.worker.daemon",
    "Exit": "procurator.worker.exits",
    "observe_exit": "procurator.worker.exits",
    "RecordCache": "procurator.worker.records",
    "ApplyReport": "procurator.worker.views",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'procurator.worker' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - see _LAZY

    return getattr(importlib.import_module(module), name)


__all__ = ["ApplyReport", "Exit", "RecordCache", "Settings", "Worker", "observe_exit"]
