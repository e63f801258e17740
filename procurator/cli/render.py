"""Rendering helpers: tables for people (stdout), JSON for scripts (stdout), prose on stderr."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None or c == "" else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def emit_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    click.echo(table(headers, rows))


def note(message: str) -> None:
    click.echo(message, err=True)
