"""Remove what a killed predecessor left, before anything else takes the state lock's work in hand.

A process killed mid-start (kill -9 of `procurator apply` or `up`, or of the worker) can leave a
hypervisor running with no record naming it, its VM directory, its TAPs and its cgroup. `sweep` removes
exactly those: hypervisors that lead their own session and name a VM directory's API socket or event file
but are not the process a record names, VM directories without a record, Procurator TAPs of VMs without
a record, and the cgroups of VMs whose hypervisor does not run (a kill -9 of a hypervisor leaves its
group). `locked` takes the state lock and sweeps only when its previous holder died holding it (the state
lock knows: `StateDir.interrupted`), so every command that changes this host starts from a clean state and
one re-run converges, while a lock released normally costs no /proc scan and no netlink dump.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

from procurator import cgroup, network, process
from procurator.errors import CgroupError, ProcuratorError
from procurator.net.config import NetworkConfig
from procurator.state import LOCK_TIMEOUT, SLOT_MARK, StateDir, VmRecord

log = logging.getLogger(__name__)

KILL_WAIT = 5.0  # seconds a swept hypervisor gets to vanish after SIGKILL


@contextlib.contextmanager
def locked(
    state: StateDir,
    net: NetworkConfig,
    timeout: float = LOCK_TIMEOUT,
    *,
    cgroup_base: str | None = cgroup.DEFAULT_V2_BASE,
) -> Iterator[None]:
    """Hold the state lock; when its previous holder was killed holding it, sweep first."""
    outermost = not state.held()
    with state.lock(timeout):
        if outermost and state.interrupted():
            log.warning("the last holder of %s died holding it; sweeping what it left", state.lock_path)
            sweep(state, net, cgroup_base=cgroup_base)
        yield


def sweep(
    state: StateDir, net: NetworkConfig, *, cgroup_base: str | None = cgroup.DEFAULT_V2_BASE
) -> list[str]:
    """Kill unrecorded hypervisors, remove VM directories and TAPs without a record and the cgroups of
    VMs whose hypervisor is gone; what was done. `cgroup_base`: the v2 base (None: cgroups off)."""
    done: list[str] = []
    with state.lock():
        readable, damaged = state.scan()
        records = {r.name: r for r in readable}
        # A VM whose record is damaged is left as it is (its hypervisor, directory and TAPs) until
        # `procurator down NAME` decides: what runs there may be the VM, and a sweep must not guess.
        aside = {d.name for d in damaged}
        # a blue-green generation runs as `<name>@<slot>`: its directory, TAPs, cgroup and lease
        runtimes = {r.runtime for r in records.values()}
        kept = set(records) | runtimes | aside
        for bad in damaged:
            log.warning("sweep: leaving %s alone: %s", bad.name, bad.error)
        vms_dir = state.vms_dir
        dirs = sorted(p.name for p in vms_dir.iterdir() if p.is_dir()) if vms_dir.is_dir() else []
        keep = {r.pid for r in records.values() if r.pid > 0 and process.alive(r.pid, r.start_time)}
        for pid, name in hypervisors_in(vms_dir, [d for d in dirs if d not in aside]):
            if pid in keep:
                continue
            log.warning("killing hypervisor pid %d of %s, which no record names", pid, name)
            _kill(pid)
            done.append(f"killed pid {pid} ({name})")
        for name in dirs:
            if name not in kept:
                with contextlib.suppress(ProcuratorError):
                    network.detach_vm(net, name)
                state.remove_vm_dir(name)
                done.append(f"removed {name}, which had no record")
        try:
            taps = network.list_taps(net)
        except ProcuratorError as exc:
            log.info("cannot list TAPs: %s", exc)
            taps = []
        for vm in sorted({t.vm for t in taps} - runtimes - aside):
            network.detach_vm(net, vm)
            done.append(f"removed the TAPs of {vm}, which has no record")
        done += _sweep_generations(state, net, runtimes, list(records.values()))
        live = {r.runtime for r in records.values() if r.pid > 0 and process.alive(r.pid, r.start_time)}
        done += _sweep_groups(cgroup_base, cgroup.scope_of(state.root), live | aside)
    for line in done:
        log.info("sweep: %s", line)
    return done


def _sweep_generations(
    state: StateDir, net: NetworkConfig, runtimes: set[str], records: list[VmRecord]
) -> list[str]:
    """The leases of blue-green generations no record names, and the service DNATs as the records say
    (an apply killed between writing the record and the nftables change, or during the drain)."""
    done: list[str] = []
    try:
        leases = network.Leases(state.leases_path, net)
        for name in sorted(leases.all()):
            if SLOT_MARK in name and name not in runtimes:
                leases.release(name)
                done.append(f"released the lease of {name}, which no record names")
        wanted = sorted((r.service_ip, r.ip) for r in records if r.slot and r.service_ip and r.ip)
        if wanted != network.current_services(net):
            network.net_up(net, services=wanted)
            done.append(f"set the service DNATs to {wanted}")
    except ProcuratorError as exc:
        log.warning("sweep: cannot clean blue-green leftovers: %s", exc)
    return done


def _sweep_groups(base: str | None, scope: str, keep: set[str]) -> list[str]:
    """Remove the cgroups of VMs not in `keep` (their hypervisors are gone or were just killed)."""
    if base is None:
        return []
    done: list[str] = []
    try:
        drv = cgroup.driver(base, scope=scope)
        for name in [] if drv is None else drv.leftovers():
            if name in keep:
                continue
            if drv is not None and drv.remove(name, timeout=KILL_WAIT):
                done.append(f"removed the cgroup of {name}, whose hypervisor is gone")
            elif drv is not None:
                log.warning("sweep: the cgroup of %s still holds %s", name, drv.pids(name))
    except CgroupError as exc:
        log.warning("sweep: cannot clean the VMs' cgroups: %s", exc)
    return done


def kill_strays(state: StateDir, name: str) -> list[int]:
    """Kill every hypervisor running in VM `name`'s directory (its record says none should); their pids."""
    vms = state.vms_dir
    generations = [p.name for p in vms.glob(f"{name}{SLOT_MARK}*")] if vms.is_dir() else []
    found = [pid for pid, _ in hypervisors_in(state.vms_dir, [name, *generations])]
    for pid in found:
        log.warning("%s: killing hypervisor pid %d, which its record does not name", name, pid)
        _kill(pid)
    return found


def _kill(pid: int) -> None:
    process.signal_process(pid, signal.SIGKILL)
    if not process.wait_gone(pid, None, KILL_WAIT):
        log.error("pid %d still runs %.0fs after SIGKILL", pid, KILL_WAIT)


def hypervisors_in(vms_dir: Path, names: Sequence[str]) -> list[tuple[int, str]]:
    """(pid, VM name) of session leaders whose command line names a VM's API socket or event file."""
    wanted = set(names)
    if not wanted:
        return []
    prefix = f"{vms_dir}/"
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            text = arg.decode(errors="replace")
            if prefix not in text:
                continue
            name, _, rest = text.split(prefix, 1)[1].partition("/")
            if name in wanted and rest.startswith(("api.sock", "events")):
                found.append((pid, name))
                break
    return found
