"""The runtime VmConfig: host fields filled in, still valid against cloud-hypervisor's spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator import process
from procurator.models import Bundle, Volume
from procurator.runtime import GuestAddress, NicBinding, runtime_config
from procurator.state import StateDir
from procurator.volumes import ensure_volume
from tests.support import chspec
from tests.support.bundles import meta, vm_config, write_bundle


def test_runtime_config_fills_host_fields_and_validates(tmp_path: Path) -> None:
    bundle = Bundle.load(write_bundle(tmp_path))
    config = runtime_config(
        bundle,
        nics=[NicBinding("eth0", "pc-web-1a2b", "02:aa:bb:cc:dd:ee")],
        volumes={"data": tmp_path / "data.img"},
        serial_log=tmp_path / "serial.log",
        address=GuestAddress("10.100.0.2", 16, "10.100.0.1", "10.100.0.1"),
    )
    assert config["net"] == [{"id": "eth0", "tap": "pc-web-1a2b", "mac": "02:aa:bb:cc:dd:ee"}]
    assert config["disks"][-1] == {
        "id": "vol-data",
        "path": str(tmp_path / "data.img"),
        "readonly": False,
        "image_type": "Raw",
    }
    # every disk says Raw, or cloud-hypervisor v51+ disables its sector 0 writes (vmm/src/device_manager.rs)
    assert all(disk["image_type"] == "Raw" for disk in config["disks"])
    assert config["serial"] == {"mode": "File", "file": str(tmp_path / "serial.log")}
    # cloud-hypervisor refuses Socket for the console device (vmm/src/console_devices.rs)
    assert config["console"] == {"mode": "Pty"}
    assert config["payload"]["cmdline"].endswith(
        "procurator.ip=10.100.0.2/16 procurator.gw=10.100.0.1 procurator.dns=10.100.0.1"
    )
    assert chspec.errors("VmConfig", config) == []
    # the bundle's own config is untouched
    assert "tap" not in bundle.vm_config["net"][0]
    assert len(bundle.vm_config["disks"]) == 1


def test_runtime_config_replaces_stale_address_tokens(tmp_path: Path) -> None:
    bundle = Bundle.load(write_bundle(tmp_path))
    bundle.vm_config["payload"]["cmdline"] += " procurator.ip=1.2.3.4/8"
    config = runtime_config(
        bundle,
        nics=[NicBinding("eth0", "t", "02:00:00:00:00:01")],
        volumes={"data": tmp_path / "d.img"},
        serial_log=tmp_path / "s.log",
        address=GuestAddress("10.100.0.9", 16, "10.100.0.1"),
    )
    tokens = config["payload"]["cmdline"].split()
    assert [t for t in tokens if t.startswith("procurator.ip=")] == ["procurator.ip=10.100.0.9/16"]
    assert not any(t.startswith("procurator.dns=") for t in tokens)


def test_each_filesystem_is_made_with_its_own_force_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, ...]] = []
    monkeypatch.setattr(process, "run", lambda argv, **_: sent.append(tuple(argv)))
    state = StateDir(tmp_path)
    for fs in ("ext4", "xfs", "btrfs"):
        ensure_volume(state, "web", Volume(name=f"d{fs}", size_mib=1, fs_type=fs))
    assert [argv[:-1] for argv in sent] == [
        ("mkfs.ext4", "-q", "-F", "-L", "dext4"),
        ("mkfs.xfs", "-q", "-f", "-L", "dxfs"),
        ("mkfs.btrfs", "-q", "-f", "-L", "dbtrfs"),
    ]
    assert sorted(p.name for p in state.volume_dir("web").iterdir()) == [
        "dbtrfs.img",
        "dext4.img",
        "dxfs.img",
    ]


def test_cpu_affinity_becomes_cloud_hypervisors_cpus_affinity(tmp_path: Path) -> None:
    """Every vCPU gets the bundle's host CPUs (CpuAffinity {vcpu, host_cpus}, vmm/src/vm_config.rs, in
    every release from v40.0), and the body passes the API schema."""
    config_data = vm_config(nets=0)
    config_data["cpus"] = {"boot_vcpus": 2, "max_vcpus": 2}
    meta_data = meta(nets=0, resources={"cpuAffinity": [1, 0]})
    bundle = Bundle.load(write_bundle(tmp_path, config=config_data, meta_data=meta_data))
    config = runtime_config(
        bundle, nics=[], volumes={"data": tmp_path / "d.img"}, serial_log=tmp_path / "s", address=None
    )
    assert config["cpus"]["affinity"] == [{"vcpu": 0, "host_cpus": [0, 1]}, {"vcpu": 1, "host_cpus": [0, 1]}]
    assert chspec.errors("VmConfig", config) == []
    assert "affinity" not in bundle.vm_config["cpus"]
    unpinned = Bundle.load(write_bundle(tmp_path / "b", config=config_data, meta_data=meta(nets=0)))
    plain = runtime_config(
        unpinned, nics=[], volumes={"data": tmp_path / "d.img"}, serial_log=tmp_path / "s", address=None
    )
    assert "affinity" not in plain["cpus"]
