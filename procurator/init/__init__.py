"""`procurator init`: a starter project written from jinja2 templates (`init/templates/*.j2`).

`--nixos` (the default): a flake with Procurator as its input, one NixOS module per VM (`vms/<name>.nix`),
the deployment of one worker host and its `procuratorHosts` entry for `nix run .#deploy`; the flake's own
template (`templates/default`, `nix flake init -t`) is this output for the VMs web and files, which a test
keeps so. `--minimal`: a `default.nix` for Procurator's nixpkgs-free builder, which builds offline
(`procurator build ./default.nix#deployment`), one spec per VM. Both come with a README naming the next
three commands.

Names follow the Nix side's rules (nix/lib/checks.nix): a VM name is a DNS label of at most 20 characters,
a host name one of at most 63. Existing files are never overwritten unless `force`; nothing is written
when one would be.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from procurator.errors import ConflictError, UsageError
from procurator.models import VM_NAME_MAX, is_dns_label

KINDS = ("nixos", "minimal")
DEFAULT_VMS = ("web",)
DEFAULT_HOST = "worker1"
_PATH_SAFE = re.compile(r"^/[A-Za-z0-9._+/-]*$")  # what a Nix path literal may hold


def _nix_string(value: str) -> str:
    """A Nix string literal (JSON's escapes are Nix's, but `${` must not start an interpolation)."""
    return json.dumps(value).replace("${", "\\${")


def _nix_path(value: str) -> str:
    """An absolute path as a Nix path expression."""
    if _PATH_SAFE.match(value) and "//" not in value and not value.endswith("/"):
        return value
    return f"(/. + {_nix_string(value)})"


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("procurator.init", "templates"),
    autoescape=False,  # noqa: S701 - Nix and Markdown, not HTML: values are checked names or nix_string/nix_path
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters["nix_string"] = _nix_string
_ENV.filters["nix_path"] = _nix_path


@dataclass(frozen=True)
class Project:
    kind: str  # nixos | minimal
    host: str
    vms: tuple[str, ...]
    procurator_url: str = ""  # nixos: the flake input
    source: str = ""  # minimal: the Procurator checkout holding nix/minimal

    def files(self) -> dict[str, str]:
        """Relative path -> content."""
        values = {"host": self.host, "vms": list(self.vms), "procurator_url": self.procurator_url,
                  "source": self.source}  # fmt: skip
        top = ("flake.nix", "README.md") if self.kind == "nixos" else ("default.nix", "README.md")
        out = {name: _ENV.get_template(f"{self.kind}/{name}.j2").render(values) for name in top}
        for vm in self.vms:
            out[f"vms/{vm}.nix"] = _ENV.get_template(f"{self.kind}/vms/vm.nix.j2").render(
                {**values, "vm": vm}
            )
        return out


def checkout() -> Path | None:
    """The Procurator checkout this procurator runs from, if it is one (it has the Nix builders)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "nix" / "minimal").is_dir() and (root / "flake.nix").is_file() else None


def project(
    kind: str, host: str, vms: tuple[str, ...], *, procurator_url: str | None, source: Path | None
) -> Project:
    """The project to write, its names checked as the Nix side checks them."""
    if kind not in KINDS:
        raise UsageError(f"kind {kind!r}: give --nixos or --minimal")
    if not is_dns_label(host):
        raise UsageError(
            f"--name {host!r}: a host name is a DNS label of at most 63 characters (a-z, 0-9, '-')"
        )
    if not vms:
        raise UsageError("--vm: give at least one VM name, e.g. --vm web,api")
    for vm in vms:
        if not is_dns_label(vm, VM_NAME_MAX):
            raise UsageError(
                f"--vm {vm!r}: a VM name is a DNS label of at most {VM_NAME_MAX} characters (a-z, 0-9, '-')"
            )
    if len(set(vms)) != len(vms):
        raise UsageError(f"--vm {','.join(vms)}: a VM name is given twice")
    here = checkout()
    if kind == "nixos":
        url = procurator_url or (f"path:{here}" if here is not None else "")
        if not url:
            raise UsageError(
                "--procurator: give the flake reference of Procurator (e.g. github:OWNER/procurator)"
            )
        return Project(kind, host, vms, procurator_url=url)
    where = source or here
    if where is None or not (where / "nix" / "minimal").is_dir():
        raise UsageError(
            f"--source {where or '(none)'}: not a Procurator checkout (no nix/minimal); "
            "give the checkout's path"
        )
    return Project(kind, host, vms, source=str(where.resolve()))


def write(root: Path, files: dict[str, str], *, force: bool) -> list[Path]:
    """Write `files` under `root`; refuses, writing nothing, if one exists and not `force`."""
    targets = {root / rel: text for rel, text in files.items()}
    existing = sorted(str(p) for p in targets if p.exists() or p.is_symlink())
    if existing and not force:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise ConflictError(f"{shown}: already there; nothing written (--force overwrites)")
    for path in targets:
        if path.is_dir():
            raise ConflictError(f"{path}: a directory; nothing written for it")
    for path, text in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted(targets)
