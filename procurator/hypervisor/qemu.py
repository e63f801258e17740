"""The qemu backend: the runtime VmConfig translated to a QEMU command line, driven over QMP.

`build_argv` is the pure translation of cloud-hypervisor's `vm.create` body; whatever it cannot express
faithfully is refused with a HypervisorError naming the field, never silently dropped. `probe_accel`
decides between KVM and TCG: configuration first, else a real (bounded, cached) check that a tiny KVM
guest makes progress. `Qemu` implements the Hypervisor protocol; each call opens its own short QMP session
(QEMU serves one QMP client at a time), so a handle needs nothing but the pid and the socket path.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from procurator import logfiles, process, serial_keeper, sockets, waits
from procurator.errors import (
    ConfigError,
    ConflictError,
    HypervisorError,
    HypervisorStartError,
    ProcessError,
    ProcuratorError,
    ValidationError,
    WaitTimeoutError,
)
from procurator.hypervisor import keepers, qmp
from procurator.hypervisor.base import Finding, GuestEnd, Handle, LaunchSpec, StopResult, VmInfo, VmState
from procurator.hypervisor.keepers import Keepers, wire_serial
from procurator.jsonread import Reader, shown
from procurator.net import netlink

if TYPE_CHECKING:
    from procurator.config import HypervisorSettings

log = logging.getLogger(__name__)

BACKEND = "qemu"
DEFAULT_BINARY = "qemu-system-x86_64"
ACCEL_ENV = "PROCURATOR_QEMU_ACCEL"
ACCEL_SETTINGS = ("auto", "kvm", "tcg")
Accel = Literal["kvm", "tcg"]

MIB = 1024 * 1024
DEFAULT_MEMORY = 512 * MIB  # cloud-hypervisor's default when the config has no memory section
DEFAULT_RNG_SOURCE = "/dev/urandom"  # cloud-hypervisor's default entropy source

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")  # what QEMU accepts as a device, drive or netdev id
_MAC = re.compile(r"(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}")
_SOURCE = "vm-config"  # how the reader's refusals name the config: `vm-config <field>: ...`
_TAP = re.compile(r"[^\s/,:]{1,15}")  # a Linux interface name (IFNAMSIZ - 1); no comma for QEMU's sake
CONSOLE_SOCKET = "console.sock"  # in the VM directory, beside the QMP socket
SNAPSHOT_FILE = "memory.qemu"  # the migration stream of a snapshot, in its data directory
# Migration is throttled to 32 MiB/s by default (QEMU's MAX_THROTTLE); to a local file it need not be.
_MIGRATION_BANDWIDTH = 1 << 40
_IMAGE_FORMATS = {"Raw": "raw", "Qcow2": "qcow2"}


# --- translation ------------------------------------------------------------------------------------


# What each section of the VmConfig translates, and what it accepts only at its harmless default.
_TOP_HANDLED = frozenset(["cpus", "memory", "payload", "disks", "net", "rng", "serial", "console", "pvpanic"])
_EMPTY_LISTS = ["fs", "pmem", "devices", "user_devices", "vdpa", "numa", "rate_limit_groups"]
_EMPTY_LISTS += ["generic_vhost_user", "pci_segments", "landlock_rules"]
_TOP_DEFAULTS: dict[str, Any] = {
    "iommu": False,
    "watchdog": False,
    "landlock_enable": False,
    "debug_console": {"mode": "Off"},
    "platform": {},
    **{key: [] for key in _EMPTY_LISTS},
}
_CPUS_DEFAULTS: dict[str, Any] = {"kvm_hyperv": False, "nested": True, "affinity": [], "features": {}}
_MEMORY_DEFAULTS: dict[str, Any] = {
    "hotplug_size": 0,
    "hotplugged_size": 0,
    "mergeable": False,
    "hotplug_method": "Acpi",
    "shared": False,
    "hugepages": False,
    "prefault": False,
    "reserve": False,
    "thp": True,
    "zones": [],
}
_DISK_HANDLED = frozenset(["id", "path", "readonly", "direct", "num_queues", "serial", "image_type"])
_DISK_DEFAULTS: dict[str, Any] = {
    "iommu": False,
    "queue_size": 128,
    "vhost_user": False,
    "pci_segment": 0,
    "backing_files": False,
    "sparse": True,
    "queue_affinity": [],
}
_NET_HANDLED = frozenset(["id", "tap", "mac", "num_queues", "mtu"])
_NET_DEFAULTS: dict[str, Any] = {
    "iommu": False,
    "queue_size": 256,
    "vhost_user": False,
    "vhost_mode": "Client",
    "pci_segment": 0,
    "offload_tso": True,
    "offload_ufo": True,
    "offload_csum": True,
}
_DEVICE_DEFAULTS: dict[str, Any] = {"iommu": False, "pci_segment": 0}


def build_argv(
    config: Mapping[str, Any],
    *,
    qmp_socket: Path,
    accel: Accel,
    binary: str = DEFAULT_BINARY,
    tap_fds: Mapping[str, Sequence[int]] | None = None,
) -> list[str]:
    """The QEMU command line that runs the VM described by the runtime VmConfig `config`.

    A TAP named in `tap_fds` is given as the inherited descriptors of its queues (`fd=N`, `fds=N:M`;
    QEMU refuses `ifname=` and `queues=` beside them, net/tap.c `net_init_tap`), so QEMU needs no
    /dev/net/tun of its own.

    Raises HypervisorError naming the field for anything the qemu backend cannot express.
    """
    with _translation():
        return _argv(
            _reader("", config, required=True),
            qmp_socket=qmp_socket,
            accel=accel,
            binary=binary,
            tap_fds=tap_fds,
        )


def _argv(
    config: Reader,
    *,
    qmp_socket: Path,
    accel: Accel,
    binary: str,
    tap_fds: Mapping[str, Sequence[int]] | None,
) -> list[str]:
    _only("", config.data, handled=_TOP_HANDLED, defaults=_TOP_DEFAULTS)
    if accel not in ("kvm", "tcg"):
        raise HypervisorError(f"qemu accel {accel!r}: expected kvm or tcg")
    argv = [binary, "-machine", "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max"]
    argv += ["-smp", _smp(config.obj("cpus", nullable=True))]
    argv += ["-m", _memory(config.obj("memory", nullable=True))]
    argv += _payload(config.obj("payload", required=True))
    argv += ["-nodefaults", "-no-user-config", "-nographic", "-display", "none"]
    ids: dict[str, str] = {}  # id -> the field that declared it: cloud-hypervisor wants them unique
    for disk in config.items("disks", nullable=True):
        argv += _disk(disk, ids)
    for net in config.items("net", nullable=True):
        argv += _net(net, ids, tap_fds or {})
    argv += _serial(config.obj("serial", nullable=True))
    argv += _console(config.obj("console", nullable=True), qmp_socket.parent / CONSOLE_SOCKET)
    argv += _rng(config.obj("rng", nullable=True))
    if config.boolean("pvpanic", False):
        argv += ["-device", "pvpanic"]
    argv += ["-qmp", f"unix:{_esc(str(qmp_socket))},server=on,wait=off", "-no-reboot"]
    return argv


def _smp(cpus: Reader) -> str:
    _only("cpus", cpus.data, handled={"boot_vcpus", "max_vcpus", "affinity"}, defaults=_CPUS_DEFAULTS)
    _affinity(cpus)  # not a command-line option: the backend pins the vCPU threads before the guest runs
    boot = cpus.integer("boot_vcpus", 1)
    most = cpus.integer("max_vcpus", boot)
    if most < boot:
        raise _untranslatable("cpus.max_vcpus", f"{most} is less than boot_vcpus {boot}")
    return str(boot) if most == boot else f"{boot},maxcpus={most}"


def affinity(cpus: Mapping[str, Any]) -> dict[int, frozenset[int]]:
    """`cpus.affinity` ([{vcpu, host_cpus}], cloud-hypervisor's CpuAffinity) as {vCPU index: host CPUs}."""
    with _translation():
        return _affinity(_reader("cpus", cpus))


def _affinity(cpus: Reader) -> dict[int, frozenset[int]]:
    out: dict[int, frozenset[int]] = {}
    for item in cpus.items("affinity", nullable=True):
        _only(item.prefix, item.data, handled={"vcpu", "host_cpus"}, defaults={})
        vcpu = item.integer("vcpu", minimum=0)
        hosts = item.array("host_cpus", required=True)
        if not hosts or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in hosts):
            raise item.fail("host_cpus", f"expected a non-empty list of CPUs, not {shown(hosts)}")
        out[vcpu] = frozenset(hosts)
    return out


def _memory(memory: Reader) -> str:
    _only("memory", memory.data, handled={"size"}, defaults=_MEMORY_DEFAULTS)
    size = memory.integer("size", DEFAULT_MEMORY, minimum=MIB)
    if size % MIB:
        raise _untranslatable("memory.size", f"{size} bytes is not a whole number of MiB")
    return f"{size // MIB}M"


def _payload(payload: Reader) -> list[str]:
    _only("payload", payload.data, handled={"kernel", "initramfs", "cmdline"}, defaults={})
    if not payload.has("kernel"):
        raise _untranslatable("payload.kernel", "missing; the qemu backend boots a kernel directly")
    argv = ["-kernel", _str(payload, "kernel")]
    if payload.has("initramfs"):
        argv += ["-initrd", _str(payload, "initramfs")]
    if payload.has("cmdline"):
        argv += ["-append", payload.text("cmdline")]
    return argv


def _disk(disk: Reader, ids: dict[str, str]) -> list[str]:
    field = disk.prefix
    _only(field, disk.data, handled=_DISK_HANDLED, defaults=_DISK_DEFAULTS)
    ident = _id(disk, ids)
    path = _str(disk, "path")
    image_type = disk.text("image_type", "Raw")
    if image_type not in _IMAGE_FORMATS:
        raise _untranslatable(
            f"{field}.image_type", f"{image_type!r}; expected one of {sorted(_IMAGE_FORMATS)}"
        )
    drive = f"file={_esc(path)},if=none,id={ident},format={_IMAGE_FORMATS[image_type]}"
    if disk.boolean("readonly", False):
        drive += ",readonly=on"
    if disk.boolean("direct", False):
        drive += ",cache.direct=on"
    device = f"virtio-blk-pci,drive={ident}"
    queues = disk.integer("num_queues", 1)
    if queues != 1:
        device += f",num-queues={queues}"
    if disk.has("serial"):
        device += f",serial={_esc(_str(disk, 'serial'))}"
    return ["-drive", drive, "-device", device]


def _net(net: Reader, ids: dict[str, str], tap_fds: Mapping[str, Sequence[int]]) -> list[str]:
    field = net.prefix
    _only(field, net.data, handled=_NET_HANDLED, defaults=_NET_DEFAULTS)
    ident = _id(net, ids)
    tap = _str(net, "tap")
    if not _TAP.fullmatch(tap):
        raise _untranslatable(f"{field}.tap", f"{tap!r} is not an interface name of at most 15 characters")
    pairs = net.integer("num_queues", 2, minimum=2)
    if pairs % 2:
        raise _untranslatable(f"{field}.num_queues", f"{pairs} is odd; queues come in rx/tx pairs")
    fds = tap_fds.get(tap)
    if fds is not None and len(fds) != pairs // 2:
        raise _untranslatable(f"{field}.tap", f"{len(fds)} descriptors for {pairs // 2} queue pairs")
    if fds is None:
        netdev = f"tap,id={ident},ifname={tap},script=no,downscript=no,vhost=off"
    elif len(fds) == 1:
        netdev = f"tap,id={ident},fd={fds[0]},vhost=off"
    else:
        netdev = f"tap,id={ident},fds={':'.join(map(str, fds))},vhost=off"
    device = f"virtio-net-pci,netdev={ident}"
    if net.has("mac"):
        mac = _str(net, "mac")
        if not _MAC.fullmatch(mac):
            raise _untranslatable(f"{field}.mac", f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
        device += f",mac={mac.lower()}"
    if pairs > 2:
        netdev += f",queues={pairs // 2}" if fds is None else ""
        device += f",mq=on,vectors={pairs + 2}"  # one MSI-X vector per queue, plus config and control
    if net.has("mtu"):
        device += f",host_mtu={net.integer('mtu', minimum=68)}"
    return ["-netdev", netdev, "-device", device]


def _serial(serial: Reader) -> list[str]:
    _only("serial", serial.data, handled={"mode", "file", "socket"}, defaults={})
    mode = serial.text("mode", "Null")
    if mode in ("Off", "Null"):
        return []
    if mode == "File":
        chardev = f"file,id=serial0,path={_esc(_str(serial, 'file'))}"
    elif mode == "Socket":
        chardev = f"socket,id=serial0,path={_esc(_str(serial, 'socket'))},server=on,wait=off"
    else:
        raise _untranslatable(
            "serial.mode", f"{mode!r}; the qemu backend supports File, Socket, Off and Null"
        )
    return ["-chardev", chardev, "-serial", "chardev:serial0"]


def _console(console: Reader, pty_socket: Path) -> list[str]:
    """The virtio console. `Pty` (what cloud-hypervisor gets) is served as a UNIX socket at `pty_socket`:
    QEMU would report a pty's path only over QMP, and the socket needs no terminal settings."""
    _only("console", console.data, handled={"mode", "file", "socket"}, defaults=_DEVICE_DEFAULTS)
    mode = console.text("mode", "Off")
    if mode in ("Off", "Null"):
        return []
    if mode == "Pty":
        chardev = f"socket,id=console0,path={_esc(str(pty_socket))},server=on,wait=off"
    elif mode == "File":
        chardev = f"file,id=console0,path={_esc(_str(console, 'file'))}"
    elif mode == "Socket":
        path = _esc(_str(console, "socket"))
        chardev = f"socket,id=console0,path={path},server=on,wait=off"
    else:
        raise _untranslatable(
            "console.mode", f"{mode!r}; the qemu backend supports Pty, File, Socket, Off and Null"
        )
    return ["-device", "virtio-serial-pci", "-chardev", chardev, "-device", "virtconsole,chardev=console0"]


def _rng(rng: Reader) -> list[str]:
    _only("rng", rng.data, handled={"src", "id"}, defaults=_DEVICE_DEFAULTS)
    source = rng.text("src", DEFAULT_RNG_SOURCE, nonempty=True, what="a non-empty string")
    return ["-object", f"rng-random,id=rng0,filename={_esc(source)}", "-device", "virtio-rng-pci,rng=rng0"]


def _untranslatable(field: str, problem: str) -> HypervisorError:
    return HypervisorError(f"vm-config {field or '<root>'}: {problem} (the qemu backend cannot translate it)")


@contextlib.contextmanager
def _translation() -> Iterator[None]:
    """The reader's refusals (a field of the wrong kind, out of bounds, missing) as untranslatable."""
    try:
        yield
    except ValidationError as exc:
        raise _untranslatable(exc.field, exc.problem) from exc


def _only(field: str, section: Mapping[str, Any], *, handled: Set[str], defaults: Mapping[str, Any]) -> None:
    """Refuse every key of `section` that is neither translated nor at its harmless default."""
    for key, value in section.items():
        name = f"{field}.{key}" if field else key
        if key in handled:
            continue
        if key in defaults:
            if value == defaults[key] and type(value) is type(defaults[key]):
                continue
            raise _untranslatable(name, f"only {_show(defaults[key])} is supported, got {_show(value)}")
        raise _untranslatable(name, "not supported")


def _reader(field: str, value: Any, *, required: bool = False) -> Reader:
    """A reader of section `field` of the VmConfig (a null one is absent, as cloud-hypervisor takes it)."""
    if value is None:
        if required:
            raise _untranslatable(field, "missing")
        return Reader(_SOURCE, {}, field)
    return Reader(_SOURCE, dict(value) if isinstance(value, Mapping) else value, field)


def _section(field: str, value: Any, *, required: bool = False) -> Mapping[str, Any]:
    with _translation():
        return _reader(field, value, required=required).data


def _id(section: Reader, seen: dict[str, str]) -> str:
    field = section.path("id")
    if section.data.get("id") is None:
        raise _untranslatable(field, "missing; every disk and net needs an explicit id")
    ident = _str(section, "id")
    if not _ID.fullmatch(ident):
        raise _untranslatable(field, f"{ident!r} is not a QEMU id (a letter, then letters, digits, -._)")
    if ident in seen:
        raise _untranslatable(field, f"{ident!r} is already the id of {seen[ident]}")
    seen[ident] = section.prefix
    return ident


def _str(section: Reader, key: str) -> str:
    return section.text(key, nonempty=True, what="a non-empty string")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _esc(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return value.replace(",", ",,")


def _split_options(text: str) -> list[str]:
    """The inverse of `_esc` joined by single commas: `a,,b,c` -> [`a,b`, `c`]."""
    parts, current, index = [], "", 0
    while index < len(text):
        if text[index] == ",":
            if text[index + 1 : index + 2] == ",":
                current += ","
                index += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[index]
        index += 1
    parts.append(current)
    return parts


# --- accelerator ----------------------------------------------------------------------------------

PROBE_TIMEOUT = 2.0
_PROBE_EXIT_PORT = 0xF4
_PROBE_OK = (1 << 1) | 1  # isa-debug-exit turns the guest's write of 1 into exit status 3
_PROBE_TOUCH = 16 * MIB  # memory the probe guest writes: thousands of fresh pages, milliseconds on KVM
_probe_lock = threading.Lock()
_probe_cache: dict[str, tuple[bool, str]] = {}


def accel_setting(setting: str | None = None) -> str:
    """The accelerator setting in force: kvm or tcg when configured so; otherwise (None or auto)
    $PROCURATOR_QEMU_ACCEL when set, else auto."""
    source = "the qemu accel setting"
    if setting in (None, "auto") and os.environ.get(ACCEL_ENV):
        setting, source = os.environ[ACCEL_ENV], f"${ACCEL_ENV}"
    setting = setting or "auto"
    if setting not in ACCEL_SETTINGS:
        raise ConfigError(f"{source}: {setting!r} is not one of {', '.join(ACCEL_SETTINGS)}")
    return setting


def probe_accel(setting: str | None = None, *, binary: str = DEFAULT_BINARY) -> Accel:
    """kvm or tcg: as configured (`setting`, then $PROCURATOR_QEMU_ACCEL); auto asks `kvm_usable`."""
    chosen = accel_setting(setting)
    if chosen in ("kvm", "tcg"):
        return cast(Accel, chosen)
    return "kvm" if kvm_usable(binary)[0] else "tcg"


def kvm_usable(binary: str = DEFAULT_BINARY) -> tuple[bool, str]:
    """Whether KVM really runs guests here, and why; probed once per process and binary (see `_probe_kvm`)."""
    with _probe_lock:
        if binary not in _probe_cache:
            _probe_cache[binary] = _probe_kvm(binary)
            usable, reason = _probe_cache[binary]
            log.info("qemu accelerator: %s (%s)", "kvm" if usable else "tcg", reason)
        return _probe_cache[binary]


def _probe_kvm(binary: str) -> tuple[bool, str]:
    """KVM is usable when /dev/kvm opens and speaks the KVM API, and a tiny guest runs to its end under
    `-accel kvm -cpu host` within PROBE_TIMEOUT. An openable /dev/kvm is not enough: nested setups exist
    where QEMU aborts on `-cpu host` or where guests crawl; this catches both, in milliseconds or in
    PROBE_TIMEOUT seconds."""
    problem = kvm_device_problem(Path("/dev/kvm"))
    if problem:
        return False, problem
    return probe_guest(binary, "kvm")


def kvm_device_problem(device: Path) -> str:
    """Why `device` is not a usable KVM device; empty when it is."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, 0xAE00)  # KVM_GET_API_VERSION
    except OSError as exc:
        return f"{device}: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    return "" if version == 12 else f"{device}: KVM API version {version}, expected 12"


def probe_guest(binary: str, accel: Accel, *, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Run the probe firmware (`_probe_firmware`) under `accel`: whether it reached its end within
    `timeout` seconds, and a one-line reason."""
    with tempfile.TemporaryDirectory(prefix="procurator-accel-probe-") as tmp:
        firmware = Path(tmp) / "probe.rom"
        firmware.write_bytes(_probe_firmware(_PROBE_TOUCH))
        cpu = "host" if accel == "kvm" else "max"
        argv = [binary, "-machine", "q35", "-accel", accel, "-cpu", cpu, "-smp", "1", "-m", "64M"]
        argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-bios", str(firmware)]
        argv += ["-device", f"isa-debug-exit,iobase={_PROBE_EXIT_PORT:#x},iosize=0x04"]
        began = time.monotonic()
        try:
            done = process.run(argv, check=False, timeout=timeout)
        except WaitTimeoutError:
            return False, f"a tiny {accel} guest made no progress within {timeout:.1f}s"
        except ProcessError as exc:
            return False, str(exc)
    if done.returncode != _PROBE_OK:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return False, f"a tiny {accel} guest failed: {detail[0]}"
    return True, f"a tiny {accel} guest ran in {time.monotonic() - began:.2f}s"


def _probe_firmware(touch: int) -> bytes:
    """A 64 KiB BIOS image: from the reset vector, switch to flat 32-bit protected mode, zero `touch`
    bytes from 1 MiB up, write 1 to the isa-debug-exit port. Hand-assembled; checked under TCG in tests."""
    low = 0xF0000  # where the last 64 KiB of the BIOS are mirrored below 1 MiB
    code16_at, gdt_at, code32_at = 0x0000, 0x0040, 0x0080
    gdt = bytes(8) + bytes.fromhex("ffff0000009acf00") + bytes.fromhex("ffff00000092cf00")  # null, code, data
    gdtr = struct.pack("<HI", len(gdt) - 1, low + gdt_at)
    code16 = b"".join(
        [
            b"\xfa",  # cli
            b"\x2e\x0f\x01\x16" + struct.pack("<H", gdt_at + len(gdt)),  # lgdt cs:[gdtr]
            b"\x0f\x20\xc0",  # mov eax, cr0
            b"\x66\x25\xff\xff\xff\x9f",  # and eax, ~(CD | NW)
            b"\x0c\x01",  # or al, PE
            b"\x0f\x22\xc0",  # mov cr0, eax
            b"\x66\xea" + struct.pack("<IH", low + code32_at, 0x08),  # jmp dword 0x08:code32
        ]
    )
    code32 = b"".join(
        [
            b"\x66\xb8\x10\x00",  # mov ax, 0x10
            b"\x8e\xd8",  # mov ds, ax
            b"\x8e\xc0",  # mov es, ax
            b"\xbf" + struct.pack("<I", MIB),  # mov edi, 1 MiB
            b"\xb9" + struct.pack("<I", touch // 4),  # mov ecx, touch / 4
            b"\x31\xc0",  # xor eax, eax
            b"\xfc",  # cld
            b"\xf3\xab",  # rep stosd
            b"\xb0\x01",  # mov al, 1
            b"\xe6" + bytes([_PROBE_EXIT_PORT]),  # out exit-port, al
            b"\xf4",  # hlt
        ]
    )
    image = bytearray(b"\xf4" * 0x10000)  # hlt everywhere else
    image[code16_at : code16_at + len(code16)] = code16
    image[gdt_at : gdt_at + len(gdt) + len(gdtr)] = gdt + gdtr
    image[code32_at : code32_at + len(code32)] = code32
    image[0xFFF0:0xFFF5] = b"\xea" + struct.pack("<HH", code16_at, 0xF000)  # reset vector: jmp f000:code16
    return bytes(image)


# --- the backend --------------------------------------------------------------------------------------

# QEMU's RunState names (query-status) as the protocol's VmState.
_STATES = {
    "running": VmState.RUNNING,
    "prelaunch": VmState.CREATED,
    "inmigrate": VmState.CREATED,
    "debug": VmState.BREAKPOINT,
    "shutdown": VmState.SHUTDOWN,
    "guest-panicked": VmState.SHUTDOWN,
    "internal-error": VmState.SHUTDOWN,
    **dict.fromkeys(["paused", "suspended", "io-error", "watchdog", "postmigrate"], VmState.PAUSED),
    **dict.fromkeys(["finish-migrate", "save-vm", "restore-vm", "colo"], VmState.PAUSED),
}
_LOG_TAIL_LINES = 5


class Qemu:
    """The qemu backend of the Hypervisor protocol.

    `binary`: the QEMU executable (None: qemu-system-x86_64 on PATH). `accel`: "kvm" or "tcg" as
    configured; None or "auto" take $PROCURATOR_QEMU_ACCEL when set, else probe (see `probe_accel`).
    `start_timeout` bounds start-up (QMP answering and the VM running), `api_timeout` each QMP session,
    `step_timeout` each hard step of the stop ladder (quit, SIGTERM, SIGKILL), `migration_timeout` a
    snapshot's or a restore's migration stream.
    """

    name = BACKEND

    def __init__(
        self,
        *,
        binary: str | None = None,
        accel: str | None = None,
        start_timeout: float = 30.0,
        api_timeout: float = 5.0,
        step_timeout: float = 5.0,
        migration_timeout: float = 300.0,
        serial_max_bytes: int = serial_keeper.DEFAULT_MAX_BYTES,
    ) -> None:
        self.binary = binary or DEFAULT_BINARY
        self.serial_max_bytes = serial_max_bytes
        # A `File` serial port is a socket read by a serial keeper, which bounds the log (keepers.py).
        self._keepers = Keepers(serial_max_bytes)
        self.migration_timeout = migration_timeout
        self.accel_setting = accel_setting(accel)
        self.start_timeout = start_timeout
        self.api_timeout = api_timeout
        self.step_timeout = step_timeout

    def accel(self) -> Accel:
        return probe_accel(self.accel_setting, binary=self.binary)

    def start(self, spec: LaunchSpec) -> Handle:
        config, keep = wire_serial(spec.config, spec.vm_dir)
        argv = build_argv(
            config, qmp_socket=spec.api_socket, accel=self.accel(), binary=self.binary, tap_fds=spec.tap_fds
        )
        argv.append("-S")  # the guest waits (prelaunch) until its vCPUs are pinned; then `cont`
        return self._launch(
            spec, argv, "starting", lambda proc: self._wait_running(spec, proc, keep=keep), keep=keep
        )

    def _launch(
        self,
        spec: LaunchSpec,
        argv: list[str],
        doing: str,
        until: Callable[[subprocess.Popen[bytes]], int],
        *,
        keep: bool,
    ) -> Handle:
        """Spawn QEMU with `argv` for `spec` and wait (`until`, bounded) for it; its Handle. With `keep`, the
        config's serial port is a socket for a serial keeper (wire_serial). On any failure
        nothing is left running, and an exit while `doing` quotes the end of the hypervisor log."""
        _require_taps(spec, _config_taps(spec.config).values())
        spec.vm_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale_socket(spec)
        if keep:  # QEMU binds the serial socket (wire_serial) in a directory made for it
            keepers.prepare(spec.vm_dir, None)
        with spec.hypervisor_log.open("ab") as log_file:
            log_offset = log_file.tell()
            try:
                proc = process.spawn(
                    argv,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=[fd for fds in spec.tap_fds.values() for fd in fds],
                    user=spec.user,
                    uid=spec.uid,
                    gid=spec.gid,
                    groups=spec.groups,
                    netns=spec.netns,
                    join=spec.join,
                )
            except ProcessError as exc:
                raise HypervisorStartError(f"{spec.name}: cannot start qemu: {exc}") from exc
        try:
            start_time = until(proc)
        except BaseException as exc:
            exited = _reap(proc, 0.5)  # a QMP error may be the process on its way out
            _discard(proc, spec.api_socket)
            self._keepers.gone(spec.vm_dir, self.step_timeout)
            if exited is not None and isinstance(exc, ProcuratorError):
                tail = _log_tail(spec.hypervisor_log, log_offset)
                raise HypervisorStartError(
                    f"{spec.name}: qemu exited with status {exited} while {doing}: {tail}"
                ) from exc
            raise
        log.info(
            "%s: qemu %s pid %d", spec.name, "running as" if doing == "starting" else "restored as", proc.pid
        )
        return Handle(BACKEND, proc.pid, start_time, spec.api_socket, spec.vm_dir)

    def _wait_running(self, spec: LaunchSpec, proc: subprocess.Popen[bytes], *, keep: bool) -> int:
        """Wait (bounded) until QMP answers and reports the VM running; the process's start time. With
        `keep`, the serial keeper is connected while the guest waits in prelaunch, before `cont`."""
        start_time = process.process_start_time(proc.pid)
        if start_time is None:
            raise HypervisorStartError(f"{spec.name}: qemu exited at once")
        if keep:  # it starts while QEMU does, and connects once QEMU's chardev listens
            self._keepers.spawn(spec.name, spec.vm_dir, spec.serial_log, pid=proc.pid, start_time=start_time)
        with qmp.connect(spec.api_socket, self.start_timeout, alive=lambda: proc.poll() is None) as client:
            seen = [""]

            def running() -> bool:
                seen[0] = status = _status(client)
                if status == "prelaunch":  # started with -S: pin, keep the serial, then let the guest run
                    pin_vcpus(client, spec.name, affinity(_section("cpus", spec.config.get("cpus"))))
                    if keep:
                        self._keepers.connected(spec.name, spec.vm_dir, self.start_timeout)
                    client.execute("cont")
                    return False
                if _STATES.get(status) == VmState.SHUTDOWN:
                    raise HypervisorStartError(f"{spec.name}: qemu reports the VM {status} while starting")
                return status == "running"

            waits.wait_until(
                running, self.start_timeout, f"VM {spec.name} to run", last=lambda: f"QMP status {seen[0]}"
            )
            return start_time

    def _clear_stale_socket(self, spec: LaunchSpec) -> None:
        """Remove a QMP socket left by a dead process; refuse to start over one that is still served."""
        path = spec.api_socket
        claimed = sockets.claim(path, timeout=1.0)
        if claimed is sockets.Claim.IN_USE:
            raise ConflictError(f"{spec.name}: {path} is served by a running process; stop that VM first")
        if claimed is sockets.Claim.NOT_A_SOCKET:
            raise ConflictError(f"{spec.name}: {path} exists and is not a socket; remove it")

    def info(self, handle: Handle) -> VmInfo:
        if not _ours(handle):
            return VmInfo(VmState.GONE, {"pid": handle.pid})
        with self._session(handle) as client:
            status = _status(client)
        return VmInfo(_STATES.get(status, VmState.PAUSED), {"pid": handle.pid, "qemu_status": status})

    def counters(self, handle: Handle) -> dict[str, dict[str, int]]:
        """Per device id, like cloud-hypervisor's vm.counters: disks from query-blockstats, nets from the
        TAP's statistics in the process's own network namespace (best effort, seen from the guest)."""
        if not _ours(handle):
            raise HypervisorError(f"qemu pid {handle.pid} ({handle.vm_dir.name}) is not running")
        with self._session(handle) as client:
            blockstats = client.execute("query-blockstats")
        found: dict[str, dict[str, int]] = {}
        for entry in blockstats if isinstance(blockstats, list) else []:
            stats = entry.get("stats", {})
            if entry.get("device"):
                found[str(entry["device"])] = {
                    "read_bytes": int(stats.get("rd_bytes", 0)),
                    "write_bytes": int(stats.get("wr_bytes", 0)),
                    "read_ops": int(stats.get("rd_operations", 0)),
                    "write_ops": int(stats.get("wr_operations", 0)),
                }
        host_side = _net_dev_stats(handle.pid)
        for ident, tap in (_taps_of(handle.pid) | _recorded_taps(handle.vm_dir)).items():
            if tap in host_side:
                rx_bytes, rx_packets, tx_bytes, tx_packets = host_side[tap]
                # What the host sends into the TAP is what the guest receives, and the other way round.
                found[ident] = {
                    "rx_bytes": tx_bytes,
                    "rx_frames": tx_packets,
                    "tx_bytes": rx_bytes,
                    "tx_frames": rx_packets,
                }
        return found

    def shutdown(self, handle: Handle, timeout: float) -> StopResult:
        """The ACPI power button, then `quit`, SIGTERM and SIGKILL, each bounded; graceful only if the
        guest powered off by itself within `timeout`."""
        if not _ours(handle):
            self._gone(handle)
            return StopResult(graceful=False, steps=("gone",))
        steps: list[str] = []
        try:
            if self._qmp_step(handle, "system_powerdown"):
                steps.append("power-button")
                if process.wait_gone(handle.pid, handle.start_time, timeout):
                    return StopResult(graceful=True, steps=tuple(steps))
            ladder: list[tuple[str, Callable[[], bool]]] = [
                ("quit", lambda: self._qmp_step(handle, "quit")),
                ("SIGTERM", lambda: process.signal_process(handle.pid, signal.SIGTERM)),
                ("SIGKILL", lambda: process.signal_process(handle.pid, signal.SIGKILL)),
            ]
            for step, act in ladder:
                if not _ours(handle):
                    break
                steps.append(step)
                log.warning("%s: qemu pid %d still running; %s", handle.vm_dir.name, handle.pid, step)
                if act() and process.wait_gone(handle.pid, handle.start_time, self.step_timeout):
                    break
            else:
                raise WaitTimeoutError(f"qemu pid {handle.pid} to exit after SIGKILL", self.step_timeout)
            return StopResult(graceful=False, steps=tuple(steps))
        finally:
            self._gone(handle)

    def kill(self, handle: Handle) -> None:
        try:
            if _ours(handle):
                process.signal_process(handle.pid, signal.SIGKILL)
                if not process.wait_gone(handle.pid, handle.start_time, self.step_timeout):
                    raise WaitTimeoutError(f"qemu pid {handle.pid} to exit after SIGKILL", self.step_timeout)
        finally:
            self._gone(handle)

    def _gone(self, handle: Handle) -> None:
        """After a stop: the QMP socket removed and, once the process is gone, its serial keeper collected
        (it exits with QEMU, after reading what is left) and the serial socket removed."""
        if not _ours(handle):
            self._keepers.gone(handle.vm_dir, self.step_timeout)
        handle.api_socket.unlink(missing_ok=True)

    def pause(self, handle: Handle) -> None:
        """QMP `stop`: the vCPUs stop (QEMU's "paused" run state)."""
        with self._session(handle) as client:
            client.execute("stop")

    def resume(self, handle: Handle) -> None:
        """QMP `cont`."""
        with self._session(handle) as client:
            client.execute("cont")

    def snapshot(self, handle: Handle, directory: Path) -> None:
        """Migrate the paused guest into `directory`/memory.qemu and wait (bounded) for it to complete.

        QEMU 7.2 (Debian 12's) has no `file:` migration URI (it came in 8.2): the stream goes to `exec:cat`,
        which QEMU runs with /bin/sh. After it, QEMU's run state is `postmigrate` (paused); `cont` runs the
        guest again (it reactivates the disks).
        """
        target = directory / SNAPSHOT_FILE
        with self._session(handle) as client:
            status = _status(client)
            if _STATES.get(status) is not VmState.PAUSED:
                raise HypervisorError(
                    f"qemu pid {handle.pid}: the guest is {status}; pause it before a snapshot"
                )
            client.execute("migrate-set-parameters", {"max-bandwidth": _MIGRATION_BANDWIDTH})
            client.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(target))}"})
            self._await_migration(client, f"the snapshot of qemu pid {handle.pid} into {target}")

    def _await_migration(self, client: qmp.QmpClient, what: str) -> None:
        deadline = time.monotonic() + self.migration_timeout
        pause = 0.01
        while True:
            answer = client.execute("query-migrate")
            status = answer.get("status") if isinstance(answer, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                detail = answer.get("error-desc", "no reason given")
                raise HypervisorError(f"{what}: migration {status}: {detail}")
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(f"{what} (migration {status})", self.migration_timeout)
            time.sleep(pause)
            pause = min(pause * 1.5, 0.2)

    def restore(self, spec: LaunchSpec, directory: Path, *, paused: bool) -> Handle:
        """Start QEMU for `spec` (the runtime config the snapshot was taken with) waiting for an incoming
        migration, feed it `directory`/memory.qemu, and run the guest unless `paused`. On any failure
        nothing is left running."""
        source = directory / SNAPSHOT_FILE
        if not source.is_file():
            raise HypervisorStartError(f"{spec.name}: {source} is missing; this is no qemu snapshot")
        config, keep = wire_serial(spec.config, spec.vm_dir)
        argv = build_argv(
            config, qmp_socket=spec.api_socket, accel=self.accel(), binary=self.binary, tap_fds=spec.tap_fds
        )
        argv += ["-incoming", "defer"]
        return self._launch(
            spec,
            argv,
            "restoring",
            lambda proc: self._incoming(spec, proc, source, paused=paused, keep=keep),
            keep=keep,
        )

    def _incoming(
        self, spec: LaunchSpec, proc: subprocess.Popen[bytes], source: Path, *, paused: bool, keep: bool
    ) -> int:
        """Feed the waiting QEMU `source` (bounded), then run or keep the guest paused; its start time.
        With `keep`, the serial keeper is connected first (the guest runs only after the migration)."""
        start_time = process.process_start_time(proc.pid)
        if start_time is None:
            raise HypervisorStartError(f"{spec.name}: qemu exited at once")
        if keep:
            self._keepers.spawn(spec.name, spec.vm_dir, spec.serial_log, pid=proc.pid, start_time=start_time)
        with qmp.connect(spec.api_socket, self.start_timeout, alive=lambda: proc.poll() is None) as client:
            if keep:
                self._keepers.connected(spec.name, spec.vm_dir, self.start_timeout)
            client.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(source))}"})
            self._await_migration(client, f"{spec.name}: the restore from {source}")
            status = _status(client)
            if status == "running" and paused:
                client.execute("stop")
            elif status != "running" and not paused:
                client.execute("cont")
        return start_time

    def console_path(self, handle: Handle) -> Path:
        """The virtio console's socket: a `Pty` console is served as this socket (see `_console`)."""
        return handle.vm_dir / CONSOLE_SOCKET

    def guest_end(self, vm_dir: Path) -> GuestEnd | None:  # noqa: ARG002 - the protocol's signature
        """Nothing to tell apart from the exit status: QEMU runs with `-no-reboot`, so a reset or a panic
        ends its process, and a power-off too (no `--no-shutdown` counterpart is used)."""
        return None

    def adopt(self, handle: Handle) -> bool:
        if handle.backend != BACKEND or not _ours(handle):
            return False
        try:
            with self._session(handle) as client:
                _status(client)
        except ProcuratorError as exc:
            log.warning(
                "%s: qemu pid %d is running but QMP does not answer: %s", handle.vm_dir.name, handle.pid, exc
            )
            return False
        return True

    def ping(self, handle: Handle, *, timeout: float | None = None) -> str:
        """QMP `query-status` in a fresh session (connect, handshake and answer each within `timeout`,
        default api_timeout): the RunState, e.g. "running" or "paused". QEMU's main loop answers QMP, so a
        stuck main loop does not."""
        with self._session(handle, timeout) as client:
            return _status(client)

    def _session(self, handle: Handle, timeout: float | None = None) -> qmp.QmpClient:
        bound = self.api_timeout if timeout is None else timeout
        return qmp.connect(handle.api_socket, bound, alive=lambda: _ours(handle))

    def _qmp_step(self, handle: Handle, command: str) -> bool:
        """Send `command` in a fresh session; whether QEMU took it (a failure is logged, not raised)."""
        try:
            with self._session(handle) as client:
                client.execute(command)
        except ProcuratorError as exc:
            if command == "quit" and not _ours(handle):
                return True  # it quit before it could answer
            log.warning("%s: QMP %s failed: %s", handle.vm_dir.name, command, exc)
            return False
        return True


def pin_vcpus(client: qmp.QmpClient, name: str, wanted: Mapping[int, frozenset[int]]) -> None:
    """sched_setaffinity of each vCPU thread (query-cpus-fast's thread-id) to its host CPUs, read back."""
    if not wanted:
        return
    threads = {int(c["cpu-index"]): int(c["thread-id"]) for c in client.execute("query-cpus-fast")}
    for vcpu, cpus in sorted(wanted.items()):
        tid = threads.get(vcpu)
        if tid is None:
            raise HypervisorStartError(f"{name}: cpus.affinity names vCPU {vcpu}, which qemu does not have")
        try:
            os.sched_setaffinity(tid, cpus)
            found = os.sched_getaffinity(tid)
        except OSError as exc:
            raise HypervisorStartError(
                f"{name}: cannot pin vCPU {vcpu} (thread {tid}) to CPUs {sorted(cpus)}: {exc.strerror}; "
                "use CPUs this host has (resources.cpuAffinity)"
            ) from exc
        if found != cpus:
            raise HypervisorStartError(
                f"{name}: vCPU {vcpu} may run on CPUs {sorted(found)}, not {sorted(cpus)} as pinned"
            )


def _require_taps(spec: LaunchSpec, taps: Iterable[str]) -> None:
    """Refuse to start unless every TAP exists where QEMU will run: as root, QEMU would silently create a
    missing one, attached to nothing, instead of failing (Procurator creates TAPs, docs/worker.md)."""
    wanted = list(taps)
    if not wanted:
        return
    with netlink.session(spec.netns) as nl:  # the one way Procurator looks at links (net/netlink.py)
        missing = [tap for tap in wanted if nl.link(tap) is None]
    for tap in missing:
        where = "on this host" if spec.netns is None else f"in network namespace {spec.netns}"
        raise HypervisorStartError(
            f"{spec.name}: TAP {tap} does not exist {where}; create it before starting"
        )


def _status(client: qmp.QmpClient) -> str:
    answer = client.execute("query-status")
    if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
        raise qmp.QmpError("query-status", f"unexpected answer {answer!r}")
    return str(answer["status"])


def _ours(handle: Handle) -> bool:
    return process.alive(handle.pid, handle.start_time)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status of `proc` if it exits within `timeout` seconds, else None."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _discard(proc: subprocess.Popen[bytes], api_socket: Path) -> None:
    """Kill a process that failed to start (bounded) and remove its socket."""
    if proc.poll() is None:
        proc.kill()
        if _reap(proc, 5.0) is None:
            log.error("qemu pid %d did not exit within 5s of SIGKILL", proc.pid)
    api_socket.unlink(missing_ok=True)


def _log_tail(path: Path, offset: int) -> str:
    """The last lines this start wrote to the hypervisor log, joined into one line."""
    try:
        lines = logfiles.tail(path, _LOG_TAIL_LINES, offset=offset, nonblank=True)
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return " | ".join(lines) or f"(nothing in {path})"


def _taps_of(pid: int) -> dict[str, str]:
    """netdev id -> TAP name of the running process, read back from the command line we gave it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return _taps_in(argv)


def _config_taps(config: Mapping[str, Any]) -> dict[str, str]:
    """net id -> TAP name of a runtime config's nets."""
    nets = config.get("net") or []
    return {
        str(n.get("id", "")): str(n["tap"])
        for n in nets
        if isinstance(n, Mapping) and isinstance(n.get("tap"), str)
    }


def _recorded_taps(vm_dir: Path) -> dict[str, str]:
    """net id -> TAP name from the runtime config the VM started with (TAPs passed as descriptors are not
    named on QEMU's command line)."""
    try:
        config = json.loads((vm_dir / "vm-config.runtime.json").read_text())
    except (OSError, ValueError):
        return {}
    return _config_taps(config) if isinstance(config, dict) else {}


def _taps_in(argv: Sequence[str]) -> dict[str, str]:
    """netdev id -> TAP name for every `-netdev tap,...` in `argv`."""
    taps: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag != "-netdev":
            continue
        kind, *options = _split_options(value)
        fields = dict(option.partition("=")[::2] for option in options)
        if kind == "tap" and "id" in fields and "ifname" in fields:
            taps[fields["id"]] = fields["ifname"]
    return taps


def _net_dev_stats(pid: int) -> dict[str, tuple[int, int, int, int]]:
    """Interface -> (rx_bytes, rx_packets, tx_bytes, tx_packets) in the network namespace of `pid`."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return {}
    stats: dict[str, tuple[int, int, int, int]] = {}
    for line in lines:
        name, _, numbers = line.partition(":")
        values = numbers.split()
        if len(values) >= 10:
            stats[name.strip()] = (int(values[0]), int(values[1]), int(values[8]), int(values[9]))
    return stats


# --- `procurator doctor`'s questions (hypervisor/base.py `Diagnosis`) ---------------------------------


def kvm_missing(problem: str) -> Finding:
    return Finding("warn", f"{problem}; qemu guests run under TCG (slow)", "enable virtualisation in the "
                   "firmware and load kvm_intel or kvm_amd")  # fmt: skip


def kvm_present(settings: HypervisorSettings, detail: str) -> Finding:
    if accel_setting(settings.accel) == "tcg":
        return Finding("ok", detail)
    usable, reason = kvm_usable(settings.binary or DEFAULT_BINARY)
    if not usable:
        return Finding(
            "warn",
            f"{detail}, but {reason}; qemu guests run under TCG (slow)",
            "on nested virtualisation, enable nested KVM on the outer host",
        )
    return Finding("ok", f"{detail}; {reason}")


def binary_finding(settings: HypervisorSettings) -> Finding:
    binary_name = settings.binary or DEFAULT_BINARY
    found = shutil.which(binary_name)
    if found is None:
        return Finding(
            "fail",
            f"{binary_name}: not found",
            "install QEMU (Debian: qemu-system-x86) or set hypervisor.binary in the worker config",
        )
    done = process.run([found, "--version"], check=False, timeout=10.0)
    first = (done.stdout.strip().splitlines() or [f"exit status {done.returncode}"])[0]
    if done.returncode != 0:
        return Finding(
            "fail", f"{found} --version failed: {first}", "reinstall QEMU or fix hypervisor.binary"
        )
    return Finding("ok", f"{found}: {first}")
