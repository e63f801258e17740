"""VmRecord.parse's one-pass check (`state._well_formed`) against its Reader: for every variant of a record
(each field given each kind of value), whatever the one-pass check accepts the Reader accepts too, as the
same record; whatever it passes on, the Reader accepts or refuses with its own message."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from procurator import state
from procurator.errors import ValidationError
from procurator.state import RECORD_SCHEMA, VmRecord

GOOD: dict[str, Any] = {
    "schema": RECORD_SCHEMA,
    "name": "web",
    "bundle": "/nix/store/aaaa-procurator-vm-web",
    "generation": "aaaa",
    "backend": "qemu",
    "pid": 4242,
    "start_time": 99,
    "api_socket": "/var/lib/procurator/vms/web/api.sock",
    "vm_dir": "/var/lib/procurator/vms/web",
    "taps": ["pc-web-1a2b"],
    "ip": "10.0.0.2",
    "netns": None,
    "created_at": 1.5,
    "restarts": 0,
    "desired": "running",
    "paused": False,
    "uid": 70000,
}
VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2**63, 1.5, -0.5, float("inf"), float("nan"), "", "x", "running",
    [], ["a"], [1], ["a", None], {}, {"a": 1},
]  # fmt: skip


def variants() -> list[dict[str, Any]]:
    out = [dict(GOOD)]
    keys = [*GOOD, "last_exit", "slot", "shutdown_timeout", "resume_from", "unknown"]
    for key, value in itertools.product(keys, VALUES):
        out.append({**GOOD, key: value})
    for key in GOOD:
        out.append({k: v for k, v in GOOD.items() if k != key})
    return out


def _passes_on(data: Any) -> dict[str, Any] | None:
    del data
    return None


def slow(data: dict[str, Any], directory: str | None) -> VmRecord:
    original = state._well_formed
    state._well_formed = _passes_on
    try:
        return VmRecord.parse("record.json", data, directory=directory)
    finally:
        state._well_formed = original


@pytest.mark.parametrize("directory", [None, "web", "api"])
def test_the_one_pass_check_accepts_nothing_the_reader_refuses(directory: str | None) -> None:
    fast_accepted = 0
    for data in variants():
        fast = state._well_formed(data)
        try:
            expected: VmRecord | ValidationError = slow(data, directory)
        except ValidationError as exc:
            expected = exc
        if fast is not None:
            fast_accepted += 1
            if directory in (None, fast["name"]):
                assert expected == VmRecord(**fast), data
        got: VmRecord | ValidationError
        try:
            got = VmRecord.parse("record.json", data, directory=directory)
        except ValidationError as exc:
            got = exc
        if isinstance(expected, ValidationError):
            assert isinstance(got, ValidationError), data
            assert str(got) == str(expected), data
        else:
            assert got == expected, data
    assert fast_accepted > 50  # the one-pass check does take the common records
