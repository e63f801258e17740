"""The one log tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator.logfiles import tail


def test_the_last_lines_of_a_large_file_without_a_cut_line(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("".join(f"line {i:06d} " + "x" * 300 + "\n" for i in range(5000)))
    got = tail(log, 3)
    assert [line[:11] for line in got] == ["line 004997", "line 004998", "line 004999"]
    assert all(len(line) == 312 for line in got)


def test_blank_lines_are_dropped_on_request_and_offset_bounds_the_read(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"old start\n")
    offset = log.stat().st_size
    with log.open("ab") as f:
        f.write(b"  first  \n\n\r\nsecond\r\n\n")
    assert tail(log, 5, offset=offset, nonblank=True) == ["first", "second"]
    assert tail(log, 5, nonblank=True) == ["old start", "first", "second"]
    assert tail(log, 2) == ["second", ""]


def test_a_missing_file_has_no_lines_and_other_errors_are_raised(tmp_path: Path) -> None:
    assert tail(tmp_path / "missing", 5) == []
    assert tail(tmp_path, 0) == []
    with pytest.raises(IsADirectoryError):
        tail(tmp_path, 5)


def test_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"ok\n\xff\xfe bad\n")
    assert tail(log, 2) == ["ok", "\ufffd\ufffd bad"]
