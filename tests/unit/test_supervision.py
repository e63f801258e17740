"""Supervision: the pure decision (policy x exit kind x backoff x crash loop, on a fake clock), and how
an exit is observed from the process table and the event monitor file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator import process
from procurator.hypervisor.base import GuestEnd
from procurator.hypervisor.cloud_hypervisor import CloudHypervisor
from procurator.hypervisor.qemu import Qemu
from procurator.models import Restart, RestartPolicy
from procurator.process import PidWatch
from procurator.state import StateDir, VmRecord
from procurator.supervision import Decision, ExitKind, Limits, Verdict, backoff_delay, decide, recent
from procurator.worker import RecordCache, observe_exit

ALWAYS = Restart(RestartPolicy.ALWAYS, max_restarts=5, backoff_seconds=1.0)
ON_FAILURE = Restart(RestartPolicy.ON_FAILURE, max_restarts=5, backoff_seconds=1.0)
NEVER = Restart(RestartPolicy.NEVER, max_restarts=5, backoff_seconds=1.0)


def at(
    restart: Restart, kind: ExitKind, now: float, *, exited_at: float = 0.0, restarts: tuple[float, ...] = ()
) -> Decision:
    return decide(
        restart,
        kind,
        exited_at=exited_at,
        restarts=restarts,
        now=now,
        limits=Limits(window=600, max_backoff=300),
    )


# --- policy x exit kind ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "kind", "verdict"),
    [
        (ALWAYS, ExitKind.CRASHED, Verdict.RESTART),
        (ALWAYS, ExitKind.POWERED_OFF, Verdict.RESTART),
        (ON_FAILURE, ExitKind.CRASHED, Verdict.RESTART),
        (ON_FAILURE, ExitKind.POWERED_OFF, Verdict.LEAVE),
        (NEVER, ExitKind.CRASHED, Verdict.LEAVE),
        (NEVER, ExitKind.POWERED_OFF, Verdict.LEAVE),
    ],
)
def test_policy_decides_by_exit_kind(restart: Restart, kind: ExitKind, verdict: Verdict) -> None:
    decision = at(restart, kind, now=10.0)
    assert decision.verdict is verdict
    if verdict is Verdict.LEAVE:
        assert decision.due is None
        assert decision.reason


def test_leave_reasons_name_the_policy() -> None:
    assert "never" in at(NEVER, ExitKind.CRASHED, 10).reason
    assert "on-failure" in at(ON_FAILURE, ExitKind.POWERED_OFF, 10).reason


# --- backoff ---------------------------------------------------------------------------------------


def test_waits_for_the_backoff_after_the_exit() -> None:
    assert at(ALWAYS, ExitKind.CRASHED, now=0.0, exited_at=0.0) == Decision(
        Verdict.WAIT, "crashed; backoff until restart 1", 1.0
    )
    assert at(ALWAYS, ExitKind.CRASHED, now=0.999, exited_at=0.0).verdict is Verdict.WAIT
    restart = at(ALWAYS, ExitKind.CRASHED, now=1.0, exited_at=0.0)
    assert (restart.verdict, restart.due) == (Verdict.RESTART, 1.0)
    assert restart.reason == "crashed; restart 1 of 5"


@pytest.mark.parametrize(("earlier", "delay"), [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0)])
def test_backoff_doubles_with_each_recent_restart(earlier: int, delay: float) -> None:
    restarts = tuple(float(100 + i) for i in range(earlier))
    decision = at(ALWAYS, ExitKind.CRASHED, now=200.0, exited_at=200.0, restarts=restarts)
    assert (decision.verdict, decision.due) == (Verdict.WAIT, 200.0 + delay)


def test_backoff_is_capped() -> None:
    slow = Restart(RestartPolicy.ALWAYS, max_restarts=20, backoff_seconds=10.0)
    restarts = tuple(float(i) for i in range(8))  # 10 * 2^8 = 2560 > cap
    decision = decide(
        slow, ExitKind.CRASHED, exited_at=50.0, restarts=restarts, now=50.0, limits=Limits(max_backoff=60.0)
    )
    assert decision.due == 110.0
    assert backoff_delay(1.0, 10_000, 300.0) == 300.0  # no overflow for huge attempt counts
    assert backoff_delay(0.0, 3, 300.0) == 0.0
    assert backoff_delay(2.0, 0, 300.0) == 2.0


def test_zero_backoff_restarts_at_once() -> None:
    eager = Restart(RestartPolicy.ALWAYS, max_restarts=3, backoff_seconds=0.0)
    assert (
        decide(eager, ExitKind.CRASHED, exited_at=5.0, restarts=(1.0, 2.0), now=5.0).verdict
        is Verdict.RESTART
    )


# --- crash loop ------------------------------------------------------------------------------------


def test_gives_up_after_max_restarts_within_the_window() -> None:
    restarts = (10.0, 20.0, 30.0, 40.0, 50.0)
    decision = at(ALWAYS, ExitKind.CRASHED, now=60.0, exited_at=60.0, restarts=restarts)
    assert decision.verdict is Verdict.GIVE_UP
    assert decision.reason == "crash loop: 5 restarts within 600s (maxRestarts 5)"


def test_restarts_older_than_the_window_do_not_count() -> None:
    restarts = (10.0, 20.0, 30.0, 40.0, 700.0)  # only 700 lies within 600 s of 1000
    decision = at(ALWAYS, ExitKind.CRASHED, now=1000.0, exited_at=1000.0, restarts=restarts)
    assert (decision.verdict, decision.due) == (Verdict.WAIT, 1002.0)
    assert recent(restarts, 1000.0, 600.0) == [700.0]


def test_max_restarts_zero_gives_up_at_the_first_crash() -> None:
    once = Restart(RestartPolicy.ON_FAILURE, max_restarts=0, backoff_seconds=1.0)
    assert at(once, ExitKind.CRASHED, now=0.0).verdict is Verdict.GIVE_UP


def test_a_power_off_under_never_is_left_even_in_a_crash_loop() -> None:
    decision = at(NEVER, ExitKind.POWERED_OFF, now=60.0, restarts=(10.0, 20.0, 30.0, 40.0, 50.0))
    assert decision.verdict is Verdict.LEAVE


def test_a_crash_looping_vm_on_a_fake_clock() -> None:
    """The loop's use of `decide`: a VM that crashes the moment it starts, driven by a fake clock."""
    clock = 0.0
    exited_at = 0.0
    restarts: list[float] = []
    verdicts: list[tuple[float, Verdict]] = []
    while clock < 100.0:
        decision = at(ALWAYS, ExitKind.CRASHED, now=clock, exited_at=exited_at, restarts=tuple(restarts))
        if decision.verdict is Verdict.RESTART:
            restarts.append(clock)
            exited_at = clock  # crashes again at once
            verdicts.append((clock, decision.verdict))
        elif decision.verdict is Verdict.GIVE_UP:
            verdicts.append((clock, decision.verdict))
            break
        clock += 0.25
    assert verdicts == [
        (1.0, Verdict.RESTART),
        (3.0, Verdict.RESTART),
        (7.0, Verdict.RESTART),
        (15.0, Verdict.RESTART),
        (31.0, Verdict.RESTART),
        (31.25, Verdict.GIVE_UP),  # the next pass: five restarts within the window
    ]


def test_decide_is_pure() -> None:
    args = {"exited_at": 3.0, "restarts": (1.0, 2.0), "now": 4.0, "limits": Limits()}
    assert decide(ALWAYS, ExitKind.CRASHED, **args) == decide(ALWAYS, ExitKind.CRASHED, **args)  # type: ignore[arg-type]


# --- observing exits -------------------------------------------------------------------------------


def record_of(pid: int, vm_dir: Path, *, backend: str = "cloud-hypervisor") -> VmRecord:
    start = process.process_start_time(pid)
    assert start is not None
    return VmRecord(
        name="web",
        bundle="/nix/store/x-web",
        generation="x",
        backend=backend,
        pid=pid,
        start_time=start,
        api_socket=str(vm_dir / "api.sock"),
        vm_dir=str(vm_dir),
    )


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", "30"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def wait_dead(pid: int, start: int) -> None:
    deadline = time.monotonic() + 10
    while process.alive(pid, start):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.01)


def cloud_hypervisor() -> CloudHypervisor:
    """A backend object (its binary never runs here): what supervision asks `guest_end` of."""
    return CloudHypervisor(Path("cloud-hypervisor"))


def write_events(vm_dir: Path, *events: tuple[str, str]) -> None:
    vm_dir.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(
        json.dumps(
            {"timestamp": {"secs": 0, "nanos": 0}, "source": s, "event": e, "properties": None}, indent=2
        )
        for s, e in events
    )
    (vm_dir / "events").write_text(text + "\n\n")


def test_a_running_vm_has_no_exit(child: subprocess.Popen[bytes], tmp_path: Path) -> None:
    write_events(tmp_path, ("vmm", "starting"), ("vm", "booted"))
    assert observe_exit(record_of(child.pid, tmp_path), cloud_hypervisor()) is None


def test_a_killed_child_is_a_crash_named_by_its_signal(
    child: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    record = record_of(child.pid, tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    wait_dead(record.pid, record.start_time)
    found = observe_exit(record, cloud_hypervisor())
    assert found is not None
    assert (found.kind, found.detail, found.process_gone) == (
        ExitKind.CRASHED,
        "hypervisor killed by SIGKILL",
        True,
    )
    assert child.poll() == -signal.SIGKILL  # observing did not reap it: its owner still can


def test_exit_codes_of_a_child(tmp_path: Path) -> None:
    for code, kind, detail in [
        (0, ExitKind.POWERED_OFF, "hypervisor exited 0"),
        (3, ExitKind.CRASHED, "hypervisor exited 3"),
    ]:
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import time, sys; time.sleep(0.2); sys.exit({code})"]
        )
        record = record_of(proc.pid, tmp_path)
        wait_dead(record.pid, record.start_time)
        found = observe_exit(record, cloud_hypervisor())
        assert found is not None
        assert (found.kind, found.detail) == (kind, detail)
        assert proc.wait(timeout=5) == code


GRANDCHILD = """
import subprocess
p = subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid)
"""


def test_a_process_that_is_not_our_child_vanishes(tmp_path: Path) -> None:
    # A grandchild: after its parent exits, it is not ours to wait for.
    out = subprocess.run(
        [sys.executable, "-c", GRANDCHILD],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    pid = int(out.stdout)
    try:
        record = record_of(pid, tmp_path)
        assert observe_exit(record, cloud_hypervisor()) is None
        os.kill(pid, signal.SIGKILL)
        wait_dead(record.pid, record.start_time)
        found = observe_exit(record, cloud_hypervisor())
        assert found is not None
        assert (found.kind, found.detail) == (ExitKind.CRASHED, "hypervisor process vanished")
        write_events(tmp_path, ("vmm", "starting"), ("vm", "booted"), ("vm", "shutdown"), ("vmm", "shutdown"))
        found = observe_exit(record, cloud_hypervisor())
        assert found is not None
        assert (found.kind, found.detail) == (ExitKind.POWERED_OFF, "guest powered off")
    finally:
        process.signal_process(pid, signal.SIGKILL)


def test_a_guest_power_off_under_no_shutdown_leaves_the_process(
    child: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    watch = cloud_hypervisor()
    record = record_of(child.pid, tmp_path)
    write_events(tmp_path, ("vmm", "starting"), ("vm", "booted"))
    assert observe_exit(record, watch) is None
    write_events(tmp_path, ("vmm", "starting"), ("vm", "booted"), ("vm", "shutdown"), ("vm", "deleted"))
    found = observe_exit(record, watch)
    assert found is not None
    assert (found.kind, found.detail, found.process_gone) == (
        ExitKind.POWERED_OFF,
        "guest powered off",
        False,
    )
    # the qemu backend has no event file: only the process counts
    assert observe_exit(record_of(child.pid, tmp_path, backend="qemu"), Qemu()) is None


def test_a_guest_panic_is_a_crash(child: subprocess.Popen[bytes], tmp_path: Path) -> None:
    write_events(tmp_path, ("vmm", "starting"), ("vm", "booted"), ("vm", "panic"), ("vm", "shutdown"))
    found = observe_exit(record_of(child.pid, tmp_path), cloud_hypervisor())
    assert found is not None
    assert (found.kind, found.detail) == (ExitKind.CRASHED, "guest panicked")


def test_the_event_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    watch = cloud_hypervisor()
    path = tmp_path / "events"
    write_events(tmp_path, ("vm", "booted"))
    assert watch.guest_end(tmp_path) is None
    stat = path.stat()
    junk = "not json at all, and not read again\n"
    path.write_text(junk + " " * (stat.st_size - len(junk)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert watch.guest_end(tmp_path) is None
    write_events(tmp_path, ("vm", "booted"), ("vm", "shutdown"))
    assert watch.guest_end(tmp_path) is GuestEnd.SHUTDOWN
    path.unlink()
    assert watch.guest_end(tmp_path) is None


# --- the loop's cheap observers --------------------------------------------------------------------


def test_pid_watch_reports_exits_in_one_pass(tmp_path: Path) -> None:
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    watch = PidWatch()
    try:
        keys = []
        for proc in procs:
            start = process.process_start_time(proc.pid)
            assert start is not None
            keys.append((proc.pid, start))
        recycled = (keys[2][0], keys[2][1] + 1)  # same pid, another start time: not that process
        assert watch.exited([*keys, (2**22 + 7, 1)]) == {(2**22 + 7, 1)}
        assert watch.exited([*keys, recycled]) == {recycled}
        procs[1].kill()
        procs[1].wait(timeout=10)  # reaped
        procs[2].kill()  # a zombie until waited for
        wait_dead(*keys[2])
        assert watch.exited(keys) == {keys[1], keys[2]}
        assert watch.exited(keys[:1]) == set()  # the others' pidfds are closed
        assert len(watch._fds) == 1
    finally:
        watch.close()
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
    assert watch._fds == {}


def test_record_cache_parses_a_record_again_only_when_it_is_rewritten(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    cache = RecordCache(state)
    assert cache.records() == []
    base = record_of(os.getpid(), tmp_path)
    state.save_record(base)
    state.save_record(base.with_(name="api"))
    first = cache.records()
    assert [r.name for r in first] == ["api", "web"]
    again = cache.records()
    assert all(a is b for a, b in zip(first, again, strict=True))  # not parsed again
    state.save_record(base.with_(restarts=3))
    assert [r.restarts for r in cache.records()] == [0, 3]
    state.remove_vm_dir("api")
    (state.vms_dir / "half-made").mkdir()  # a directory without a record (a start in progress)
    assert [r.name for r in cache.records()] == ["web"]
