"""The one reader of every JSON file and document Procurator reads (bundles, deployments, the worker config,
state records, leases, snapshot metas, the fleet's inventory, the wire documents of plan/apply/history).

`read_file(path, max_bytes)` reads and decodes one file: bounded in size, UTF-8, duplicate keys refused,
every fault a `ValidationError` naming the file (a missing file stays `FileNotFoundError`: what it means
is the caller's to say). `Reader` gives typed access to one JSON object: each accessor checks the kind and
the bounds of one key and refuses anything else with a `ValidationError` naming the file and the dotted
key path, in one line. The vocabulary is one for all: `expected <what>, not <value as JSON>` for a wrong
kind (or a value outside the domain the caller names), `must be at least/most N, found V` for a bound,
`'v' is not one of a, b` for an enumeration, `unknown <what>; known: ...` for an unknown key.

A JSON null is a value like any other (refused where a string or number is expected), except where the
caller says it means "unset": `opt_text`/`opt_integer` read it as None, `obj(..., nullable=True)` as {}.
Unknown keys are refused where the caller calls `only(...)`, with the known ones listed.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from procurator.errors import ValidationError

E = TypeVar("E", bound=Enum)
_SHOWN = 40


def shown(value: Any) -> str:
    """A value as the file spells it (JSON), cut to a readable length."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys; a file naming one thing twice is refused instead."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def parse_text(source: str, data: bytes | str) -> Any:
    """The JSON value in `data` (read from `source`); ValidationError naming `source` if it is none."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise ValidationError(source, "", f"not UTF-8 (byte {exc.start})") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise ValidationError(source, exc.key, "appears twice; every key must be unique") from exc
    except json.JSONDecodeError as exc:
        raise ValidationError(
            source, "", f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise ValidationError(
            source, "", "not JSON that can be read (RecursionError): nested too deeply"
        ) from exc
    except ValueError as exc:  # an integer literal longer than Python converts (sys.int_info)
        raise ValidationError(source, "", f"not JSON that can be read (ValueError): {exc}") from exc


def read_file(path: Path, max_bytes: int) -> Any:
    """The JSON value in file `path`, at most `max_bytes` long. A missing file is FileNotFoundError; any
    other fault (unreadable, a directory, too large, not UTF-8, not JSON, a key twice) a ValidationError
    naming the file."""
    return parse_text(str(path), read_bytes(path, max_bytes))


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The bytes of file `path`, at most `max_bytes`; its faults as `read_file` says."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError as exc:
        raise ValidationError(source, "", "a directory, not a file") from exc
    except OSError as exc:
        raise ValidationError(source, "", f"cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ValidationError(source[:200], "", f"not a path that can be opened: {exc}") from exc
    if len(data) > max_bytes:
        raise ValidationError(source, "", f"larger than {max_bytes} bytes; not a file Procurator reads")
    return data


class Reader:
    """Typed access to one JSON object read from `source`; errors name the file and the dotted key."""

    def __init__(self, source: str, data: Any, prefix: str = "", *, expected: str = "an object") -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ValidationError(source, prefix, f"expected {expected}, not {shown(data)}")
        self.data: dict[str, Any] = data

    # -- where -------------------------------------------------------------------------------------------

    def path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.prefix}[{key}]"
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str) -> ValidationError:
        return ValidationError(self.source, self.path(key), problem)

    def has(self, key: str) -> bool:
        return key in self.data

    def names(self) -> list[str]:
        """The keys of the object, in file order."""
        return list(self.data)

    def only(
        self, known: Iterable[str], *, what: str = "setting", listed: Collection[str] | None = None
    ) -> None:
        """Refuse the first key (in file order) not in `known`, listing `listed` (default: sorted)."""
        allowed = set(known)
        for key in self.data:
            if key not in allowed:
                names = ", ".join(sorted(allowed) if listed is None else listed)
                raise self.fail(key, f"unknown {what}; known: {names}")

    # -- values ------------------------------------------------------------------------------------------

    def _value(self, key: str, kind: type | tuple[type, ...], what: str, default: Any, required: bool) -> Any:
        if key not in self.data:
            if required:
                raise self.fail(key, f"missing; expected {what}")
            return default
        value = self.data[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise self.fail(key, f"expected {what}, not {shown(value)}")
        return value

    def text(
        self, key: str, default: str | None = None, *, nonempty: bool = False, what: str = "a string"
    ) -> str:
        """A string; required unless `default` is given. `nonempty` refuses "" and white space only."""
        value: str = self._value(key, str, what, default, default is None)
        if nonempty and not value.strip():
            raise self.fail(key, f"expected {what}, not {shown(value)}")
        return value

    def opt_text(self, key: str, *, nonempty: bool = False, what: str = "a string") -> str | None:
        """A string, or None when it is absent (or null)."""
        if key in self.data and self.data[key] is None:
            return None
        return self.text(key, None, nonempty=nonempty, what=what) if self.has(key) else None

    def boolean(self, key: str, default: bool | None = None) -> bool:
        """true or false; required unless `default` is given."""
        value: bool = self._value(key, bool, "true or false", default, default is None)
        return value

    def integer(
        self,
        key: str,
        default: int | None = None,
        *,
        minimum: int | None = 1,
        maximum: int | None = None,
        what: str = "",
    ) -> int:
        """A whole number within the bounds; required unless `default` is given. With `what` (the domain,
        like "a count from 1 to 100") a value out of bounds is refused as `expected <what>`."""
        value: int = self._value(key, int, what or "a whole number", default, default is None)
        low = minimum is not None and value < minimum
        high = maximum is not None and value > maximum
        if what and (low or high):
            raise self.fail(key, f"expected {what}, not {shown(value)}")
        if low:
            raise self.fail(key, f"must be at least {minimum}, found {value}")
        if high:
            raise self.fail(key, f"must be at most {maximum}, found {value}")
        return value

    def opt_integer(
        self, key: str, *, minimum: int | None = 1, maximum: int | None = None, what: str = ""
    ) -> int | None:
        """A whole number within the bounds, or None when it is absent (or null)."""
        if self.data.get(key) is None:
            return None
        return self.integer(key, minimum=minimum, maximum=maximum, what=what)

    def number(
        self,
        key: str,
        default: float | None = None,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        what: str = "",
    ) -> float:
        """A finite number (whole or not) within the bounds, as a float; required unless `default`."""
        domain = what or (
            f"a number from {minimum:g}" if maximum is None else f"a number from {minimum:g} to {maximum:g}"
        )
        value = self._value(key, (int, float), domain, default, default is None)
        if not minimum <= value < float("inf") or (maximum is not None and value > maximum):
            raise self.fail(key, f"expected {domain}, not {shown(value)}")
        return float(value)

    def enum(self, key: str, kind: type[E], default: E | None = None) -> E:
        """One of the values of enumeration `kind`; required unless `default` is given."""
        value = self.text(key, None if default is None else str(default.value))
        try:
            return kind(value)
        except ValueError as exc:
            raise self.fail(key, f"{value!r} is not one of {', '.join(str(k.value) for k in kind)}") from exc

    def choice(self, key: str, choices: Collection[str], default: str | None = None) -> str:
        """One of `choices` (listed in their order in the message); required unless `default` is given."""
        value = self._value(key, str, "a string", default, default is None)
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        result: str = value
        return result

    def array(
        self, key: str, *, required: bool = False, nullable: bool = False, max_items: int | None = None
    ) -> list[Any]:
        """A list ([] when absent, or null with `nullable`, unless `required`), of at most `max_items`."""
        if nullable and self.data.get(key, []) is None:
            return []
        value: list[Any] = self._value(key, list, "a list", [], required)
        if max_items is not None and len(value) > max_items:
            raise self.fail(key, f"must have at most {max_items} items, found {len(value)}")
        return value

    def strings(self, key: str, *, nonempty: bool = False) -> tuple[str, ...]:
        """A list of strings (() when absent); `nonempty` refuses "" among them."""
        value = self._value(key, list, "a list of strings", [], False)
        if not all(isinstance(v, str) and (v or not nonempty) for v in value):
            raise self.fail(key, f"expected a list of strings, not {shown(value)}")
        return tuple(value)

    def obj(
        self, key: str, *, required: bool = False, nullable: bool = False, expected: str = "an object"
    ) -> Reader:
        """The object at `key` ({} when absent, or null with `nullable`, unless `required`)."""
        if not self.has(key) or (nullable and self.data[key] is None):
            if required:
                raise self.fail(key, "missing")
            return Reader(self.source, {}, self.path(key))
        return Reader(self.source, self.data[key], self.path(key), expected=expected)

    def items(
        self, key: str, *, required: bool = False, nullable: bool = False, max_items: int | None = None
    ) -> list[Reader]:
        """The objects of the list at `key`, each a reader of its own (`key[i]`)."""
        found = self.array(key, required=required, nullable=nullable, max_items=max_items)
        return [Reader(self.source, v, f"{self.path(key)}[{i}]") for i, v in enumerate(found)]

    @classmethod
    def versioned(cls, source: str, data: Any, version: int, *, what: str, fix: str = "") -> Reader:
        """A reader of the document in `data`, which must be an object of `schema` `version`: anything
        else is refused at `schema` (`what` names the document, `fix` says what to do)."""
        found = data.get("schema") if isinstance(data, dict) else data
        if isinstance(data, dict) and found == version and not isinstance(found, bool):
            return cls(source, data)
        tail = f" ({fix})" if fix else ""
        if isinstance(data, dict) and isinstance(found, int) and not isinstance(found, bool):
            problem = f"unknown schema version {found}; this procurator reads {version}{tail}"
        else:
            problem = f"expected {what} of schema {version}, not {shown(found)}{tail}"
        raise ValidationError(source, "schema", problem)
