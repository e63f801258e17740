"""The only place Procurator runs subprocesses.

`run` executes a command to completion with a bounded timeout and returns its output; `spawn` starts a
long-lived process (a hypervisor) in its own session. Both log the argv at debug level and translate
OSError and non-zero exits into `ProcessError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from procurator.errors import ProcessError, WaitTimeoutError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input_text: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Completed:
    """Run `argv` to completion (at most `timeout` seconds); raise ProcessError on failure if `check`."""
    args = tuple(str(a) for a in argv)
    log.debug("run: %s", " ".join(args))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            args,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ProcessError(f"{args[0]}: command not found; install it (make setup)", argv=args) from exc
    except subprocess.TimeoutExpired as exc:
        raise WaitTimeoutError(f"`{' '.join(args[:3])}` to finish", timeout) from exc
    except OSError as exc:
        raise ProcessError(f"{args[0]}: cannot run: {exc.strerror}", argv=args) from exc
    done = Completed(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit code {proc.returncode}"
        raise ProcessError(
            f"{args[0]} failed: {detail}", argv=args, returncode=proc.returncode, stderr=proc.stderr
        )
    return done


def spawn(
    argv: Sequence[str],
    *,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    stderr: IO[bytes] | int | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    netns: str | None = None,
    join: Callable[[int], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived process in its own session (it survives our exit and our signals).

    With `netns`, the process runs inside that named network namespace (`ip netns exec` execs in
    place, so the pid is the process's own). `join` is called with the child's pid as soon as it is
    started (it puts the hypervisor into its VM's cgroup before its guest runs); when it fails, the
    child is killed and reaped and the error raised.
    """
    args = tuple(str(a) for a in argv)
    group: int | None = None
    extra_groups: list[int] | None = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError as exc:
            raise ProcessError(
                f"user {user!r} does not exist; create it or fix the worker config's `user`", argv=args
            ) from exc
        group = entry.pw_gid
        extra_groups = os.getgrouplist(user, entry.pw_gid)
    if netns is not None:
        if user is not None:
            # Entering a namespace needs privileges the user lacks: enter first, then drop them. Both
            # steps exec in place, so the pid is still the hypervisor's own.
            drop = ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--"]
            args = (*drop, *args)
            user, group, extra_groups = None, None, None
        args = ("ip", "netns", "exec", netns, *args)
    log.debug("spawn: %s", " ".join(args))
    full_env = None if env is None else {**os.environ, **env}
    try:
        child = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
    except FileNotFoundError as exc:
        raise ProcessError(
            f"{args[0]}: not found; install it or set its path in the worker config", argv=args
        ) from exc
    except (OSError, ValueError) as exc:
        raise ProcessError(f"{args[0]}: cannot start: {exc}", argv=args) from exc
    if join is not None:
        try:
            join(child.pid)
        except BaseException:
            child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5.0)
            raise
    return child


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def process_start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), None if gone.

    Recorded with a pid so that a recycled pid is never mistaken for our process.
    """
    stat = _stat(pid)
    return None if stat is None else stat[1]


def alive(pid: int, start_time: int | None) -> bool:
    """Whether `pid` is running (not a zombie) and is the very process that started at `start_time`."""
    if pid <= 0:
        return False
    stat = _stat(pid)
    if stat is None or stat[0] in {"Z", "X"}:
        return False
    return start_time is None or stat[1] == start_time


def signal_process(pid: int, sig: signal.Signals) -> bool:
    """Send `sig` to `pid`; False if it no longer exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, start_time: int | None, timeout: float, *, poll: float = 0.05) -> bool:
    """Wait (bounded) until the process is gone, reaping it if it is our child. True if gone."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not alive(pid, start_time):
            # It may have turned zombie since the waitpid above: reap it now, or it stays one.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
