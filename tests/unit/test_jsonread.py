"""procurator/jsonread.py, the one reader of JSON files: each fault of a file, and each accessor's
refusal, is one ValidationError naming the file and the key path."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import pytest

from procurator import jsonread
from procurator.errors import ValidationError
from procurator.jsonread import Reader


def refusal(path: Path, data: bytes, max_bytes: int = 1000) -> str:
    path.write_bytes(data)
    with pytest.raises(ValidationError) as refused:
        jsonread.read_file(path, max_bytes)
    return refused.value.message


def test_every_fault_of_a_file_names_it(tmp_path: Path) -> None:
    f = tmp_path / "f.json"
    with pytest.raises(FileNotFoundError):
        jsonread.read_file(f, 10)
    assert refusal(f, b'{"a": 1, "a": 2}') == f"{f}: a: appears twice; every key must be unique"
    assert refusal(f, b'{"a": ') == f"{f}: not JSON (Expecting value at line 1 column 7)"
    assert refusal(f, b'"\xff"') == f"{f}: not UTF-8 (byte 1)"
    assert refusal(f, b"[]" * 10, max_bytes=8) == f"{f}: larger than 8 bytes; not a file Procurator reads"
    assert (
        refusal(f, b"[" * 100_000, max_bytes=200_000)
        == f"{f}: not JSON that can be read (RecursionError): nested too deeply"
    )
    assert refusal(f, b"1" * 5000, max_bytes=10_000).startswith(
        f"{f}: not JSON that can be read (ValueError): "
    )
    (tmp_path / "d").mkdir()
    with pytest.raises(ValidationError, match=r"d: a directory, not a file$"):
        jsonread.read_file(tmp_path / "d", 10)
    f.write_bytes(b'{"a": [1, {"b": null}]}')
    assert jsonread.read_file(f, 100) == {"a": [1, {"b": None}]}


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


def refused(call: object) -> str:
    assert callable(call)
    with pytest.raises(ValidationError) as caught:
        call()
    return caught.value.message


def test_each_accessor_refuses_in_one_vocabulary() -> None:
    r = Reader(
        "f.json", {"s": 3, "n": True, "big": 7, "c": "green", "o": [], "l": ["a", 1], "x": None}, "top"
    )
    assert refused(lambda: r.text("s")) == "f.json: top.s: expected a string, not 3"
    assert refused(lambda: r.text("missing")) == "f.json: top.missing: missing; expected a string"
    assert refused(lambda: r.integer("n")) == "f.json: top.n: expected a whole number, not true"
    assert refused(lambda: r.integer("big", maximum=5)) == "f.json: top.big: must be at most 5, found 7"
    assert refused(lambda: r.integer("big", maximum=5, what="a count from 1 to 5")) == (
        "f.json: top.big: expected a count from 1 to 5, not 7"
    )
    assert (
        refused(lambda: r.number("big", maximum=5)) == "f.json: top.big: expected a number from 0 to 5, not 7"
    )
    assert refused(lambda: r.enum("c", Colour)) == "f.json: top.c: 'green' is not one of red, blue"
    assert refused(lambda: r.obj("o")) == "f.json: top.o: expected an object, not []"
    assert refused(lambda: r.strings("l")) == 'f.json: top.l: expected a list of strings, not ["a", 1]'
    assert refused(lambda: r.boolean("x")) == "f.json: top.x: expected true or false, not null"
    assert refused(lambda: r.only(["s", "n"])) == "f.json: top.big: unknown setting; known: n, s"
    assert (r.opt_text("x"), r.opt_text("absent"), r.text("absent", "d"), r.boolean("absent", True)) == (
        None,
        None,
        "d",
        True,
    )
    assert r.obj("x", nullable=True).data == {}
    assert refused(lambda: Reader("f.json", {"l": [{"a": 1}, 2]}).items("l")) == (
        "f.json: l[1]: expected an object, not 2"
    )


def test_a_document_of_another_schema_is_refused_with_the_fix() -> None:
    assert Reader.versioned("f", {"schema": 1}, 1, what="a thing").data == {"schema": 1}
    assert refused(lambda: Reader.versioned("f", {"schema": 2}, 1, what="a thing", fix="upgrade it")) == (
        "f: schema: unknown schema version 2; this procurator reads 1 (upgrade it)"
    )
    assert refused(lambda: Reader.versioned("f", {}, 1, what="a thing")) == (
        "f: schema: expected a thing of schema 1, not null"
    )
    assert refused(lambda: Reader.versioned("f", [1], 1, what="a thing")) == (
        "f: schema: expected a thing of schema 1, not [1]"
    )
    assert refused(lambda: Reader.versioned("f", {"schema": True}, 1, what="a thing")) == (
        "f: schema: expected a thing of schema 1, not true"
    )
