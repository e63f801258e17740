"""The worker configuration's `vmUsers` and the allocation of one uid per VM (procurator/vmusers.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from procurator import vmusers
from procurator.config import VmUsers, WorkerConfig
from procurator.errors import ConflictError, ValidationError

RANGE = VmUsers(first=400000, count=3)


def test_parsed_and_exclusive_with_user() -> None:
    parsed = WorkerConfig.parse(
        "w.json", {"vmUsers": {"first": 400000, "count": 1000, "extraGroups": ["kvm"]}}
    )
    assert parsed.vm_users == VmUsers(400000, 1000, ("kvm",))
    assert WorkerConfig.parse("w.json", {}).vm_users is None
    with pytest.raises(ValidationError, match="vmUsers: excludes `user`"):
        WorkerConfig.parse("w.json", {"vmUsers": {"first": 400000, "count": 1}, "user": "nobody"})


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ([400000], "vmUsers", "expected an object"),
        ({"first": 400000}, "vmUsers.count", "expected a count from 1"),
        ({"first": 12, "count": 1}, "vmUsers.first", "expected a uid from 1000"),
        ({"first": 4294967290, "count": 10}, "vmUsers.count", "uids end at 4294967294"),
        ({"first": 400000, "count": 1, "extraGroups": "kvm"}, "vmUsers.extraGroups", "expected a list"),
        ({"first": 400000, "count": 1, "uid": 1}, "vmUsers.uid", "unknown setting"),
    ],
)
def test_bad_ranges_are_refused_naming_the_field(value: object, field: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        WorkerConfig.parse("w.json", {"vmUsers": value})
    assert field in str(caught.value)
    assert problem in str(caught.value)


def test_each_vm_its_own_uid_kept_by_its_record_and_reused_once_free() -> None:
    held = vmusers.Reservations()

    def recorded() -> dict[str, int | None]:
        return {"a": 400001}

    assert vmusers.allocate(RANGE, "a", recorded, held) == 400001  # the record's
    assert vmusers.allocate(RANGE, "b", recorded, held) == 400000  # the lowest free
    assert vmusers.allocate(RANGE, "b", recorded, held) == 400000  # its reservation, again
    assert vmusers.allocate(RANGE, "c", recorded, held) == 400002
    with pytest.raises(ConflictError) as caught:
        vmusers.allocate(RANGE, "d", recorded, held)
    assert str(caught.value) == (
        "no free uid for VM 'd': all 3 of vmUsers 400000-400002 are taken; raise vmUsers.count in the worker "
        "configuration or remove VMs (procurator down NAME)"
    )
    held.release("b")
    assert vmusers.allocate(RANGE, "d", recorded, held) == 400000


def test_a_record_outside_the_range_gets_a_new_uid() -> None:
    held = vmusers.Reservations()
    assert vmusers.allocate(RANGE, "a", lambda: {"a": 1234}, held) == 400000


def test_parallel_starts_never_share_a_uid() -> None:
    held = vmusers.Reservations()
    users = VmUsers(first=500000, count=64)
    got: dict[str, int] = {}

    def start(name: str) -> None:
        got[name] = vmusers.allocate(users, name, dict, held, epoch=1)

    threads = [threading.Thread(target=start, args=(f"vm{i}",)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(got.values()) == list(range(500000, 500064))


def test_take_back_returns_only_what_the_uid_owns(tmp_path: Path) -> None:
    vm_uid = 400123
    (tmp_path / "vol").mkdir()
    mine = tmp_path / "vol" / "data.img"
    mine.write_bytes(b"x")
    other = tmp_path / "vol" / "other.img"
    other.write_bytes(b"y")
    os.chown(tmp_path / "vol", vm_uid, vm_uid)
    os.chown(mine, vm_uid, vm_uid)
    os.chown(other, 400999, 400999)
    assert vmusers.take_back([tmp_path / "vol", tmp_path / "missing"], vm_uid, (0, 0)) == 2
    assert (tmp_path / "vol").stat().st_uid == 0
    assert mine.stat().st_uid == 0
    assert other.stat().st_uid == 400999  # not the VM's: left alone


def test_records_are_read_once_per_hold_of_the_state_lock() -> None:
    held = vmusers.Reservations()
    reads: list[int] = []

    def recorded() -> dict[str, int | None]:
        reads.append(1)
        return {"a": 400000}

    assert vmusers.allocate(RANGE, "b", recorded, held, epoch=7) == 400001
    held.commit("b")  # b's record is written: it holds 400001 now, without a new read
    assert vmusers.allocate(RANGE, "c", recorded, held, epoch=7) == 400002
    assert len(reads) == 1
    held.release("a")  # a went down under the same hold
    assert vmusers.allocate(RANGE, "d", recorded, held, epoch=7) == 400000
    assert len(reads) == 1
    # without the lock the records are read every time: these name none, and only c's and d's are held
    assert vmusers.allocate(RANGE, "e", dict, held) == 400001
    assert len(reads) == 1
    with pytest.raises(ConflictError):  # a new hold reads the records again
        vmusers.allocate(RANGE, "f", lambda: {"x": 400001}, held, epoch=8)
