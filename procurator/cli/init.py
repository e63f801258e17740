"""`procurator init`: write a starter project (procurator/init)."""

from __future__ import annotations

from pathlib import Path

import click

from procurator import init as starter
from procurator.cli.render import emit_json, note


@click.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=".")
@click.option("--name", "host", default=starter.DEFAULT_HOST, show_default=True,
              help="The worker host: the deployment's host and its procuratorHosts entry.")  # fmt: skip
@click.option("--vm", "vms", default=",".join(starter.DEFAULT_VMS), show_default=True,
              help="Comma-separated VM names, one file each in vms/.")  # fmt: skip
@click.option("--nixos", "kind", flag_value="nixos", default=True,
              help="NixOS VMs in a flake (procurator.lib.mkVm) [default].")  # fmt: skip
@click.option("--minimal", "kind", flag_value="minimal",
              help="VMs for the nixpkgs-free builder, in a default.nix that builds offline.")  # fmt: skip
@click.option("--procurator", "procurator_url", default=None, metavar="FLAKEREF",
              help="--nixos: the flake input for Procurator [default: path: of this checkout].")  # fmt: skip
@click.option("--source", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="--minimal: the Procurator checkout holding nix/minimal [default: this one].")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite files that are already there.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def init(  # noqa: PLR0917 - one parameter per option, as Click passes them
    directory: Path,
    host: str,
    vms: str,
    kind: str,
    procurator_url: str | None,
    source: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a starter project: VMs, a deployment, and a README with the next commands."""
    names = tuple(v.strip() for v in vms.split(",") if v.strip())
    project = starter.project(kind, host, names, procurator_url=procurator_url, source=source)
    written = starter.write(directory, project.files(), force=force)
    if as_json:
        emit_json({"schema": 1, "kind": project.kind, "directory": str(directory),
                   "files": [str(p) for p in written]})  # fmt: skip
        return
    for path in written:
        click.echo(str(path))
    next_step = "procurator build ./default.nix#deployment" if kind == "minimal" else "nix build .#deployment"
    note(f"next: cd {directory} && {next_step} (see README.md)")
