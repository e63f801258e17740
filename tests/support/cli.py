"""The `procurator` command the tests run: this checkout's console script, `make setup`'s
`.venv/bin/procurator`; when the tests run from another environment (a venv made elsewhere, pytest
installed by hand), which may have no console script or one of another checkout, a launcher of this
checkout's `procurator.cli:main` for the interpreter running the tests, written once per checkout and
interpreter under the temporary directory."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _launcher() -> Path:
    key = hashlib.sha256(f"{REPO}\0{sys.executable}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"procurator-tests-{key}" / "procurator"
    text = (
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from procurator.cli import main\n"
        "sys.exit(main())\n"
    )
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(f".procurator.{os.getpid()}")
        partial.write_text(text)
        partial.chmod(0o755)
        partial.replace(path)  # atomic: parallel test processes see the old file or the new one
    return path


_OWN = REPO / ".venv" / "bin" / "procurator"
PROCURATOR = _OWN if _OWN.is_file() else _launcher()
