"""Deployment history (docs/bundle.md): the deployments applied on this host, as a Nix profile.

The profile lives at `<state>/profiles/deployment`. Each successful `apply` of a deployment that is not
already the current one makes it a new generation (`nix-env --set`); `rollback` switches back to an
earlier one (`nix-env --switch-generation`). Nix keeps every generation's closure alive (each generation
link is a GC root), so an earlier deployment and all of its bundles stay in the store until the
generation is deleted.

Reading where the profile points costs two `readlink`s and no subprocess, so an apply that changes
nothing also records nothing and runs no nix command.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator import nix
from procurator.errors import NotFoundError, StateError
from procurator.jsonread import Reader
from procurator.state import StateDir

PROFILE_NAME = "deployment"
_LINK = re.compile(rf"^{PROFILE_NAME}-(\d+)-link$")


@dataclass(frozen=True)
class Generation:
    """One generation of the deployment profile."""

    number: int
    date: str  # local time as nix prints it, "YYYY-MM-DD HH:MM:SS"
    deployment: str  # the deployment's store path
    current: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "date": self.date,
            "deployment": self.deployment,
            "current": self.current,
        }


HISTORY_SCHEMA = 1


@dataclass(frozen=True)
class History:
    """The deployment history as `history --json` and the worker's GET /history send it."""

    profile: str
    generations: tuple[Generation, ...]

    @property
    def current(self) -> Generation | None:
        return next((g for g in self.generations if g.current), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": HISTORY_SCHEMA,
            "profile": self.profile,
            "generations": [g.to_json() for g in self.generations],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "history --json") -> History:
        r = Reader.versioned(
            source, data, HISTORY_SCHEMA, what="a history", fix="install the same procurator release on both"
        )
        generations = [
            Generation(g.integer("number"), g.text("date"), g.text("deployment"), g.boolean("current"))
            for g in r.items("generations", required=True)
        ]
        profile = r.text("profile")
        return cls(profile, tuple(generations))


def read(state: StateDir) -> History:
    """The history of this host's deployment profile."""
    return History(str(profile_path(state)), tuple(generations(state)))


def profile_path(state: StateDir) -> Path:
    return state.root / "profiles" / PROFILE_NAME


def _link(profile: Path, number: int) -> Path:
    return profile.with_name(f"{profile.name}-{number}-link")


def is_recordable(path: Path) -> bool:
    """Whether `path` can become a generation: only top-level store paths can (nix-env refuses others)."""
    return path.parent == nix.STORE_DIR


def current(state: StateDir) -> tuple[int, Path] | None:
    """(generation number, deployment store path) the profile points at now; None without history.

    Reads the two symlinks only (no subprocess).
    """
    profile = profile_path(state)
    try:
        link = os.readlink(profile)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{profile}: cannot read the deployment profile: {exc.strerror}") from exc
    m = _LINK.match(Path(link).name)
    if m is None:
        raise StateError(
            f"{profile}: points at {link!r}, not at a generation link; it was changed by hand: "
            "restore it or move the profiles directory aside"
        )
    try:
        target = os.readlink(profile.parent / link)
    except OSError as exc:  # gone (deleted by hand) or not a link: a damaged profile, not "no history"
        raise StateError(
            f"{profile}: points at generation link {link!r}, which is {_why(exc)}; switch to a generation "
            f"that exists (`nix-env --profile {profile} --switch-generation N`) or move the profiles "
            "directory aside"
        ) from exc
    return int(m.group(1)), Path(target)


def _why(exc: OSError) -> str:
    return "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc.strerror})"


def record(state: StateDir, deployment: Path) -> int:
    """Make `deployment` the current generation (a new one unless it is already current); its number."""
    now = current(state)
    if now is not None and now[1] == deployment:
        return now[0]
    profile = profile_path(state)
    try:
        profile.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{profile.parent}: cannot create the profiles directory: {exc.strerror}") from exc
    nix.profile_set(profile, deployment)
    after = current(state)
    if after is None or after[1] != deployment:
        raise StateError(f"{profile}: does not point at {deployment} after nix-env --set")
    return after[0]


def generations(state: StateDir) -> list[Generation]:
    """Every generation of the deployment profile, oldest first ([] without history)."""
    profile = profile_path(state)
    out = []
    for gen in nix.profile_generations(profile):
        link = _link(profile, gen.number)
        try:
            target = os.readlink(link)
        except OSError as exc:
            raise StateError(f"{link}: cannot read generation {gen.number}: {exc.strerror}") from exc
        out.append(Generation(gen.number, gen.date, target, gen.current))
    return out


def select(gens: list[Generation], to: int | None) -> Generation:
    """The generation a rollback goes to: `to`, or by default the one before the current one."""
    if not gens:
        raise NotFoundError("no deployment history on this host yet; `procurator apply` records it")
    if to is not None:
        for gen in gens:
            if gen.number == to:
                return gen
        known = ", ".join(str(g.number) for g in gens)
        raise NotFoundError(f"no deployment generation {to} (there are: {known}); see `procurator history`")
    now = next((g for g in gens if g.current), gens[-1])
    earlier = [g for g in gens if g.number < now.number]
    if not earlier:
        raise NotFoundError(
            f"generation {now.number} is the oldest deployment; nothing earlier to roll back to"
        )
    return earlier[-1]


def switch(state: StateDir, to: int | Path) -> int:
    """Make a generation current and return its number.

    `to` is a generation number (after its deployment has been applied: `rollback`), or a deployment
    store path, which becomes a new generation unless it is the current one already (`record`).
    """
    if isinstance(to, Path):
        return record(state, to)
    profile = profile_path(state)
    now = current(state)
    if now is not None and now[0] == to:
        return to
    nix.profile_switch(profile, to)
    after = current(state)
    if after is None or after[0] != to:
        raise StateError(f"{profile}: is not at generation {to} after nix-env --switch-generation")
    return to
