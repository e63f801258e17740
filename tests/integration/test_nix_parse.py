"""Every Nix file of the repository parses (`nix-instantiate --parse`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "node_modules", "result"}


def nix_files() -> list[Path]:
    """Tracked and new (not ignored) *.nix files; a walk of the tree when this is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.nix"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        paths = [REPO / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*.nix") if not SKIP_DIRS.intersection(p.relative_to(REPO).parts)]
    return sorted(p for p in paths if p.is_file())


FILES = nix_files()


def test_the_repository_has_nix_files() -> None:
    relative = {p.relative_to(REPO).as_posix() for p in FILES}
    assert {"nix/lib/default.nix", "nix/minimal/default.nix", "examples/minimal.nix"} <= relative


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(REPO).as_posix() for p in FILES])
def test_parses(path: Path) -> None:
    done = subprocess.run(
        ["nix-instantiate", "--parse", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{path.relative_to(REPO)} does not parse:\n{done.stderr}"
