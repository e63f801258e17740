"""Turn what a user types (REF) into a loaded Bundle or Deployment.

A REF is one of:
  - a store path or any path/symlink to one (`./result`), naming a bundle or deployment directory;
  - a Nix file, optionally with an attribute: `examples/minimal.nix#web` (built with `nix build -f`);
  - a flake reference with an attribute: `.#web`, `path:/srv/fleet#deployments.host1`, `github:o/r#x`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


def _split_attr(ref: str) -> tuple[str, str | None]:
    base, sep, attr = ref.partition("#")
    return base, (attr if sep else None)


def build_paths(ref: str) -> list[Path]:
    """Build or locate REF and return its output paths (no parsing)."""
    if not ref:
        raise UsageError("empty REF; give a store path, a result link, FILE.nix[#attr] or FLAKE#attr")
    base, attr = _split_attr(ref)
    local = Path(base)
    if base.endswith(".nix") or (attr is None and local.is_file()):
        if not local.is_file():
            raise UsageError(f"{base}: no such Nix file")
        return nix.build_file(local, attr)
    if attr is None:
        if local.exists():
            return [local.resolve()]
        if base.startswith(str(nix.STORE_DIR) + "/"):
            raise UsageError(f"{base}: not in the Nix store; build it or `nix copy` it here first")
        raise UsageError(
            f"{ref}: no such path; give a store path, a result link, FILE.nix[#attr] or FLAKE#attr"
        )
    if not (_FLAKE_SCHEME.match(base) or local.is_dir()):
        raise UsageError(f"{ref}: {base!r} is neither a flake directory nor a flake URL (e.g. path:/x#attr)")
    return nix.build_flake(ref)


def resolve(ref: str) -> Resolved:
    """Build or locate REF and load it. Exactly one output is expected."""
    paths = build_paths(ref)
    if len(paths) != 1:
        raise UsageError(f"{ref}: builds {len(paths)} outputs; name one attribute that is a bundle")
    return load_store_path(paths[0], ref)
