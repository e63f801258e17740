"""Turn what a user types (REF) into a loaded Bundle or Deployment.

A REF is one of:
  - a store path or any path/symlink to one (`./result`), naming a bundle or deployment directory;
  - a Nix file, optionally with an attribute: `examples/minimal.nix#web` (built with `nix build -f`);
  - a flake reference with an attribute: `.#web`, `path:/srv/fleet#deployments.host1`, `github:o/r#x`.

`parse_ref` is the one parser of such references; `procurator deploy`'s fleet (deploy/fleet.py) reads
its REF with it too, taking no store paths and letting a flake go without `#attr`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from procurator import nix
from procurator.errors import UsageError, ValidationError
from procurator.models import Bundle, Deployment

_FLAKE_SCHEME = re.compile(r"^[a-z+]+:")


@dataclass(frozen=True)
class Resolved:
    ref: str
    path: Path
    bundle: Bundle | None = None
    deployment: Deployment | None = None

    @property
    def kind(self) -> str:
        return "bundle" if self.bundle is not None else "deployment"


def load_store_path(path: Path, ref: str) -> Resolved:
    """Load a built path as a bundle or a deployment, or explain why it is neither."""
    if Bundle.is_bundle(path):
        return Resolved(ref, path, bundle=Bundle.load(path))
    if Deployment.is_deployment(path):
        return Resolved(ref, path, deployment=Deployment.load(path))
    raise ValidationError(
        str(path),
        "",
        "not a Procurator bundle (vm-config.json + procurator.json) or deployment (deployment.json); "
        "build it with lib.mkVm or lib.mkDeployment",
    )


class RefKind(StrEnum):
    FILE = "file"  # a Nix file: `nix build -f FILE [ATTR]`
    FLAKE = "flake"  # a flake directory or URL: `nix build BASE#ATTR`
    PATH = "path"  # an existing path: a store path or a link to one (`./result`)


@dataclass(frozen=True)
class Ref:
    """What a REF names (no file is read, nothing is built)."""

    text: str
    kind: RefKind
    base: str  # before '#'
    attr: str | None  # after '#'; None without one

    @property
    def path(self) -> Path:
        return Path(self.base)


def parse_ref(text: str, *, hint: str, paths: bool = True) -> Ref:
    """Split REF into what it names. `hint` says what to give instead of an empty REF. With `paths`, a
    REF without `#attr` that is no Nix file names an existing path (a flake then needs its `#attr`);
    without, it is a flake and its attribute is the caller's default. Raises `UsageError`."""
    if not text:
        raise UsageError(f"empty REF; give {hint}")
    base, sep, attr = text.partition("#")
    if sep and not attr:
        raise UsageError(f"{text}: empty attribute after '#'")
    local = Path(base)
    if base.endswith(".nix") or local.is_file():
        if not local.is_file():
            raise UsageError(f"{base}: no such Nix file")
        return Ref(text, RefKind.FILE, base, attr or None)
    if paths and not sep:
        if local.exists():
            return Ref(text, RefKind.PATH, base, None)
        if base.startswith(str(nix.STORE_DIR) + "/"):
            raise UsageError(f"{base}: not in the Nix store; build it or `nix copy` it here first")
        raise UsageError(
            f"{text}: no such path; give a store path, a result link, FILE.nix[#attr] or FLAKE#attr"
        )
    if not (_FLAKE_SCHEME.match(base) or local.is_dir()):
        if paths:
            raise UsageError(
                f"{text}: {base!r} is neither a flake directory nor a flake URL (e.g. path:/x#attr)"
            )
        raise UsageError(f"{text}: {base!r} is neither a flake directory, a flake URL nor a Nix file")
    return Ref(text, RefKind.FLAKE, base, attr or None)


def build_paths(ref: str) -> list[Path]:
    """Build or locate REF and return its output paths (no parsing)."""
    parsed = parse_ref(ref, hint="a store path, a result link, FILE.nix[#attr] or FLAKE#attr")
    if parsed.kind is RefKind.FILE:
        return nix.build_file(parsed.path, parsed.attr)
    if parsed.kind is RefKind.PATH:
        return [parsed.path.resolve()]
    return nix.build_flake(ref)


def resolve(ref: str) -> Resolved:
    """Build or locate REF and load it. Exactly one output is expected."""
    paths = build_paths(ref)
    if len(paths) != 1:
        raise UsageError(f"{ref}: builds {len(paths)} outputs; name one attribute that is a bundle")
    return load_store_path(paths[0], ref)
