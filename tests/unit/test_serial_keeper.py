"""The serial keeper's log (procurator/serial_keeper.py `_Log`): never past its cap, rotated to `.1`."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator.config import WorkerConfig
from procurator.errors import ValidationError
from procurator.serial_keeper import _Log, main


def test_the_log_never_passes_its_cap_and_keeps_the_newest_bytes(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    log = _Log(path, max_bytes=4096)
    written = b""
    for i in range(50):  # writes of every size, some bigger than the cap
        data = bytes([65 + i % 26]) * (i * 397 % 9000 + 1)
        log.write(data)
        written += data
        assert path.stat().st_size <= 4096
        old = path.with_name("serial.log.1")
        assert not old.exists() or old.stat().st_size == 4096  # a full file is what is rotated
    kept = path.with_name("serial.log.1").read_bytes() + path.read_bytes()
    assert written.endswith(kept)  # nothing lost or reordered between the two files


def test_serial_log_max_bytes_in_the_worker_configuration() -> None:
    assert WorkerConfig.parse("w.json", {}).serial_log_max_bytes == 8 << 20
    assert WorkerConfig.parse("w.json", {"serialLogMaxBytes": 65536}).serial_log_max_bytes == 65536
    for bad in (100, "8M", True, 1 << 41):
        with pytest.raises(ValidationError, match=r"w.json: serialLogMaxBytes: expected bytes from 4096 to"):
            WorkerConfig.parse("w.json", {"serialLogMaxBytes": bad})


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--socket", "s", "--log", "l", "--pid", "1"], "missing --start-time"),
        (["--socket", "s", "--log"], "every flag takes one value"),
        (["--socket", "s", "--socket", "t"], "unknown or repeated flag '--socket'"),
        (["--sockets", "s"], "unknown or repeated flag '--sockets'"),
    ],
)
def test_the_keeper_refuses_flags_it_does_not_know(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"procurator-serial-keeper: {said}\n" in err
    assert "usage: python -m procurator.serial_keeper" in err
