"""One function per nix command. The only module that knows nix's command line and output formats.

Every call goes through `procurator.process.run`; failures become `NixError` quoting nix's own last error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator import process
from procurator.errors import NixError, ProcessError

STORE_DIR = Path("/nix/store")
BUILD_TIMEOUT = 1800.0
QUERY_TIMEOUT = 60.0


def _nix(args: list[str], *, timeout: float, env: Mapping[str, str] | None = None) -> str:
    try:
        return process.run(
            ["nix", "--extra-experimental-features", "nix-command flakes", *args], timeout=timeout, env=env
        ).stdout
    except ProcessError as exc:
        detail = _last_error(exc.stderr) or exc.message
        raise NixError(f"nix {args[0]} failed: {detail}") from exc


MAX_ERROR_LINES = 20  # of one nix error quoted in a message; the rest is counted
_POSITION = re.compile(r"^at (.+:\d+:\d+):?$")


def _last_error(stderr: str) -> str:
    """nix's error, on one line: its first line, every problem line after it (`Failed assertions:` and
    each assertion, mkSpec's "N problems:" and each, a builder's last log lines) joined with "; ", and
    the position (file:line:column) of a syntax or evaluation error. Trace lines (`…`), the source
    excerpt and the `--show-trace` hint are left out; past MAX_ERROR_LINES lines are counted, not shown."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("error:")), None)
    if start is None:
        rest = [line.strip() for line in lines if line.strip()]
        return rest[-1] if rest else ""
    parts: list[str] = []
    first = lines[start].strip().removeprefix("error:").strip()
    if first:
        parts.append(first)
    position = ""
    for line in lines[start + 1 :]:
        text = line.strip()
        if not text or text.startswith("…"):
            continue
        if text.startswith("(use '--show-trace'"):
            break
        found = _POSITION.match(text)
        if found:  # the excerpt of the source follows: the position says it all
            position = found.group(1)
            break
        parts.append(text.removeprefix("error:").strip().removeprefix("- "))
    shown = parts[:MAX_ERROR_LINES]
    if len(parts) > len(shown):
        shown.append(f"({len(parts) - len(shown)} more lines)")
    message = "; ".join(p.rstrip(";") for p in shown)
    message = message.replace(":;", ":")  # "3 problems:; name ..." reads "3 problems: name ..."
    return f"{message} (at {position})" if position else message


def _outputs(stdout: str) -> list[Path]:
    try:
        results = json.loads(stdout)
        return [Path(p) for r in results for p in r["outputs"].values()]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NixError(f"nix build --json printed something unexpected: {stdout[:200]!r}") from exc


def build_flake(ref: str, *, impure: bool = False) -> list[Path]:
    """`nix build --json --no-link REF` for a flake reference; returns the output store paths."""
    return build_flakes([ref], impure=impure)


def build_flakes(refs: Sequence[str], *, impure: bool = False) -> list[Path]:
    """`nix build --json --no-link REF...`: flake references built by one nix (one evaluation of what
    they share); the output store paths of all of them."""
    args = ["build", "--json", "--no-link", *refs]
    if impure:
        args.append("--impure")
    return _outputs(_nix(args, timeout=BUILD_TIMEOUT))


def build_file(file: Path, attr: str | None) -> list[Path]:
    """`nix build --json --no-link -f FILE [ATTR]` for a Nix file (evaluated impurely, like nix-build)."""
    return build_file_attrs(file, [attr] if attr else [])


def build_file_attrs(file: Path, attrs: Sequence[str]) -> list[Path]:
    """`nix build --json --no-link -f FILE ATTR...` (the whole file without ATTRs): one nix, one
    evaluation of the file; the output store paths of all of them."""
    args = ["build", "--json", "--no-link", "--file", str(file), *attrs]
    return _outputs(_nix(args, timeout=BUILD_TIMEOUT))


def _json(args: list[str], what: str) -> Any:
    out = _nix(args, timeout=QUERY_TIMEOUT)
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise NixError(f"nix eval --json {what} printed something unexpected: {out[:200]!r}") from exc


def eval_flake_json(ref: str) -> Any:
    """`nix eval --json REF` for a flake reference with an attribute: the value as JSON data."""
    return _json(["eval", "--json", ref], ref)


def eval_file_json(file: Path, attr: str) -> Any:
    """`nix eval --json --file FILE ATTR` (the file evaluated impurely, like nix-build): JSON data."""
    return _json(["eval", "--json", "--file", str(file), attr], f"{file} {attr}")


def copy_to(
    paths: Sequence[Path],
    store: str,
    *,
    ssh_options: Sequence[str] = (),
    substitute_on_destination: bool = False,
    timeout: float = BUILD_TIMEOUT,
) -> None:
    """`nix copy --to STORE PATH...`: copy the paths' closures (what STORE lacks of them).

    For an `ssh://` store, `ssh_options` reach ssh through NIX_SSHOPTS, which nix splits on white space:
    no option may contain any.
    """
    for option in ssh_options:
        if not option or option.split() != [option]:
            raise NixError(f"ssh option {option!r} is empty or has white space; NIX_SSHOPTS cannot carry it")
    args = ["copy", "--to", store]
    if substitute_on_destination:
        args.append("--substitute-on-destination")
    env = {"NIX_SSHOPTS": " ".join(ssh_options)} if ssh_options else None
    _nix([*args, *(str(p) for p in paths)], timeout=timeout, env=env)


# -- profiles (nix-env) ----------------------------------------------------------------------------------
# A profile is a symlink `P -> P-<N>-link -> /nix/store/...`; each generation link is also a GC root.
# nix-env needs P's directory to exist.


@dataclass(frozen=True)
class ProfileGeneration:
    """One line of `nix-env --profile P --list-generations`."""

    number: int
    date: str  # as nix prints it: local time, "YYYY-MM-DD HH:MM:SS"
    current: bool


_GENERATION_LINE = re.compile(r"^\s*(\d+)\s+(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\s*(\(current\))?\s*$")


def _nix_env(profile: Path, args: list[str]) -> str:
    argv = ["nix-env", "--profile", str(profile), *args]
    try:
        return process.run(argv, timeout=QUERY_TIMEOUT).stdout
    except ProcessError as exc:
        detail = _last_error(exc.stderr) or exc.message
        raise NixError(f"nix-env {args[0]} on profile {profile} failed: {detail}") from exc


def profile_set(profile: Path, path: Path) -> None:
    """`nix-env --profile P --set PATH`: make PATH the profile's new current generation.

    Nix reuses the current generation when it already points at PATH (no new generation then).
    """
    _nix_env(profile, ["--set", str(path)])


def profile_generations(profile: Path) -> list[ProfileGeneration]:
    """`nix-env --profile P --list-generations`, oldest first ([] for a profile that does not exist)."""
    if not profile.is_symlink():
        return []
    out = _nix_env(profile, ["--list-generations"])
    generations = []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = _GENERATION_LINE.match(line)
        if m is None:
            raise NixError(f"nix-env --list-generations printed an unexpected line: {line!r}")
        generations.append(ProfileGeneration(int(m.group(1)), m.group(2), m.group(3) is not None))
    return generations


def profile_switch(profile: Path, number: int) -> None:
    """`nix-env --profile P --switch-generation N`: make generation N current (no new generation)."""
    _nix_env(profile, ["--switch-generation", str(number)])
