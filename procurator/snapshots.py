"""Snapshots of VMs on this host: where they live, their meta file, listing and retention.

A snapshot is a directory: `snapshot.json` (the meta, `schema: 1`: vm, bundle, generation, backend, created,
size, paused) and `data/`, what the backend wrote (cloud-hypervisor: `config.json`, `state.json`,
`memory-ranges`; qemu: its migration stream `memory.qemu`) beside `vm-config.json`, the runtime config the
VM ran with. Those Procurator keeps live under `<state>/snapshots/<vm>/<generation>/<created>/`; one taken
`--to DIR` is only there. A snapshot is made in `<created>.partial` and renamed once its meta is written, so
a snapshot interrupted at any instant is never listed, and the next snapshot (or prune) removes it.

Reading is the edge: `SnapshotMeta.parse` checks every field, and a meta that is not one is damage
(`DamagedStateError` naming the file and the fix), never guessed at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from procurator.errors import DamagedStateError, NotFoundError, StateError, ValidationError
from procurator.jsonread import Reader
from procurator.state import StateDir, atomic_write_json, read_json, write_problem

SNAPSHOT_SCHEMA = 1
_META_FIELDS = ("vm", "bundle", "generation", "backend", "created", "size", "paused", "ip")
META = "snapshot.json"
DATA = "data"
CONFIG = "vm-config.json"  # the runtime VmConfig the snapshotted VM ran with, in DATA
PARTIAL = ".partial"


@dataclass(frozen=True)
class SnapshotMeta:
    vm: str
    bundle: str  # the store path of the generation that was running
    generation: str
    backend: str
    created: float  # seconds since the epoch
    size: int  # bytes of DATA
    paused: bool  # the guest was paused before the snapshot (`procurator pause`)
    ip: str = ""  # the guest's address (its lease) when it was taken; "" without interfaces

    def to_json(self) -> dict[str, Any]:
        return {"schema": SNAPSHOT_SCHEMA, **asdict(self)}

    @classmethod
    def parse(cls, source: str, data: Any) -> SnapshotMeta:
        r = Reader.versioned(source, data, SNAPSHOT_SCHEMA, what="a snapshot meta")
        r.only([*_META_FIELDS, "schema"], what="field of a snapshot meta", listed=_META_FIELDS)
        missing = [key for key in _META_FIELDS if key != "ip" and not r.has(key)]
        if missing:
            raise r.fail(missing[0], "missing from the snapshot meta")
        fields: dict[str, Any] = {
            "vm": r.text("vm", nonempty=True, what="a non-empty string"),
            "bundle": r.text("bundle", nonempty=True, what="a non-empty string"),
            "generation": r.text("generation", nonempty=True, what="a non-empty string"),
            "backend": r.text("backend", nonempty=True, what="a non-empty string"),
            "created": r.number("created", what="seconds since the epoch"),
            "size": r.integer("size", minimum=0, what="a size in bytes from 0"),
            "paused": r.boolean("paused"),
        }
        if r.has("ip"):
            fields["ip"] = r.text("ip")
        return cls(**fields)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    meta: SnapshotMeta

    @property
    def data(self) -> Path:
        return self.path / DATA

    @property
    def id(self) -> str:
        """How `restore --from` and `snapshots` name it: its directory's name (the created time)."""
        return self.path.name

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), **self.meta.to_json()}


def root(state: StateDir) -> Path:
    return state.root / "snapshots"


def vm_root(state: StateDir, vm: str) -> Path:
    return root(state) / vm


def stamp(created: float) -> str:
    """A directory name that sorts as the time does: 20261204T013632.123456Z."""
    whole = int(created)
    micros = round((created - whole) * 1_000_000) % 1_000_000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole)) + f".{micros:06d}Z"


def read(path: Path) -> Snapshot:
    """The snapshot in directory `path`, its meta checked; refused, naming the file and the fix, if not."""
    meta_path = path / META
    fix = f"remove {path} (it is no usable snapshot)"
    try:
        data = read_json(meta_path, fix=fix)
    except FileNotFoundError as exc:
        if not path.is_dir():
            raise NotFoundError(
                f"{path}: no such snapshot directory; see `procurator snapshots NAME`"
            ) from exc
        raise DamagedStateError(meta_path, "missing: this directory holds no finished snapshot", fix) from exc
    try:
        meta = SnapshotMeta.parse(str(meta_path), data)
    except ValidationError as exc:
        problem = f"{exc.field}: {exc.problem}" if exc.field else exc.problem
        raise DamagedStateError(meta_path, problem, fix) from exc
    if not (path / DATA).is_dir():
        raise DamagedStateError(path / DATA, "missing: the snapshot's data is gone", fix)
    return Snapshot(path, meta)


def listing(state: StateDir, vm: str) -> tuple[list[Snapshot], list[DamagedStateError]]:
    """The VM's finished snapshots, oldest first, and apart those whose meta cannot be read."""
    good: list[Snapshot] = []
    bad: list[DamagedStateError] = []
    base = vm_root(state, vm)
    for generation in sorted(base.iterdir()) if base.is_dir() else []:
        if not generation.is_dir():
            continue
        for entry in sorted(generation.iterdir()):
            if not entry.is_dir() or entry.name.endswith(PARTIAL):
                continue
            try:
                good.append(read(entry))
            except DamagedStateError as exc:
                bad.append(exc)
    good.sort(key=lambda s: (s.meta.created, s.id))
    return good, bad


def latest(state: StateDir, vm: str, bundle: str) -> Snapshot | None:
    """The newest readable snapshot of `vm` taken of `bundle` (its current generation), if any."""
    good, _ = listing(state, vm)
    of_bundle = [s for s in good if s.meta.bundle == bundle]
    return of_bundle[-1] if of_bundle else None


def find(state: StateDir, vm: str, ident: str) -> Snapshot:
    """The snapshot `ident` (an id from `snapshots NAME`) of `vm`."""
    good, _ = listing(state, vm)
    for snapshot in good:
        if snapshot.id == ident:
            return snapshot
    raise NotFoundError(f"VM {vm!r} has no snapshot {ident!r}; see `procurator snapshots {vm}`")


def new_dir(state: StateDir, vm: str, generation: str, created: float, to: Path | None) -> Path:
    """A fresh, empty `<dir>.partial/data` for a snapshot being made; the final directory's path."""
    final = (to if to is not None else vm_root(state, vm) / generation / stamp(created)).absolute()
    if final.exists() and (to is None or any(final.iterdir())):
        raise StateError(f"{final}: already exists and is not empty; choose another --to directory")
    partial = final.with_name(final.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / DATA).mkdir(parents=True)
    except OSError as exc:
        raise StateError(f"{partial}: cannot create the snapshot directory: {write_problem(exc)}") from exc
    return final


def partial_of(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


def finish(final: Path, meta: SnapshotMeta) -> Snapshot:
    """Write the meta into the partial directory and rename it to `final`: now it is a snapshot."""
    partial = partial_of(final)
    meta = SnapshotMeta(**{**asdict(meta), "size": du(partial / DATA)})
    atomic_write_json(partial / META, meta.to_json())
    try:
        if final.is_dir():  # an empty --to directory
            final.rmdir()
        os.replace(partial, final)
    except OSError as exc:
        raise StateError(f"{final}: cannot finish the snapshot: {write_problem(exc)}") from exc
    return Snapshot(final, meta)


def discard(final: Path) -> None:
    """Remove what an unfinished snapshot wrote."""
    shutil.rmtree(partial_of(final), ignore_errors=True)


def du(path: Path) -> int:
    """Bytes of the files under `path` (their apparent sizes)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def prune(state: StateDir, vm: str, keep: int) -> list[Snapshot]:
    """Remove all but the newest `keep` snapshots of `vm` (of any generation), and what interrupted
    snapshots left; the snapshots removed, oldest first."""
    if keep < 1:
        raise ValidationError("--keep", "keep", f"{keep} is not a count of at least 1")
    base = vm_root(state, vm)
    for generation in base.iterdir() if base.is_dir() else []:
        for entry in generation.iterdir() if generation.is_dir() else []:
            if entry.name.endswith(PARTIAL):
                shutil.rmtree(entry, ignore_errors=True)
    good, _ = listing(state, vm)
    removed = good[: max(0, len(good) - keep)]
    for snapshot in removed:
        shutil.rmtree(snapshot.path, ignore_errors=True)
    for generation in base.iterdir() if base.is_dir() else []:
        with contextlib.suppress(OSError):
            generation.rmdir()  # only when empty
    return removed


def forget(state: StateDir, vm: str) -> None:
    """Every snapshot of `vm` (for `down --purge`)."""
    shutil.rmtree(vm_root(state, vm), ignore_errors=True)
