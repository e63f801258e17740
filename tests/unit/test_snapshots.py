"""procurator/snapshots.py: the meta reader (every field checked, damage named with its fix), the layout
(made in .partial, renamed when finished, never listed before), and retention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from procurator import snapshots
from procurator.config import WorkerConfig
from procurator.errors import DamagedStateError, NotFoundError, StateError, ValidationError
from procurator.snapshots import SnapshotMeta
from procurator.state import StateDir

GOOD: dict[str, Any] = {
    "schema": 1,
    "vm": "web",
    "bundle": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-procurator-vm-web",
    "generation": "0123456789ab",
    "backend": "qemu",
    "created": 1764812192.5,
    "size": 4096,
    "paused": False,
    "ip": "10.0.0.2",
}


def meta(**changes: Any) -> SnapshotMeta:
    return SnapshotMeta.parse("t", {**GOOD, **changes})


def make(
    state: StateDir, created: float, generation: str = "0123456789ab", **changes: Any
) -> snapshots.Snapshot:
    final = snapshots.new_dir(state, "web", generation, created, None)
    (snapshots.partial_of(final) / snapshots.DATA / "memory.qemu").write_bytes(b"x" * 100)
    return snapshots.finish(final, meta(created=created, generation=generation, **changes))


def test_a_good_meta_round_trips() -> None:
    parsed = SnapshotMeta.parse("t", GOOD)
    assert parsed.to_json() == GOOD
    assert SnapshotMeta.parse("t", {k: v for k, v in GOOD.items() if k != "ip"}).ip == ""


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"schema": 2}, "schema", "unknown schema version 2; this procurator reads 1"),
        ({"schema": "1"}, "schema", 'expected a snapshot meta of schema 1, not "1"'),
        ({"vm": ""}, "vm", 'expected a non-empty string, not ""'),
        ({"size": True}, "size", "expected a size in bytes from 0, not true"),
        ({"size": -1}, "size", "expected a size in bytes from 0, not -1"),
        ({"created": "now"}, "created", 'expected seconds since the epoch, not "now"'),
        ({"paused": 0}, "paused", "expected true or false, not 0"),
        (
            {"extra": 1},
            "extra",
            "unknown field of a snapshot meta; known: vm, bundle, generation, backend, created, size, "
            "paused, ip",
        ),
    ],
)
def test_a_bad_meta_names_the_field(changes: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(ValidationError) as refused:
        SnapshotMeta.parse("snapshot.json", {**GOOD, **changes})
    assert refused.value.message == f"snapshot.json: {field}: {problem}"


def test_a_missing_field_is_named() -> None:
    with pytest.raises(ValidationError, match="backend: missing from the snapshot meta"):
        SnapshotMeta.parse("t", {k: v for k, v in GOOD.items() if k != "backend"})


def test_read_names_damage_and_its_fix(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such snapshot directory"):
        snapshots.read(tmp_path / "nowhere")
    (tmp_path / "snap" / "data").mkdir(parents=True)
    with pytest.raises(DamagedStateError) as missing:
        snapshots.read(tmp_path / "snap")
    assert missing.value.message == (
        f"{tmp_path / 'snap' / 'snapshot.json'}: damaged state file: missing: this directory holds no "
        f"finished snapshot; remove {tmp_path / 'snap'} (it is no usable snapshot)"
    )
    (tmp_path / "snap" / "snapshot.json").write_text(json.dumps({**GOOD, "size": "big"}))
    with pytest.raises(
        DamagedStateError,
        match=r'damaged state file: size: expected a size in bytes from 0, not "big"; remove ',
    ):
        snapshots.read(tmp_path / "snap")


def test_a_snapshot_is_listed_only_once_finished(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    final = snapshots.new_dir(state, "web", "gen", 1000.0, None)
    assert final.name == "19700101T001640.000000Z"
    assert snapshots.partial_of(final).is_dir()
    assert snapshots.listing(state, "web") == ([], [])  # interrupted here: never listed
    taken = snapshots.finish(final, meta(created=1000.0, generation="gen"))
    assert taken.meta.size == 0
    assert not snapshots.partial_of(final).exists()
    assert [s.id for s in snapshots.listing(state, "web")[0]] == [final.name]
    assert snapshots.read(final) == taken


def test_to_a_directory_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("")
    with pytest.raises(StateError, match="already exists and is not empty; choose another --to directory"):
        snapshots.new_dir(state, "web", "gen", 1.0, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    final = snapshots.new_dir(state, "web", "gen", 1.0, tmp_path / "empty")
    assert snapshots.finish(final, meta()).path == tmp_path / "empty"
    assert (tmp_path / "empty" / "snapshot.json").is_file()


def test_retention_keeps_the_newest_per_vm_across_generations(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    made = [make(state, 100.0, "old"), make(state, 200.0, "old"), make(state, 300.0, "new")]
    leftover = snapshots.new_dir(state, "web", "new", 400.0, None)  # an interrupted snapshot
    assert [s.meta.size for s in made] == [100, 100, 100]
    removed = snapshots.prune(state, "web", 2)
    assert [s.id for s in removed] == [made[0].id]
    assert [s.id for s in snapshots.listing(state, "web")[0]] == [made[1].id, made[2].id]
    assert not snapshots.partial_of(leftover).exists()
    assert [s.id for s in snapshots.prune(state, "web", 1)] == [made[1].id]
    assert not (tmp_path / "snapshots" / "web" / "old").exists()  # an emptied generation goes too
    assert snapshots.latest(state, "web", GOOD["bundle"]) == snapshots.read(made[2].path)
    assert snapshots.latest(state, "web", "/nix/store/other") is None
    with pytest.raises(ValidationError, match="keep: 0 is not a count of at least 1"):
        snapshots.prune(state, "web", 0)


def test_a_damaged_meta_is_listed_apart(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    good = make(state, 100.0)
    bad = make(state, 200.0)
    (bad.path / "snapshot.json").write_text("{")
    listed, damaged = snapshots.listing(state, "web")
    assert listed == [good]
    assert [str(d.path) for d in damaged] == [str(bad.path / "snapshot.json")]


def test_the_worker_setting_is_checked() -> None:
    assert WorkerConfig.parse("w", {}).snapshot_keep == 3
    assert WorkerConfig.parse("w", {"snapshotKeep": 7}).snapshot_keep == 7
    for bad in (0, True, 1.5, 1001):
        with pytest.raises(
            ValidationError, match="snapshotKeep: expected a count of snapshots from 1 to 1000"
        ):
            WorkerConfig.parse("w", {"snapshotKeep": bad})
