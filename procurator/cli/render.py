"""Rendering helpers: tables for people (stdout), JSON for scripts (stdout), prose on stderr.

Click is imported by the functions that print with it: `ps` answered by a worker renders with `table` and
`json_text` without importing Click (cli/listing.py)."""

from __future__ import annotations

import json

TYPE_CHECKING = False  # as in procurator/worker/__init__.py: no typing import for `ps`
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


def emit_json(obj: Any) -> None:
    import click  # noqa: PLC0415 - see the module's docstring

    click.echo(json_text(obj))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None or c == "" else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def emit_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    import click  # noqa: PLC0415 - see the module's docstring

    click.echo(table(headers, rows))


def note(message: str) -> None:
    import click  # noqa: PLC0415 - see the module's docstring

    click.echo(message, err=True)
