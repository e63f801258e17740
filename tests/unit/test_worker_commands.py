"""The VM commands' documents (worker/commands.py) as they cross the worker's socket, their names, and how
an error answer becomes the command's own error (worker/client.py `CommandError`)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from procurator.errors import EXIT_FAILURE, EXIT_USAGE, ValidationError, WorkerApiError
from procurator.hypervisor.base import StopResult
from procurator.worker.api import _route
from procurator.worker.client import CommandError
from procurator.worker.commands import (
    Commands,
    Here,
    Restored,
    Routed,
    Snapshotted,
    Started,
    Stopped,
    check_name,
    check_snapshot_id,
)

ROW: dict[str, Any] = {"name": "web", "state": "running", "backend": "qemu", "pid": 42, "ip": "10.0.0.2"}
SNAP: dict[str, Any] = {"id": "20261204T013632.123456Z", "path": "/var/lib/procurator/snapshots/web/x",
                        "schema": 1, "vm": "web", "size": 4096, "guest_paused": False,
                        "pruned": ["old"]}  # fmt: skip


def test_stopped_rows_are_the_stop_and_down_rows_and_survive_the_socket() -> None:
    graceful = Stopped.of("web", StopResult(graceful=True, steps=("power-button",)))
    assert graceful.row() == {"name": "web", "was_running": True, "graceful": True, "steps": ["power-button"]}
    assert graceful.how == "graceful"
    forced = Stopped.of("web", StopResult(graceful=False, steps=("power-button", "SIGKILL")), purged=True)
    assert forced.row()["purged"] is True
    assert forced.how == "power-button -> SIGKILL"
    idle = Stopped.of("web", None, purged=False)
    assert idle.row() == {"name": "web", "was_running": False, "graceful": None, "steps": [], "purged": False}
    assert idle.how == "was not running"
    for stopped in (graceful, forced, idle):
        assert stopped.to_json()["schema"] == 1
        assert Stopped.from_json(stopped.to_json(), "test") == stopped


def test_started_snapshotted_and_restored_survive_the_socket() -> None:
    started = Started(ROW, changed=False)
    assert Started.from_json(started.to_json(), "test") == started
    assert started.pid == 42
    assert Started({**ROW, "pid": None}).pid is None
    taken = Snapshotted._of(SNAP, "test")
    assert Snapshotted.from_json(taken.to_json(), "test") == taken
    assert (taken.id, taken.size, taken.pruned) == (SNAP["id"], 4096, ("old",))
    restored = Restored(ROW, SNAP["id"])
    assert Restored.from_json(restored.to_json(), "test") == restored


@pytest.mark.parametrize(
    ("kind", "doc", "field"),
    [
        (Stopped, {"name": "web", "was_running": True, "graceful": True, "steps": []}, "schema"),
        (Stopped, {"schema": 2, "name": "web", "was_running": True, "graceful": True, "steps": []}, "schema"),
        (
            Stopped,
            {"schema": 1, "name": "web", "was_running": "yes", "graceful": True, "steps": []},
            "was_running",
        ),
        (Stopped, {"schema": 1, "name": "web", "was_running": True, "graceful": 1, "steps": []}, "graceful"),
        (Stopped, {"schema": 1, "name": "web", "was_running": True, "graceful": None, "steps": [3]}, "steps"),
        (Started, {"schema": 1, "changed": True}, "vm"),
        (Started, {"schema": 1, "changed": True, "vm": {**ROW, "name": 3}}, "vm.name"),
        (Started, {"schema": 1, "changed": True, "vm": {**ROW, "pid": "42"}}, "vm.pid"),
        (Started, {"schema": 1, "vm": ROW}, "changed"),
        (Snapshotted, {"schema": 1, "snapshot": {**SNAP, "size": "4k"}}, "snapshot.size"),
        (Snapshotted, {"schema": 1, "snapshot": {**SNAP, "pruned": [1]}}, "snapshot.pruned"),
        (Restored, {"schema": 1, "vm": ROW}, "snapshot"),
    ],
)
def test_a_wrong_document_names_its_field(kind: Any, doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        kind.from_json(doc, "POST /vm/web/x on /run/procurator/api.sock")
    assert caught.value.field == field
    assert caught.value.source == "POST /vm/web/x on /run/procurator/api.sock"
    assert "\n" not in str(caught.value)


def test_a_list_is_no_document() -> None:
    with pytest.raises(ValidationError, match="expected an object, found list"):
        Stopped.from_json([], "test")


@pytest.mark.parametrize("name", ["web", "a", "db-1", "x" * 20])
def test_names_that_are_vm_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Web", "a_b", "../vms/web", "-web", "web-", "x" * 21, "a/b", "web\0"])
def test_names_that_are_not_are_a_usage_error(name: str) -> None:
    with pytest.raises(Exception, match="not a DNS label of at most 20 characters") as caught:
        check_name(name)
    assert getattr(caught.value, "exit_code", None) == EXIT_USAGE


@pytest.mark.parametrize("ident", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_snapshot_ids_that_are_no_ids(ident: str) -> None:
    with pytest.raises(Exception, match="not an id that `procurator snapshots NAME` lists"):
        check_snapshot_id(ident)


def test_vm_routes() -> None:
    assert _route("/vm/web/stop") == ("/vm/*/stop", "web")
    assert _route("/vm/web/restore") == ("/vm/*/restore", "web")
    assert _route("/vm/..%2Fx/down") == ("/vm/*/down", "../x")  # the handler refuses the name
    assert _route("/vm/web/reboot") == ("/vm/web/reboot", "")  # no such route: 404
    assert _route("/vm/web/stop/now") == ("/vm/web/stop/now", "")


@pytest.mark.parametrize(
    ("kind", "code"),
    [("NotFoundError", EXIT_FAILURE), ("ConflictError", EXIT_FAILURE), ("UsageError", EXIT_USAGE),
     ("ValidationError", EXIT_FAILURE), ("InternalError", EXIT_FAILURE), ("", EXIT_FAILURE)],
)  # fmt: skip
def test_an_error_answer_is_the_commands_own(kind: str, code: int) -> None:
    answer = WorkerApiError("POST /vm/ghost/stop", 404, "no VM named 'ghost' on this host", kind=kind)
    assert answer.message == "worker: POST /vm/ghost/stop: no VM named 'ghost' on this host"
    error = CommandError(answer)
    assert error.message == "no VM named 'ghost' on this host"
    assert error.exit_code == code
    assert (error.status, error.kind) == (404, kind)


class _Asked:
    """One side of `Routed` that answers `vm_stop` with `answer` (or raises it), counting the calls."""

    def __init__(self, answer: Stopped | Exception) -> None:
        self.answer = answer
        self.calls = 0
        self.names: list[str] = []

    def vm_stop(self, name: str) -> Stopped:
        self.calls += 1
        self.names.append(name)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _routed(worker: _Asked, here: _Asked) -> Routed:
    return Routed(cast("Commands", worker), cast("Here", here), "/run/procurator/api.sock")


def test_a_worker_without_the_route_leaves_the_command_to_be_done_here() -> None:
    done = Stopped("web", True, True, ("power-button",))
    old = WorkerApiError("POST /vm/web/stop", 404, "no such endpoint '/vm/web/stop'", kind="NotFound")
    worker, here = _Asked(CommandError(old)), _Asked(done)
    assert _routed(worker, here).vm_stop("web") == done
    assert (worker.names, here.names) == (["web"], ["web"])


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, "NotFoundError"), (409, "ConflictError"), (503, "Stopping"), (500, "InternalError")],
)
def test_a_worker_that_refuses_is_not_asked_around(status: int, kind: str) -> None:
    refused = CommandError(WorkerApiError("POST /vm/web/stop", status, "no", kind=kind))
    worker, here = _Asked(refused), _Asked(Stopped("web", False, None, ()))
    with pytest.raises(CommandError) as caught:
        _routed(worker, here).vm_stop("web")
    assert caught.value is refused
    assert (worker.calls, here.calls) == (1, 0)
