"""Reading the end of a log file (a hypervisor's log, a VM's serial log), the one way Procurator does it.

`tail` reads back from the end in growing blocks, so a large log costs what its last lines cost, never
before `offset` (what an earlier start wrote), and decodes as UTF-8 with replacement.
"""

from __future__ import annotations

from pathlib import Path

BLOCK = 4096
LINE_GUESS = 200  # bytes per line, to size the first block


def tail(path: Path, lines: int, *, offset: int = 0, nonblank: bool = False) -> list[str]:
    """The last `lines` lines of `path` after byte `offset`; with `nonblank`, stripped and without the
    empty ones. A missing file has none; other errors (permission, a directory) are raised."""
    if lines <= 0:
        return []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; FileNotFoundError is an empty log
    except FileNotFoundError:
        return []
    with f:
        size = f.seek(0, 2)
        start = min(offset, size)
        block = min(size - start, max(BLOCK, lines * LINE_GUESS))
        while True:
            f.seek(size - block)
            data = f.read(block)
            if data.count(b"\n") > lines or block == size - start:
                break
            block = min(size - start, block * 2)
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    found = text.splitlines()
    if block < size - start and found:
        found = found[1:]  # the first line of the block may be cut off
    if nonblank:
        found = [line.strip() for line in found if line.strip()]
    return found[-lines:]
