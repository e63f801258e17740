"""The only place Procurator runs subprocesses, and watches processes end.

`run` executes a command to completion with a bounded timeout and returns its output, here or, with
`remote=SshRemote(...)`, on another host over ssh (the only place an ssh command line is made);
`spawn` starts a long-lived process (a hypervisor) in its own session. Both log the argv at debug
level and translate OSError and non-zero exits into `ProcessError`. `alive` and `process_start_time`
read /proc/PID/stat; `PidWatch` tells which of many processes exited (one poll over their pidfds),
`ExitWatch` waits for one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from procurator import procstat, waits
from procurator.errors import ProcessError, WaitTimeoutError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class SshRemote:
    """A host that `run(argv, remote=...)` reaches with the system's ssh:

        ssh -n OPTIONS -- TARGET 'shlex.join(argv)'

    ssh hands the host's shell one command line; `argv` is quoted into it word by word, so every
    argument arrives as it was given (spaces, quotes, `$` and all). `-n`: ssh never reads our stdin.
    With `own_session`, ssh runs in a session of its own (`setsid --wait`): the terminal's Ctrl-C does
    not reach it, so what it runs on the host is not cut off halfway.
    """

    target: str  # [user@]host; never starts with "-" (HostSpec checks)
    options: tuple[str, ...] = ()
    own_session: bool = False

    def argv(self, remote_argv: Sequence[str]) -> tuple[str, ...]:
        """The local argv that runs `remote_argv` on the host."""
        ssh = ("ssh", "-n", *self.options, "--", self.target, shlex.join(str(a) for a in remote_argv))
        return ("setsid", "--wait", *ssh) if self.own_session else ssh

    def control_argv(self, operation: str) -> tuple[str, ...]:
        """`ssh -O OPERATION`: talk to the shared connection's master (ControlPath), not the host."""
        return ("ssh", *self.options, "-O", operation, "--", self.target)


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
    remote: SshRemote | None = None,
) -> Completed:
    """Run `argv` to completion (at most `timeout` seconds); raise ProcessError on failure if `check`.

    With `remote`, `argv` runs on that host over ssh (`SshRemote`) and `Completed.argv` is ssh's;
    `env` and `cwd` are still those of the local process (ssh). A non-zero exit is the remote
    command's, or 255 when ssh itself failed.
    """
    args = tuple(str(a) for a in argv) if remote is None else remote.argv(argv)
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
        what = " ".join(args[:3])
        if remote is not None:
            what = f"ssh {remote.target} {shlex.join(str(a) for a in argv[:2])}"
        raise WaitTimeoutError(f"`{what}` to finish", timeout) from exc
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
    uid: int | None = None,
    gid: int | None = None,
    groups: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a long-lived process in its own session (it survives our exit and our signals).

    With `netns`, the process runs inside that named network namespace (`ip netns exec` execs in
    place, so the pid is the process's own). `join` is called with the child's pid as soon as it is
    started (it puts the hypervisor into its VM's cgroup before its guest runs); when it fails, the
    child is killed and reaped and the error raised. `uid` (with `gid` and the supplementary `groups`,
    none other) runs it as a uid that need not have a passwd entry (a VM's own, procurator/vmusers.py);
    it excludes `user`.
    """
    args = tuple(str(a) for a in argv)
    group: int | None = None
    extra_groups: list[int] | None = None
    ids: int | str | None = user
    if uid is not None:
        if user is not None:
            raise ValueError("spawn: give `user` or `uid`, not both")
        ids, group, extra_groups = uid, uid if gid is None else gid, list(groups)
    elif user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError as exc:
            raise ProcessError(
                f"user {user!r} does not exist; create it or fix the worker config's `user`", argv=args
            ) from exc
        group = entry.pw_gid
        extra_groups = os.getgrouplist(user, entry.pw_gid)
    if netns is not None:
        if ids is not None:
            # Entering a namespace needs privileges the user lacks: enter first, then drop them. Both
            # steps exec in place, so the pid is still the hypervisor's own.
            supplementary = (
                ["--init-groups"]
                if uid is None
                else [f"--groups={','.join(map(str, extra_groups))}"]
                if extra_groups
                else ["--clear-groups"]
            )
            drop = ["setpriv", f"--reuid={ids}", f"--regid={group}", *supplementary, "--"]
            args = (*drop, *args)
            ids, group, extra_groups = None, None, None
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
            user=ids,
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


@dataclass(frozen=True)
class ProcStat:
    """What Procurator reads of /proc/PID/stat (proc(5)): the one reader of that file."""

    state: str  # field 3: R, S, D, Z (zombie), X (dead), ...
    start_time: int  # field 22: clock ticks since boot; with the pid, names one process for good
    cpu_ticks: int  # fields 14 + 15: user and system time of every thread, in clock ticks


def read_stat(pid: int, proc: str = "/proc") -> ProcStat | None:
    """/proc/PID/stat in one read (procstat.py); None if the process is gone (or the file unreadable)."""
    fields = procstat.read(pid, proc)
    return None if fields is None else ProcStat(*fields)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot); None if gone."""
    stat = read_stat(pid)
    return None if stat is None else (stat.state, stat.start_time)


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

    def gone() -> bool:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if alive(pid, start_time):
            return False
        # It may have turned zombie since the waitpid above: reap it now, or it stays one.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return True

    return waits.poll_until(gone, timeout, poll=poll)


# --- watching processes end ---------------------------------------------------------------------------

Key = tuple[int, int | None]  # (pid, start time); None: whatever process has that pid now


class PidWatch:
    """Which of many processes have exited, in one poll() over their pidfds.

    A pidfd refers to one process for good (a recycled pid is never taken for it) and becomes readable
    when that process exits, so a pass over a thousand VMs costs one system call. A process whose pidfd
    cannot be had (no pidfd support, out of descriptors) is looked up in /proc instead.
    """

    def __init__(self) -> None:
        self._fds: dict[Key, int] = {}
        self._keys: dict[int, Key] = {}
        self._unwatched: set[Key] = set()  # alive, but no pidfd: looked up in /proc
        self._poller = select.poll()  # not select(): pidfds of a busy worker may exceed FD_SETSIZE

    def exited(self, keys: Iterable[Key], timeout: float = 0.0) -> set[Key]:
        """The keys among `keys` whose process is gone (or a zombie). With a `timeout`, waits (bounded)
        until at least one is gone; 0 only looks."""
        wanted = set(keys)
        for key in [k for k in self._fds if k not in wanted]:
            self._drop(key)
        self._unwatched &= wanted
        gone: set[Key] = set()
        for key in wanted - self._fds.keys() - self._unwatched:
            if self._watch(key):
                gone.add(key)
        deadline = time.monotonic() + timeout
        while True:
            gone |= {k for k in self._unwatched if not alive(*k)}
            if self._fds:
                wait = (
                    0 if gone or self._unwatched else max(0, math.ceil((deadline - time.monotonic()) * 1000))
                )
                gone.update(self._keys[fd] for fd, _ in self._poller.poll(wait) if fd in self._keys)
            if gone or time.monotonic() >= deadline:
                return gone
            if self._unwatched:
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    def _watch(self, key: Key) -> bool:
        """Start watching `key`; True if its process is already gone."""
        pid, start_time = key
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        except OSError:  # no pidfd support, or out of descriptors
            if not alive(pid, start_time):
                return True
            self._unwatched.add(key)
            return False
        # Checked after opening, so that the pidfd is of the very process (not a recycled pid).
        if not alive(pid, start_time):
            os.close(fd)
            return True
        self._fds[key] = fd
        self._keys[fd] = key
        self._poller.register(fd, select.POLLIN)
        return False

    def _drop(self, key: Key) -> None:
        fd = self._fds.pop(key)
        del self._keys[fd]
        self._poller.unregister(fd)
        os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self._drop(key)
        self._unwatched.clear()


class ExitWatch:
    """Waits for one process to exit (a `PidWatch` of one): `wait(timeout)` returns the moment it does.
    Use as a context manager."""

    def __init__(self, pid: int, start_time: int | None) -> None:
        self._key: Key = (pid, start_time)
        self._watch = PidWatch()
        self._gone = bool(self._watch.exited([self._key]))

    @property
    def pid(self) -> int:
        return self._key[0]

    def __enter__(self) -> ExitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.close()

    def exited(self) -> bool:
        return self.wait(0.0)

    def wait(self, timeout: float) -> bool:
        """Whether the process exited within `timeout` seconds (bounded; 0 only looks)."""
        if not self._gone:
            self._gone = bool(self._watch.exited([self._key], timeout))
        return self._gone
