"""`procurator build REF`: build or locate a bundle or deployment, validate it, show what it is."""

from __future__ import annotations

import click

from procurator.cli.render import emit_json, emit_table
from procurator.resolve import resolve


@click.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def build(ref: str, as_json: bool) -> None:
    """Build REF (store path, result link, FILE.nix[#attr] or FLAKE#attr) and validate it."""
    resolved = resolve(ref)
    if resolved.bundle is not None:
        b = resolved.bundle
        b.check_links()
        if as_json:
            emit_json(b.to_json())
        else:
            emit_table(
                ["KIND", "NAME", "GENERATION", "STORE PATH"], [["bundle", b.name, b.generation, b.path]]
            )
        return
    d = resolved.deployment
    if d is None:  # pragma: no cover - resolve() returns one or the other
        raise RuntimeError("resolve returned neither a bundle nor a deployment")
    bundles = d.bundles()
    for bundle in bundles:
        bundle.check_links()
    if as_json:
        emit_json({**d.to_json(), "bundles": [b.to_json() for b in bundles]})
        return
    rows: list[list[object]] = [["deployment", d.host, d.generation, d.path]]
    rows += [["bundle", b.name, b.generation, b.path] for b in bundles]
    emit_table(["KIND", "NAME", "GENERATION", "STORE PATH"], rows)
