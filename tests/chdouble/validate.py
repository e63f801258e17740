"""cloud-hypervisor's `VmConfig::validate` (vmm/src/config.rs), as far as it concerns the configs Procurator
sends, plus the simple general rules.

Where it runs: not at vm.create. `vm_create` (vmm/src/lib.rs) only stores the config and pre-creates the
console devices; `vm_boot` builds a `Vm`, and `Vm::new_from_memory_manager` (vmm/src/vm.rs) calls
`config.validate()` first, before any device exists (so before the disks' warnings and the TAPs), mapping a
failure to `Error::ConfigValidation` ("Failed to validate config"). The API answers 500 with the chain
`["Error from API", "The VM could not boot", "Failed to validate config", <ValidationError>, ...]` (read at
v40.0, v46.0, v47.0, v50.0, v53.0).

The rules are checked in the order `VmConfig::validate` checks them (v53.0), and the first failure wins, as
there. Texts are those of the release asked for, from v47 on (thiserror `#[error]` texts; v40 to v46 had a
manual `Display` and put every level into one text, "Failed to validate config: <text>", which the double
does not model: it answers the v47 chain for them too).

Defaults a missing field takes are serde's (vmm/src/vm_config.rs, the same in v40.0 and v53.0): one vCPU;
`console` Tty, `serial` Null; disks 1 queue of 128, nets 2 queues of 256, fs 1 queue of 1024; shared,
hugepages, mergeable, vhost_user false; offload_csum/tso/ufo true.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.chdouble.landlock import LANDLOCK_SINCE, validate_rules
from tests.chdouble.tap import RustError

VALIDATION_FAILED = "Failed to validate config"  # vmm/src/vm.rs Error::ConfigValidation (v47+)

MAX_SUPPORTED_CPUS = 8192  # vmm/src/config.rs, with the kvm feature on x86_64 (v48+)
MINIMUM_BLOCK_QUEUE_SIZE = 2  # virtio-devices/src/block.rs (v44+)
VIRTIO_MAX_QUEUE_SIZE = 32768  # vmm/src/config.rs (v53)
VIRTIO_BLK_ID_BYTES = 20  # virtio-devices/src/block.rs, the serial length limit (v47+)
MIN_MTU = 1280  # virtio-devices/src/net.rs, the same value v40-v53
SPECIAL_VSOCK_CIDS = (0xFFFFFFFF, 0, 1, 2)  # `[!0, 0, 1, 2]` on a u32 cid

PAYLOAD_VALIDATE_SINCE = 48  # PayloadConfig::validate and ValidationError::PayloadError first in v48.0
TOO_MANY_CPUS_SINCE = 48  # ValidationError::TooManyCpus first in v48.0
NUMBERED_TEXTS_SINCE = 51  # CpusMaxLowerThanBoot, VnetQueueLowerThan2, TooManyQueues carry numbers from v51
BLOCK_QUEUE_SIZE_SINCE = 44  # DiskConfig::validate refuses queue_size <= 2 from v44.0
POWER_OF_TWO_QUEUES_SINCE = 53  # validate_queue_size (disk, net, fs) first in v53.0
SERIAL_LENGTH_SINCE = 47  # DiskConfig serial length check first in v47.0
IP_MASK_PAIR_SINCE = 49  # MaskProvidedWithoutIp / IpProvidedWithoutMask first in v49.0 (ip/mask optional)
PCI_COMMON_SINCE = 52  # rng and console ids enter the identifier list, fs refuses iommu, threads <= 2 (v52)
MERGEABLE_SHARED_SINCE = 52  # InvalidSharedMemoryWithMergeable first in v52.0
NET_VHOST_SOCKET_SINCE = 53  # net entries: VhostUserMissingSocket first in v53.0

Warn = Callable[[str, str], None]


class RefusedError(Exception):
    """A ValidationError: `error` is its level of the chain (with its source, if any)."""

    def __init__(self, variant: str, text: str, source: RustError | None = None) -> None:
        super().__init__(text)
        self.error = RustError(variant, text, source)


def validate(config: dict[str, Any], release: int, warn: Warn | None = None) -> RustError | None:
    """`VmConfig::validate` at vm.boot: None if the config passes, else `Error::ConfigValidation` with the
    ValidationError as its source. `warn(location, message)` receives the warnings it logs."""
    try:
        _Validator(config, release, warn or (lambda _location, _message: None)).run()
    except RefusedError as refused:
        return RustError("ConfigValidation", VALIDATION_FAILED, refused.error)
    return None


def _items(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = config.get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class _Validator:
    def __init__(self, config: dict[str, Any], release: int, warn: Warn) -> None:
        self.config = config
        self.release = release
        self.warn = warn
        self.ids: set[str] = set()
        cpus = _section(config, "cpus")
        self.boot_vcpus = int(cpus.get("boot_vcpus", 1))
        self.max_vcpus = int(cpus.get("max_vcpus", 1))
        self.memory = _section(config, "memory")

    def run(self) -> None:
        """`VmConfig::validate` (vmm/src/config.rs), its checks in its order (v53.0)."""
        self.payload()
        self.consoles()
        self.cpus()
        for disk in _items(self.config, "disks"):
            self.disk(disk)
        for net in _items(self.config, "net"):
            self.net(net)
        fses = _items(self.config, "fs")
        if fses and not self.shared_memory():
            raise RefusedError(
                "VhostUserRequiresSharedMemory", "Using vhost-user requires using shared memory or huge pages"
            )
        for fs in fses:
            self.fs(fs)
        for pmem in _items(self.config, "pmem"):
            self.identifier(pmem.get("id"))
        if self.release >= PCI_COMMON_SINCE:  # RngConfig and ConsoleConfig have a PCI id from v52
            self.identifier(_section(self.config, "rng").get("id"))
            self.identifier(_section(self.config, "console").get("id"))
        self.topology()
        self.hugepages()
        vsock = self.config.get("vsock")
        if isinstance(vsock, dict) and vsock.get("cid") in SPECIAL_VSOCK_CIDS:
            raise RefusedError("VsockSpecialCid", f"{vsock['cid']} is a special VSOCK CID")
        if isinstance(vsock, dict):
            self.identifier(vsock.get("id"))
        if self.release >= LANDLOCK_SINCE:  # after the platform checks, last but ivshmem (v41.0-v53.0)
            refused = validate_rules(self.config)
            if refused is not None:
                variant = (
                    "InvalidLandlockAccess" if refused.startswith("Invalid") else "LandlockPathDoesNotExist"
                )
                raise RefusedError(variant, refused)

    def payload(self) -> None:
        """v48+: `PayloadConfig::validate` (vmm/src/vm_config.rs): a kernel or a firmware, not both; with a
        firmware, cmdline and initramfs are ignored with a warning. v40-v47: only a missing `payload` is
        refused (`KernelMissing`, "No kernel specified"). The double has no igvm feature (vmm.ping lists
        only kvm), so an `igvm` payload counts for nothing, as serde ignores the unknown field."""
        payload = self.config.get("payload")
        if self.release < PAYLOAD_VALIDATE_SINCE:
            if not isinstance(payload, dict):
                raise RefusedError("KernelMissing", "No kernel specified")
            return
        not_bootable = "Payload configuration is not bootable"
        if not isinstance(payload, dict):
            payload = {}
        kernel, firmware = payload.get("kernel") is not None, payload.get("firmware") is not None
        if kernel and firmware:
            raise RefusedError(
                "PayloadError",
                not_bootable,
                RustError(
                    "FirmwarePlusOtherPayloads",
                    "Specifying a kernel is not supported when a firmware is provided",
                ),
            )
        if not kernel and not firmware:
            raise RefusedError(
                "PayloadError",
                not_bootable,
                RustError("MissingBootitem", "No bootitem provided: neither firmware nor kernel"),
            )
        if firmware:
            for key in ("cmdline", "initramfs"):
                if payload.get(key) is not None:
                    self.warn(
                        "vmm/src/vm_config.rs",
                        f"Ignoring {key} parameter as firmware is provided as the payload",
                    )

    def consoles(self) -> None:
        """TTY output for several consoles is only a warning (v40-v53, `tty_consoles`); a `File` console or
        serial without `file` is refused (`ConsoleFileMissing`, v40-v53). A `Socket` without `socket` is
        refused only by the command-line parser (`CommonConsoleConfig::parse`), not here."""
        console = _section(self.config, "console")
        serial = _section(self.config, "serial")
        debug = _section(self.config, "debug_console")
        ttys = [
            name
            for name, mode in (
                ("virtio-console", console.get("mode", "Tty")),
                ("serial-console", serial.get("mode", "Null")),
                ("debug-console", debug.get("mode", "Off")),
            )
            if mode == "Tty"
        ]
        if len(ttys) > 1:
            listed = ", ".join(f'"{name}"' for name in ttys)
            self.warn("vmm/src/config.rs", f"Using TTY output for multiple consoles: [{listed}]")
        for device in (console, serial):
            if device.get("mode") == "File" and device.get("file") is None:
                raise RefusedError("ConsoleFileMissing", "Path missing when using file console mode")

    def cpus(self) -> None:
        """`CpusMaxLowerThanBoot` (v40-v53; the numbers in its text from v51) and `TooManyCpus` (v48+)."""
        if self.max_vcpus < self.boot_vcpus:
            if self.release >= NUMBERED_TEXTS_SINCE:
                text = f"Max CPUs ({self.max_vcpus}) lower than boot CPUs ({self.boot_vcpus})"
            else:
                text = "Max CPUs lower than boot CPUs"
            raise RefusedError("CpusMaxLowerThanBoot", text)
        if self.release >= TOO_MANY_CPUS_SINCE and self.max_vcpus > MAX_SUPPORTED_CPUS:
            raise RefusedError(
                "TooManyCpus",
                f"Too many CPUs: specified {self.max_vcpus} but {MAX_SUPPORTED_CPUS} is the limit",
            )

    def too_many_queues(self, queues: int) -> RefusedError:
        if self.release >= NUMBERED_TEXTS_SINCE:
            text = f"Queue count ({queues}) must not exceed boot vCPUs ({self.boot_vcpus})"
        else:
            text = "Number of vCPUs is insufficient for number of queues"
        return RefusedError("TooManyQueues", text)

    def queue_size(self, size: int) -> None:
        """v53 `validate_queue_size`: a power of 2 (the u16 type bounds it)."""
        if self.release >= POWER_OF_TWO_QUEUES_SINCE and not _power_of_two(size):
            raise RefusedError(
                "InvalidQueueSize",
                f"Queue size must be a power of 2 no greater than {VIRTIO_MAX_QUEUE_SIZE}: {size}",
            )

    def vhost_user(self, device: dict[str, Any], *, socket_since: int) -> None:
        if device.get("vhost_user") and not self.shared_memory():
            raise RefusedError(
                "VhostUserRequiresSharedMemory", "Using vhost-user requires using shared memory or huge pages"
            )
        if device.get("vhost_user") and device.get("vhost_socket") is None and self.release >= socket_since:
            raise RefusedError("VhostUserMissingSocket", "No socket provided when using vhost-user")

    def disk(self, disk: dict[str, Any]) -> None:
        """The disk loop of `VmConfig::validate`, then `DiskConfig::validate`, then the id (v40-v53)."""
        if disk.get("vhost_socket") is not None and disk.get("path") is not None:
            raise RefusedError("DiskSocketAndPath", "Disk path and vhost socket both provided")
        self.vhost_user(disk, socket_since=0)
        queues, size = int(disk.get("num_queues", 1)), int(disk.get("queue_size", 128))
        if queues > self.boot_vcpus:
            raise self.too_many_queues(queues)
        self.queue_size(size)
        if self.release >= BLOCK_QUEUE_SIZE_SINCE and size <= MINIMUM_BLOCK_QUEUE_SIZE:
            if self.release >= POWER_OF_TWO_QUEUES_SINCE:
                raise RefusedError(
                    "BlockQueueSizeTooSmall",
                    f"Block queue size must be greater than {MINIMUM_BLOCK_QUEUE_SIZE}: {size}",
                )
            raise RefusedError(
                "InvalidQueueSize", f"Queue size is smaller than {MINIMUM_BLOCK_QUEUE_SIZE}: {size}"
            )
        if disk.get("vhost_user") and disk.get("iommu"):
            raise RefusedError("IommuNotSupported", "Device does not support being placed behind IOMMU")
        serial = disk.get("serial")
        if self.release >= SERIAL_LENGTH_SINCE and isinstance(serial, str):
            length = len(serial.encode())
            if length > VIRTIO_BLK_ID_BYTES:
                raise RefusedError(
                    "InvalidSerialLength",
                    f"Block device serial length ({length}) exceeds maximum allowed length "
                    f"({VIRTIO_BLK_ID_BYTES})",
                )
        self.identifier(disk.get("id"))

    def net(self, net: dict[str, Any]) -> None:
        """The net loop of `VmConfig::validate`, then `NetConfig::validate`, then the id (v40-v53). `fds`
        are those vm.add-net was sent (vm.create drops any: `VmCreate` in http_endpoint.rs): one per
        queue pair, none of them 0-2 (`VnetQueueFdMismatch`, `VnetReservedFd`; numbered texts from v51)."""
        self.vhost_user(net, socket_since=NET_VHOST_SOCKET_SINCE)
        queues, size = int(net.get("num_queues", 2)), int(net.get("queue_size", 256))
        if queues < 2:
            if self.release >= NUMBERED_TEXTS_SINCE:
                text = f"Number of queues ({queues}) to virtio_net should be higher than 2"
            else:
                text = "Number of queues to virtio_net less than 2"
            raise RefusedError("VnetQueueLowerThan2", text)
        fds = net.get("fds")
        if isinstance(fds, list):
            numbered = self.release >= NUMBERED_TEXTS_SINCE
            if len(fds) * 2 != queues:
                text = (
                    f"Number of queues ({queues}) to virtio_net does not match the number of FDs "
                    f"({len(fds) * 2})"
                    if numbered
                    else "Number of queues to virtio_net does not match the number of input FDs"
                )
                raise RefusedError("VnetQueueFdMismatch", text)
            for fd in fds:
                if fd <= 2:
                    text = f"Reserved fd number (<= 2): {fd}" if numbered else "Reserved fd number (<= 2)"
                    raise RefusedError("VnetReservedFd", text)
        if queues // 2 > self.boot_vcpus:
            raise self.too_many_queues(queues)
        self.queue_size(size)
        if net.get("vhost_user") and net.get("iommu"):
            raise RefusedError("IommuNotSupported", "Device does not support being placed behind IOMMU")
        mtu = net.get("mtu")
        if isinstance(mtu, int) and mtu < MIN_MTU:
            raise RefusedError(
                "InvalidMtu", f"Provided MTU {mtu} is lower than 1280 (expected by VIRTIO specification)"
            )
        if not net.get("offload_csum", True) and (
            net.get("offload_tso", True) or net.get("offload_ufo", True)
        ):
            raise RefusedError(
                "NoHardwareChecksumOffload", '"offload_tso" and "offload_ufo" depend on "offload_csum"'
            )
        if self.release >= IP_MASK_PAIR_SINCE:
            if net.get("mask") is not None and net.get("ip") is None:
                raise RefusedError("MaskProvidedWithoutIp", "Mask provided without an IP")
            if net.get("ip") is not None and net.get("mask") is None:
                raise RefusedError("IpProvidedWithoutMask", "IP provided without a mask")
        self.identifier(net.get("id"))

    def fs(self, fs: dict[str, Any]) -> None:
        """`FsConfig::validate` (v40-v53; iommu refused from v52, the queue size from v53), then the id."""
        queues, size = int(fs.get("num_queues", 1)), int(fs.get("queue_size", 1024))
        if queues > self.boot_vcpus:
            raise self.too_many_queues(queues)
        if self.release >= PCI_COMMON_SINCE and fs.get("iommu"):
            raise RefusedError("IommuNotSupported", "Device does not support being placed behind IOMMU")
        self.queue_size(size)
        self.identifier(fs.get("id"))

    def topology(self) -> None:
        """`cpus.topology` (v40-v53; at most 2 threads per core on x86_64 from v52)."""
        topology = _section(self.config, "cpus").get("topology")
        if not isinstance(topology, dict):
            return
        parts = [
            int(topology.get(k, 0))
            for k in ("threads_per_core", "cores_per_die", "dies_per_package", "packages")
        ]
        if 0 in parts:
            raise RefusedError("CpuTopologyZeroPart", "No part of the CPU topology can be zero")
        if self.release >= PCI_COMMON_SINCE and parts[0] > 2:
            raise RefusedError(
                "CpuTopologyThreadsPerCore", "CPU topology supports at most 2 threads per core"
            )
        if parts[0] * parts[1] * parts[2] * parts[3] != self.max_vcpus:
            raise RefusedError(
                "CpuTopologyCount", "Product of CPU topology parts does not match maximum vCPU"
            )

    def hugepages(self) -> None:
        """`hugepage_size` needs `hugepages` and a power of 2 (v40-v53); `shared` and `mergeable` exclude
        each other, for the memory and each zone (v52+)."""
        size = self.memory.get("hugepage_size")
        if size is not None:
            if not self.memory.get("hugepages"):
                raise RefusedError(
                    "HugePageSizeWithoutHugePages", "Huge page size specified but huge pages not enabled"
                )
            if not _power_of_two(int(size)):
                raise RefusedError("InvalidHugePageSize", f"Huge page size is not power of 2: {size}")
        if self.release >= MERGEABLE_SHARED_SINCE:
            for memory in (self.memory, *_items(self.memory, "zones")):
                if memory.get("shared") and memory.get("mergeable"):
                    raise RefusedError(
                        "InvalidSharedMemoryWithMergeable",
                        "Invalid to set both 'mergeable' and 'shared' for memory",
                    )

    def shared_memory(self) -> bool:
        """`VmConfig::backed_by_shared_memory`: `shared` or `hugepages`, or a size of 0 with every zone
        shared or on huge pages (the real one panics on size 0 without zones; the double says yes)."""
        if self.memory.get("shared") or self.memory.get("hugepages"):
            return True
        if int(self.memory.get("size", 512 << 20)) == 0:
            return all(z.get("shared") or z.get("hugepages") for z in _items(self.memory, "zones"))
        return False

    def identifier(self, value: Any) -> None:
        """`VmConfig::validate_identifier` (v40-v53): an id starting with "__" is refused (its text says
        "is not invalid" from v47, "is invalid" in v40-v46), and so is an id seen before."""
        if not isinstance(value, str):
            return
        if value.startswith("__"):
            raise RefusedError("InvalidIdentifier", f"Identifier {value} is not invalid")
        if value in self.ids:
            raise RefusedError("IdentifierNotUnique", f"Identifier {value} is not unique")
        self.ids.add(value)
