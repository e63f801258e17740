"""One function per nix command. The only module that knows nix's command line and output formats.

Every call goes through `procurator.process.run`; failures become `NixError` quoting nix's own last error.
"""

from __future__ import annotations

import json
from pathlib import Path

from procurator import process
from procurator.errors import NixError, ProcessError

STORE_DIR = Path("/nix/store")
BUILD_TIMEOUT = 1800.0
QUERY_TIMEOUT = 60.0


def _nix(args: list[str], *, timeout: float) -> str:
    try:
        return process.run(
            ["nix", "--extra-experimental-features", "nix-command flakes", *args], timeout=timeout
        ).stdout
    except ProcessError as exc:
        detail = _last_error(exc.stderr) or exc.message
        raise NixError(f"nix {args[0]} failed: {detail}") from exc


def _last_error(stderr: str) -> str:
    """nix prints 'error: ...' possibly followed by trace lines; keep the first error line and its cause."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            rest = line.removeprefix("error:").strip()
            if not rest and i + 1 < len(lines):
                rest = lines[i + 1]
            return rest
    return lines[-1] if lines else ""


def _outputs(stdout: str) -> list[Path]:
    try:
        results = json.loads(stdout)
        return [Path(p) for r in results for p in r["outputs"].values()]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NixError(f"nix build --json printed something unexpected: {stdout[:200]!r}") from exc


def build_flake(ref: str, *, impure: bool = False) -> list[Path]:
    """`nix build --json --no-link REF` for a flake reference; returns the output store paths."""
    args = ["build", "--json", "--no-link", ref]
    if impure:
        args.append("--impure")
    return _outputs(_nix(args, timeout=BUILD_TIMEOUT))


def build_file(file: Path, attr: str | None) -> list[Path]:
    """`nix build --json --no-link -f FILE [ATTR]` for a Nix file (evaluated impurely, like nix-build)."""
    args = ["build", "--json", "--no-link", "--file", str(file)]
    if attr:
        args.append(attr)
    return _outputs(_nix(args, timeout=BUILD_TIMEOUT))


def is_valid_path(path: Path) -> bool:
    """Whether `path` is a valid (registered, complete) store path."""
    try:
        _nix(["path-info", str(path)], timeout=QUERY_TIMEOUT)
    except NixError:
        return False
    return True


def closure(path: Path) -> list[Path]:
    """The store paths of `path`'s closure (`nix path-info -r`)."""
    out = _nix(["path-info", "--recursive", str(path)], timeout=QUERY_TIMEOUT)
    return [Path(line) for line in out.splitlines() if line]
