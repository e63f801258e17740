"""The state lock excludes other processes and other threads, and is lent to an apply's pool threads."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from procurator.errors import LockBusyError, StateError
from procurator.state import StateDir
from tests.support.cli import REPO


def test_another_thread_waits_for_the_holder_and_times_out(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with state.lock(timeout=0.2):
                pass
        except LockBusyError as exc:
            errors.append(exc)

    with state.lock(), state.lock():  # re-entrant in the holding thread
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=10)
    assert len(errors) == 1
    assert "another thread of this process holds the lock" in str(errors[0])
    with state.lock(timeout=1):  # released: free again
        pass


def test_another_process_is_refused_while_held(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from procurator.state import StateDir\n"
        "try:\n    with StateDir(Path(sys.argv[1])).lock(timeout=0.2): print('got it')\n"
        "except Exception as exc: print(type(exc).__name__)\n"
    )
    with StateDir(tmp_path).lock():
        held = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                              timeout=30, check=True, cwd=REPO)  # fmt: skip
    free = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=30, check=True, cwd=REPO)  # fmt: skip
    assert held.stdout.strip() == "LockBusyError"
    assert free.stdout.strip() == "got it"


def test_lent_threads_act_under_the_holders_lock(tmp_path: Path) -> None:
    state = StateDir(tmp_path)

    def step(n: int) -> int:
        with state.lock(timeout=0.2):  # would time out if the lock were not lent
            return n * 2

    with state.lock(), ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(state.lend(step), range(8))) == [n * 2 for n in range(8)]
    with pytest.raises(StateError, match="needs the state lock held"):
        state.lend(step)


def test_a_holder_killed_holding_the_lock_is_known_to_the_next_one(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    with state.lock():
        assert state.interrupted() is False  # a fresh state directory
    with state.lock():
        assert state.interrupted() is False  # released normally
    script = (
        "import os, signal, sys; from pathlib import Path; from procurator.state import StateDir\n"
        "with StateDir(Path(sys.argv[1])).lock(): os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    # cwd: the child imports this checkout's procurator (`-c` puts the working directory on its path)
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=30, check=False, cwd=REPO)
    assert killed.returncode == -9
    with state.lock():
        assert state.interrupted() is True
        with state.lock():  # re-entered: still the same holding
            assert state.interrupted() is True
    with state.lock():
        assert state.interrupted() is False  # this holder released it
    assert state.interrupted() is False  # not held
