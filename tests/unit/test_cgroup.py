"""procurator/cgroup.py's v2 driver against a directory laid out as cgroupfs (this host has cgroup v1 only;
tests/integration/test_cgroup.py runs the v1 driver on the real hierarchy), and the choice of driver from
/proc/mounts. What is asserted is what the kernel's cgroup-v2 interface expects (Documentation/admin-guide/
cgroup-v2.rst): `+ctrl` words in cgroup.subtree_control, memory.max in bytes, cpu.max "$MAX $PERIOD",
cpu.weight 1-10000, io.weight "default $WEIGHT", a pid in cgroup.procs."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator import cgroup
from procurator.errors import CgroupError

INTERFACE = ("cgroup.procs", "memory.max", "memory.swap.max", "cpu.max", "cpu.weight", "io.weight")


def cgroupfs(root: Path, *, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    """The unified hierarchy's root and the groups the kernel would populate on mkdir (files empty)."""
    for directory in (root, root / "procurator.slice"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.controllers").write_text(controllers + "\n")
        (directory / "cgroup.subtree_control").write_text("")
        (directory / "cgroup.procs").write_text("")
    return root


def vm_group(root: Path, name: str, files: tuple[str, ...] = INTERFACE) -> Path:
    directory = root / "procurator.slice" / f"vm-{name}"
    directory.mkdir()
    for file in files:
        (directory / file).write_text("")
    return directory


LIMITS = cgroup.Limits(memory_max=384 * 1024 * 1024, cpu_quota_us=150_000, cpu_weight=200, io_weight=50)


def test_v2_create_writes_what_the_kernel_expects(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    directory = vm_group(root, "web")
    group = cgroup.V2(root).create("web", LIMITS)

    assert group.dirs == (directory,)
    # Controllers enabled top-down: in the root for procurator.slice, in the slice for its VMs.
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +io"
    assert (root / "procurator.slice" / "cgroup.subtree_control").read_text() == "+memory +cpu +io"
    assert (directory / "memory.max").read_text() == "402653184"
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "cpu.max").read_text() == "150000 100000"
    assert (directory / "cpu.weight").read_text() == "200"
    assert (directory / "io.weight").read_text() == "default 50"

    cgroup.V2(root).join(group, 4242)
    assert (directory / "cgroup.procs").read_text() == "4242"
    assert cgroup.V2(root).verify(group, LIMITS) == ()


def test_v2_no_quota_is_max(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    directory = vm_group(root, "web")
    cgroup.V2(root).create("web", cgroup.Limits(memory_max=1 << 30))
    assert (directory / "cpu.max").read_text() == "max 100000"
    assert (directory / "cpu.weight").read_text() == "100"


def test_v2_enables_only_what_is_not_enabled_yet(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    (root / "cgroup.subtree_control").write_text("cpu memory io\n")  # as the kernel shows them
    vm_group(root, "web")
    cgroup.V2(root).create("web", LIMITS)
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory io\n"  # not written again


def test_v2_a_missing_controller_is_named_with_the_fix(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup", controllers="cpuset pids")
    with pytest.raises(CgroupError) as caught:
        cgroup.V2(root).create("web", LIMITS)
    assert str(caught.value) == (
        f"{root}/cgroup.controllers lacks memory, cpu, io; enable them in the parent's "
        "cgroup.subtree_control (systemd: Delegate=yes on the worker unit)"
    )


def test_v2_the_workers_delegated_base(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    base = root / "procurator.slice" / "procurator-worker.service"
    base.mkdir()
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("")
    (base / "vm-web").mkdir()
    for file in INTERFACE:
        (base / "vm-web" / file).write_text("")
    drv = cgroup.V2(root, "procurator.slice/procurator-worker.service")
    assert drv.create("web", LIMITS).dirs == (base / "vm-web",)
    assert (base / "cgroup.subtree_control").read_text() == "+memory +cpu +io"
    assert drv.leftovers() == ["web"]


def test_v2_without_iocost_the_io_weight_is_reported_not_failed(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    vm_group(root, "web", tuple(f for f in INTERFACE if f != "io.weight"))
    drv = cgroup.V2(root)
    group = drv.create("web", LIMITS)
    assert drv.verify(group, LIMITS) == ("io weight: no io.weight on this host (its kernel has no iocost)",)


def test_v2_verify_refuses_a_limit_that_reads_back_otherwise(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    directory = vm_group(root, "web")
    drv = cgroup.V2(root)
    group = drv.create("web", LIMITS)
    (directory / "memory.max").write_text("max\n")
    with pytest.raises(CgroupError, match=r"memory.max: reads 'max' after writing '402653184'"):
        drv.verify(group, LIMITS)


def test_v2_usage_and_removal(tmp_path: Path) -> None:
    root = cgroupfs(tmp_path / "cgroup")
    directory = vm_group(root, "web", ())
    (directory / "memory.current").write_text("123456\n")
    (directory / "memory.max").write_text("402653184\n")
    (directory / "cpu.stat").write_text("usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\n")
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    drv = cgroup.V2(root)
    assert drv.usage("web") == cgroup.Usage(
        memory_bytes=123456, memory_max=402653184, cpu_usec=5000, oom_kills=1
    )
    assert drv.usage("db") is None
    for file in list(directory.iterdir()):  # cgroupfs removes a group's files with it; a tmp dir cannot
        file.unlink()
    assert drv.remove("web")
    assert drv.leftovers() == []


def test_driver_from_mounts(tmp_path: Path) -> None:
    v1_only = (
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n"
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n"
    )
    v2, v1 = cgroup.parse_mounts(v1_only)
    assert v2 == Path("/sys/fs/cgroup/unified")
    joint = Path("/sys/fs/cgroup/cpu,cpuacct")
    assert v1 == {"cpu": joint, "cpuacct": joint, "memory": Path("/sys/fs/cgroup/memory")}
    # A joint cpu,cpuacct hierarchy is one directory per VM, not two.
    dirs = cgroup.V1(v1).dirs("web")
    assert dirs == (Path("/sys/fs/cgroup/memory/procurator/vm-web"), joint / "procurator" / "vm-web")

    # The unified hierarchy is chosen when it holds memory and cpu.
    root = cgroupfs(tmp_path / "unified", controllers="cpu io memory pids")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {root} cgroup2 rw,relatime 0 0\n")
    drv = cgroup.driver(mounts=mounts)
    assert isinstance(drv, cgroup.V2)
    assert drv.base_dir == root / "procurator.slice"
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert cgroup.driver(mounts=mounts) is None
