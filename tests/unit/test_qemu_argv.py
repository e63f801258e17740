"""The qemu backend's translation of the runtime VmConfig into a command line, and its accelerator choice.

Every config given to `build_argv` here is first checked against our schema of cloud-hypervisor's VmConfig
(procurator/hypervisor/ch-api.schema.json), so the translation is tested on real `vm.create` bodies only.
"""

from __future__ import annotations

import copy
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procurator.errors import ConfigError, HypervisorError
from procurator.hypervisor import qemu
from tests.support import chspec

MIB = 1024 * 1024
SOCKET = Path("/state/vms/web/api.sock")
KERNEL = "/nix/store/3nhzj267c2d3zbzlwni4n45cgivlv917-procurator-kernel"
INITRD = "/nix/store/56w75s8452vpdang4f7jra8mzgk7sz0n-procurator-initrd"
CMDLINE = "console=ttyS0 reboot=t panic=-1 procurator.name=web procurator.ip=10.100.0.2/16"
SERIAL = "/state/vms/web/serial.log"


def runtime_config(**changes: Any) -> dict[str, Any]:
    """A runtime VmConfig as Procurator hands it to a backend (1 vCPU, 192 MiB, no disks, no nets)."""
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 192 * MIB},
        "payload": {"kernel": KERNEL, "initramfs": INITRD, "cmdline": CMDLINE},
        "disks": [],
        "net": [],
        "serial": {"mode": "File", "file": SERIAL},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
    }
    config.update(changes)
    return config


def argv_for(
    config: dict[str, Any], accel: qemu.Accel = "tcg", binary: str = "qemu-system-x86_64"
) -> list[str]:
    assert chspec.full_body_errors("VmConfig", config) == [], "the test input is not a valid VmConfig"
    return qemu.build_argv(config, qmp_socket=SOCKET, accel=accel, binary=binary)


COMMON_TAIL = [
    "-chardev", f"file,id=serial0,path={SERIAL}", "-serial", "chardev:serial0",
    "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
    "-qmp", f"unix:{SOCKET},server=on,wait=off", "-no-reboot",
]  # fmt: skip


def test_one_vcpu_no_disks_no_nets_under_tcg() -> None:
    assert argv_for(runtime_config()) == [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
        "-smp", "1", "-m", "192M",
        "-kernel", KERNEL, "-initrd", INITRD, "-append", CMDLINE,
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        *COMMON_TAIL,
    ]  # fmt: skip


def test_two_vcpus_read_only_and_writable_disks_two_nets_under_kvm() -> None:
    config = runtime_config(
        cpus={"boot_vcpus": 2, "max_vcpus": 2},
        memory={"size": 256 * MIB},
        disks=[
            {"id": "store", "path": "/nix/store/abc-procurator-vm-api/store.img", "readonly": True},
            {"id": "data", "path": "/state/volumes/api/data.img", "readonly": False},
        ],
        net=[
            {"id": "eth0", "tap": "pc-api-eth0", "mac": "52:54:00:aa:bb:01"},
            {"id": "eth1", "tap": "pc-api-eth1", "mac": "52:54:00:aa:bb:02", "num_queues": 2},
        ],
    )
    assert argv_for(config, "kvm", "/usr/bin/qemu-kvm") == [
        "/usr/bin/qemu-kvm", "-machine", "q35", "-accel", "kvm", "-cpu", "host",
        "-smp", "2", "-m", "256M",
        "-kernel", KERNEL, "-initrd", INITRD, "-append", CMDLINE,
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-drive", "file=/nix/store/abc-procurator-vm-api/store.img,if=none,id=store,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=store",
        "-drive", "file=/state/volumes/api/data.img,if=none,id=data,format=raw",
        "-device", "virtio-blk-pci,drive=data",
        "-netdev", "tap,id=eth0,ifname=pc-api-eth0,script=no,downscript=no,vhost=off",
        "-device", "virtio-net-pci,netdev=eth0,mac=52:54:00:aa:bb:01",
        "-netdev", "tap,id=eth1,ifname=pc-api-eth1,script=no,downscript=no,vhost=off",
        "-device", "virtio-net-pci,netdev=eth1,mac=52:54:00:aa:bb:02",
        *COMMON_TAIL,
    ]  # fmt: skip


def test_one_net_with_four_queues_is_multiqueue() -> None:
    config = runtime_config(net=[{"id": "eth0", "tap": "pc-web-eth0", "num_queues": 4}])
    argv = argv_for(config)
    assert argv[argv.index("-netdev") : argv.index("-netdev") + 4] == [
        "-netdev", "tap,id=eth0,ifname=pc-web-eth0,script=no,downscript=no,vhost=off,queues=2",
        "-device", "virtio-net-pci,netdev=eth0,mq=on,vectors=6",
    ]  # fmt: skip


def contains(argv: list[str], fragment: list[str]) -> bool:
    return any(argv[i : i + len(fragment)] == fragment for i in range(len(argv) - len(fragment) + 1))


DISK = {"id": "data", "path": "/v/data.img"}
NET = {"id": "eth0", "tap": "tap0"}

# (what changes in the base config, a run of arguments the command line must contain)
TRANSLATIONS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("cpus.max_vcpus", {"cpus": {"boot_vcpus": 2, "max_vcpus": 4}}, ["-smp", "2,maxcpus=4"]),
    ("cpus absent: 1 vCPU", {"cpus": None}, ["-smp", "1"]),
    ("memory.size", {"memory": {"size": 1024 * MIB}}, ["-m", "1024M"]),
    ("memory absent: 512 MiB", {"memory": None}, ["-m", "512M"]),
    ("payload without initramfs", {"payload": {"kernel": KERNEL}}, ["-kernel", KERNEL, "-nodefaults"]),
    ("payload.cmdline empty", {"payload": {"kernel": KERNEL, "cmdline": ""}}, ["-append", ""]),
    (
        "disks.readonly",
        {"disks": [{**DISK, "readonly": True}]},
        ["-drive", "file=/v/data.img,if=none,id=data,format=raw,readonly=on"],
    ),
    (
        "disks.direct",
        {"disks": [{**DISK, "direct": True}]},
        ["-drive", "file=/v/data.img,if=none,id=data,format=raw,cache.direct=on"],
    ),
    (
        "disks.image_type",
        {"disks": [{**DISK, "image_type": "Qcow2"}]},
        ["-drive", "file=/v/data.img,if=none,id=data,format=qcow2"],
    ),
    (
        "disks.num_queues",
        {"disks": [{**DISK, "num_queues": 2}]},
        ["-device", "virtio-blk-pci,drive=data,num-queues=2"],
    ),
    (
        "disks.serial",
        {"disks": [{**DISK, "serial": "vol,1"}]},
        ["-device", "virtio-blk-pci,drive=data,serial=vol,,1"],
    ),
    (
        "disks.path with a comma",
        {"disks": [{"id": "d", "path": "/v/a,b.img"}]},
        ["-drive", "file=/v/a,,b.img,if=none,id=d,format=raw"],
    ),
    ("net without mac", {"net": [NET]}, ["-device", "virtio-net-pci,netdev=eth0", "-chardev"]),
    (
        "net.mac is lower-cased",
        {"net": [{**NET, "mac": "52:54:00:AB:CD:EF"}]},
        ["-device", "virtio-net-pci,netdev=eth0,mac=52:54:00:ab:cd:ef"],
    ),
    ("net.mtu", {"net": [{**NET, "mtu": 9000}]}, ["-device", "virtio-net-pci,netdev=eth0,host_mtu=9000"]),
    (
        "serial Socket",
        {"serial": {"mode": "Socket", "socket": "/s/serial.sock"}},
        [
            "-chardev",
            "socket,id=serial0,path=/s/serial.sock,server=on,wait=off",
            "-serial",
            "chardev:serial0",
        ],
    ),
    (
        "console File",
        {"console": {"mode": "File", "file": "/s/console.log"}},
        [
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "file,id=console0,path=/s/console.log",
            "-device",
            "virtconsole,chardev=console0",
        ],
    ),
    (
        "console Socket",
        {"console": {"mode": "Socket", "socket": "/s/console.sock"}},
        [
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "socket,id=console0,path=/s/console.sock,server=on,wait=off",
            "-device",
            "virtconsole,chardev=console0",
        ],
    ),
    (
        "console Pty: served as console.sock beside the QMP socket",
        {"console": {"mode": "Pty"}},
        [
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=console0,path={SOCKET.parent / 'console.sock'},server=on,wait=off",
            "-device",
            "virtconsole,chardev=console0",
        ],
    ),
    ("rng.src", {"rng": {"src": "/dev/random"}}, ["-object", "rng-random,id=rng0,filename=/dev/random"]),
    ("rng absent: /dev/urandom", {"rng": None}, ["-object", "rng-random,id=rng0,filename=/dev/urandom"]),
    ("pvpanic", {"pvpanic": True}, ["-device", "pvpanic", "-qmp"]),
]


@pytest.mark.parametrize(
    ("changes", "expected"), [t[1:] for t in TRANSLATIONS], ids=[t[0] for t in TRANSLATIONS]
)
def test_each_field_translates(changes: dict[str, Any], expected: list[str]) -> None:
    config = runtime_config()
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    assert contains(argv_for(config), expected), argv_for(config)


def test_serial_off_or_null_and_console_null_add_nothing() -> None:
    for mode in ("Off", "Null"):
        argv = argv_for(runtime_config(serial={"mode": mode}, console={"mode": mode}))
        assert "-serial" not in argv
        assert "-chardev" not in argv
        assert "virtconsole,chardev=console0" not in argv


def test_fields_at_their_defaults_are_accepted() -> None:
    spelled_out = runtime_config(
        cpus={"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": False, "nested": True},
        memory={"size": 192 * MIB, "mergeable": False, "shared": False, "hugepages": False, "thp": True},
        disks=[{**DISK, "iommu": False, "queue_size": 128, "vhost_user": False, "sparse": True}],
        net=[{**NET, "num_queues": 2, "queue_size": 256, "offload_tso": True, "vhost_user": False}],
        rng={"src": "/dev/urandom", "iommu": False},
        iommu=False,
        watchdog=False,
        pvpanic=False,
        fs=[],
        debug_console={"mode": "Off"},
    )
    plain = runtime_config(disks=[DISK], net=[NET])
    assert argv_for(spelled_out) == argv_for(plain)


def test_the_config_is_not_modified() -> None:
    config = runtime_config(disks=[DISK], net=[{**NET, "num_queues": 4}])
    before = copy.deepcopy(config)
    argv_for(config)
    assert config == before


def test_the_qmp_socket_path_is_escaped() -> None:
    argv = qemu.build_argv(runtime_config(), qmp_socket=Path("/s/a,b/api.sock"), accel="tcg")
    assert argv[-3:] == ["-qmp", "unix:/s/a,,b/api.sock,server=on,wait=off", "-no-reboot"]


def test_taps_are_read_back_from_the_command_line() -> None:
    nets = [{"id": "eth0", "tap": "pc-web-eth0", "num_queues": 4}, {"id": "eth1", "tap": "pc-web-eth1"}]
    argv = argv_for(runtime_config(net=nets))
    assert qemu._taps_in(argv) == {"eth0": "pc-web-eth0", "eth1": "pc-web-eth1"}
    assert qemu._split_options("file,id=d,path=/a,,b,,,c") == ["file", "id=d", "path=/a,b,", "c"]


Change = Callable[[dict[str, Any]], None]


def setter(path: str, value: Any) -> Change:
    """Set `a.b[0].c` (creating the last key) in a config."""

    def change(config: dict[str, Any]) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        node: Any = config
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return change


DELETE = object()

# (the field the error must name, the change that makes the config untranslatable)
REJECTIONS: list[tuple[str, Change]] = [
    ("payload.kernel", setter("payload.kernel", DELETE)),
    ("payload.firmware", setter("payload.firmware", "/fw/hypervisor-fw")),
    ("payload.igvm", setter("payload.igvm", "/fw/x.igvm")),
    ("memory.size", setter("memory.size", 192 * MIB + 512)),
    ("memory.hugepages", setter("memory.hugepages", True)),
    ("memory.shared", setter("memory.shared", True)),
    ("memory.hotplug_size", setter("memory.hotplug_size", 1024 * MIB)),
    ("cpus.max_vcpus", setter("cpus", {"boot_vcpus": 2, "max_vcpus": 1})),
    ("cpus.topology", setter("cpus.topology", {"threads_per_core": 2})),
    ("cpus.kvm_hyperv", setter("cpus.kvm_hyperv", True)),
    ("disks[0].id", setter("disks", [{"path": "/v/d.img"}])),
    ("disks[0].id", setter("disks", [{"id": "_disk0", "path": "/v/d.img"}])),
    ("disks[0].path", setter("disks", [{"id": "d"}])),
    ("disks[0].vhost_user", setter("disks", [{**DISK, "vhost_user": True}])),
    ("disks[0].rate_limiter_config", setter("disks", [{**DISK, "rate_limiter_config": {}}])),
    ("disks[0].image_type", setter("disks", [{**DISK, "image_type": "Vhdx"}])),
    ("disks[0].readonly", setter("disks", [{**DISK, "readonly": 1}])),
    ("net[0].id", setter("net", [{"tap": "tap0"}])),
    ("net[0].tap", setter("net", [{"id": "eth0"}])),
    ("net[0].tap", setter("net", [{"id": "eth0", "tap": "a-name-far-too-long"}])),
    ("net[0].ip", setter("net", [{**NET, "ip": "192.168.249.1", "mask": "255.255.255.0"}])),
    ("net[0].host_mac", setter("net", [{**NET, "host_mac": "52:54:00:00:00:01"}])),
    ("net[0].mac", setter("net", [{**NET, "mac": "not-a-mac"}])),
    ("net[0].num_queues", setter("net", [{**NET, "num_queues": 3}])),
    ("net[0].vhost_user", setter("net", [{**NET, "vhost_user": True}])),
    ("net[0].offload_tso", setter("net", [{**NET, "offload_tso": False}])),
    ("serial.mode", setter("serial", {"mode": "Tty"})),
    ("serial.file", setter("serial", {"mode": "File"})),
    ("console.mode", setter("console", {"mode": "Tty"})),
    ("vsock", setter("vsock", {"cid": 3, "socket": "/s/vsock"})),
    ("balloon", setter("balloon", {"size": 0})),
    ("fs", setter("fs", [{"tag": "x", "socket": "/s/fs", "num_queues": 1, "queue_size": 8}])),
    ("iommu", setter("iommu", True)),
    ("watchdog", setter("watchdog", True)),
    ("debug_console", setter("debug_console", {"mode": "File", "file": "/s/debug.log"})),
]


@pytest.mark.parametrize(
    ("field", "change"), REJECTIONS, ids=[f"{i}-{r[0]}" for i, r in enumerate(REJECTIONS)]
)
def test_untranslatable_configs_are_refused_naming_the_field(field: str, change: Change) -> None:
    config = runtime_config()
    change(config)
    with pytest.raises(HypervisorError) as caught:
        qemu.build_argv(config, qmp_socket=SOCKET, accel="tcg")
    assert str(caught.value).startswith(f"vm-config {field}: "), str(caught.value)
    assert str(caught.value).endswith("(the qemu backend cannot translate it)")


def test_ids_must_be_unique_across_disks_and_nets() -> None:
    config = runtime_config(disks=[{**DISK, "id": "eth0"}], net=[NET])
    with pytest.raises(
        HypervisorError, match=r"^vm-config net\[0\].id: 'eth0' is already the id of disks\[0\]"
    ):
        argv_for(config)


def test_keys_outside_the_schema_are_refused() -> None:
    with pytest.raises(HypervisorError, match=r"^vm-config bogus: not supported"):
        qemu.build_argv({**runtime_config(), "bogus": 1}, qmp_socket=SOCKET, accel="tcg")


def test_an_unknown_accelerator_is_refused() -> None:
    with pytest.raises(HypervisorError, match="hvf"):
        qemu.build_argv(runtime_config(), qmp_socket=SOCKET, accel="hvf")  # type: ignore[arg-type]


# --- the accelerator ---------------------------------------------------------------------------------


def test_configuration_wins_over_the_environment_and_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "_probe_kvm", lambda _: pytest.fail("probed although configured"))
    monkeypatch.setenv(qemu.ACCEL_ENV, "kvm")
    assert qemu.probe_accel("tcg") == "tcg"
    assert qemu.Qemu(accel="tcg").accel() == "tcg"
    # Unset or auto: the environment decides.
    assert qemu.probe_accel() == "kvm"
    assert qemu.probe_accel("auto") == "kvm"
    assert qemu.Qemu().accel() == "kvm"
    assert qemu.Qemu(accel="auto", binary=None).accel() == "kvm"
    monkeypatch.setenv(qemu.ACCEL_ENV, "tcg")
    assert qemu.probe_accel() == "tcg"


def test_a_bad_accelerator_setting_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="'fast' is not one of auto, kvm, tcg"):
        qemu.Qemu(accel="fast")
    monkeypatch.setenv(qemu.ACCEL_ENV, "xen")
    with pytest.raises(ConfigError, match=r"\$PROCURATOR_QEMU_ACCEL: 'xen'"):
        qemu.probe_accel("auto")
    assert qemu.probe_accel("tcg") == "tcg"  # a configured accelerator does not read the environment


def test_auto_probes_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_probe(binary: str) -> tuple[bool, str]:
        calls.append(binary)
        return False, "no KVM in this test"

    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    monkeypatch.setattr(qemu, "_probe_cache", {})
    monkeypatch.setattr(qemu, "_probe_kvm", fake_probe)
    assert qemu.probe_accel("auto", binary="qemu-a") == "tcg"
    assert qemu.Qemu(binary="qemu-a").accel() == "tcg"
    assert qemu.kvm_usable("qemu-a") == (False, "no KVM in this test")
    assert calls == ["qemu-a"]


def test_the_probe_guest_runs_to_its_end_under_tcg() -> None:
    """The hand-assembled firmware is correct: TCG runs it to the exit port (exit status 3)."""
    ok, reason = qemu.probe_guest(qemu.DEFAULT_BINARY, "tcg", timeout=10.0)
    assert ok, reason
    assert reason.startswith("a tiny tcg guest ran in ")


def fake_binary(tmp_path: Path, script: str) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_guest_that_makes_no_progress_means_no_kvm(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, "exec sleep 30")
    began = time.monotonic()
    assert qemu.probe_guest(binary, "kvm", timeout=0.5) == (
        False,
        "a tiny kvm guest made no progress within 0.5s",
    )
    assert time.monotonic() - began < 3.0


def test_a_qemu_that_fails_means_no_kvm_and_says_why(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, "echo 'qemu: error: failed to set MSR 0x10a' >&2; exit 134")
    assert qemu.probe_guest(binary, "kvm") == (
        False,
        "a tiny kvm guest failed: qemu: error: failed to set MSR 0x10a",
    )
    assert qemu.probe_guest(str(tmp_path / "missing"), "kvm")[0] is False


def test_a_device_that_is_not_kvm_is_refused(tmp_path: Path) -> None:
    assert qemu.kvm_device_problem(tmp_path / "kvm") == f"{tmp_path / 'kvm'}: No such file or directory"
    assert qemu.kvm_device_problem(Path(os.devnull)).startswith("/dev/null: KVM_GET_API_VERSION failed")


def test_cpu_affinity_is_no_command_line_option_but_is_checked() -> None:
    """The backend pins the vCPU threads itself before `cont` (qemu.pin_vcpus); the argv is unchanged."""
    config = runtime_config()
    pinned = copy.deepcopy(config)
    pinned["cpus"]["affinity"] = [{"vcpu": 0, "host_cpus": [1]}]
    assert argv_for(pinned) == argv_for(config)
    assert qemu.affinity(pinned["cpus"]) == {0: frozenset({1})}
    pinned["cpus"]["affinity"] = [{"vcpu": 0, "host_cpus": []}]
    with pytest.raises(HypervisorError, match=r"cpus.affinity\[0\].host_cpus"):
        qemu.build_argv(pinned, qmp_socket=SOCKET, accel="tcg")
