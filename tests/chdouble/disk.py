"""What cloud-hypervisor does with a disk entry when vm.boot creates its virtio-block device, and with the
disk's advisory lock when the VM boots, done for real on the image with the double's own credentials, so the
kernel decides every outcome (missing file, permission, read-only file system, a lock held elsewhere) as it
does for the real binary.

Sources (compared at v40.0, v46.0, v47.0, v50.0, v51.0, v52.0, v53.0):
- `vmm/src/device_manager.rs` `make_virtio_block_device`: the image is opened read-write, or read-only for
  `readonly`, with `O_DIRECT` for `direct` (v40-v51 with `OpenOptions` there, `DeviceManagerError::Disk`
  "Cannot open disk path" over the io::Error; from v52 through `block::open_disk`, `block/src/factory.rs`,
  whose `BlockError` (`block/src/error.rs`) reads "I/O error (path=<p> op=open)"); its type is detected
  (`block/src/lib.rs` `detect_image_type`: the first 512-byte block, QCOW magic, then a fixed-VHD footer
  (`block/src/vhd.rs`, `formats/vhd/footer.rs` from v52), then the VHDX signature, else raw); from v51 a
  given `image_type` must match what is detected (`DiskImageTypeMismatch`) and a missing one (`Unknown`)
  is replaced by the detected one with warnings, raw (and from v52 fixed VHD) losing sector 0 writes.
- `vmm/src/vm.rs` `Vm::boot` (from v46): `try_lock_disks` before the payload is joined, `LockingError`
  "Error locking disk images: Another instance likely holds a lock"; `device_manager.rs` `try_lock_disks`,
  `DiskLockError`; `virtio-devices/src/block.rs` `try_lock_image` (a read lock for a read-only disk, else a
  write lock; `LockDiskImage`), `lock_granularity` (from v52 a byte range `[0, max(logical, physical))`,
  whole file before); `block/src/fcntl.rs` (`block/src/io/fcntl.rs` in v53) `try_acquire_lock`: an OFD lock
  (`F_OFD_SETLK`), EAGAIN or EACCES meaning "The file is already locked". The lock goes with the last
  descriptor of the image, when the VM is dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.chdouble.tap import ChainError, RustError, io_error, rust_str

SECTOR_SIZE = 512
QCOW_MAGIC = 0x514649FB  # block/src/lib.rs QCOW_MAGIC, big-endian at offset 0
VHDX_SIGN = 0x656C696678646876  # block/src/lib.rs VHDX_SIGN, little-endian at offset 0 ("vhdxfile")
VHD_COOKIE = b"conectix"  # the fixed VHD footer's cookie, in the image's last 512 bytes
LOCK_SINCE = 46  # vm.rs Vm::boot try_lock_disks first in v46.0
IMAGE_TYPE_SINCE = 51  # DiskConfig.image_type and the mismatch check first in v51.0
OPEN_DISK_SINCE = 52  # block::open_disk and BlockError first in v52.0
BYTE_RANGE_SINCE = 52  # LockGranularityChoice::ByteRange, the default, first in v52.0
DEPRECATION_SINCE = 52  # the "DEPRECATION: auto-detection ..." warning first in v52.0
# serde names of block::ImageType, and their Display (used in the warnings and the mismatch error)
IMAGE_TYPES = {"FixedVhd": "vhd", "Qcow2": "qcow2", "Raw": "raw", "Vhdx": "vhdx", "Unknown": "unknown"}
# struct flock on x86_64: l_type, l_whence (short), padding, l_start, l_len (off_t), l_pid (pid_t), padding
_FLOCK = "hh4xqqi4x"

UNEXPECTED_EOF = RustError(
    "UnexpectedEof",
    "failed to fill whole buffer",
    debug_form='Error { kind: UnexpectedEof, message: "failed to fill whole buffer" }',
)


@dataclass
class OpenDisk:
    """An image the VM holds open while it exists (`fd`), with what `try_lock_image` needs."""

    fd: int
    path: str
    readonly: bool
    image_type: str


def device_manager(error: RustError) -> RustError:
    """vmm/src/vm.rs `Error::DeviceManager` (v40-v46: `"Error from device manager: {0:?}"`)."""
    return RustError("DeviceManager", "Error from device manager", error)


def _block_error(op: str, source: RustError, path: str | None) -> RustError:
    """block/src/error.rs (v52+) `BlockError`: Display: kind and context; source: the io::Error."""
    ctx = " ".join([*([f"path={path}"] if path is not None else []), f"op={op}"])
    debug_ctx = (
        f"ErrorContext {{ path: {f'Some({rust_str(path)})' if path is not None else 'None'}, offset: None, "
        f"op: Some({'Open' if op == 'open' else 'DetectImageType'}) }}"
    )
    return RustError(
        "BlockError",
        f"I/O error ({ctx})",
        source,
        debug_form=f"BlockError {{ kind: Io, source: Some({source.debug()}), ctx: Some({debug_ctx}) }}",
    )


def detect_image_type(fd: int) -> str:
    """block/src/lib.rs `detect_image_type`; raises ChainError with the io error (a short read included)."""
    try:
        block = os.pread(fd, SECTOR_SIZE, 0)
    except OSError as exc:
        raise ChainError(io_error(exc)) from None
    if len(block) < SECTOR_SIZE:
        raise ChainError(UNEXPECTED_EOF)
    if struct.unpack(">I", block[:4])[0] == QCOW_MAGIC:
        return "Qcow2"
    if _is_fixed_vhd(fd):
        return "FixedVhd"
    if struct.unpack("<Q", block[:8])[0] == VHDX_SIGN:
        return "Vhdx"
    return "Raw"


def _is_fixed_vhd(fd: int) -> bool:
    """The footer in the last 512 bytes: cookie, format version 1.0, no data offset, disk type 2 (fixed)."""
    size = os.fstat(fd).st_size
    if size < SECTOR_SIZE:
        return False
    footer = os.pread(fd, SECTOR_SIZE, size - SECTOR_SIZE)
    if len(footer) < SECTOR_SIZE:
        return False
    version, data_offset = struct.unpack(">IQ", footer[12:24])
    (disk_type,) = struct.unpack(">I", footer[60:64])
    return footer[:8] == VHD_COOKIE and version == 0x0001_0000 and data_offset == 2**64 - 1 and disk_type == 2


@dataclass
class DiskOpener:
    """`make_virtio_block_device` for one release; `warn` logs as cloud-hypervisor's `warn!`."""

    release: int
    warn: Callable[[str, str], None]

    def open_disk(self, disk: dict[str, Any]) -> OpenDisk:
        """Open and type one disk entry (mutating its `image_type` as the real one does from v51), or raise
        ChainError with the `DeviceManagerError`."""
        path = str(disk.get("path") or "")
        readonly = bool(disk.get("readonly", False))
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if disk.get("direct", False):
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            source = io_error(exc)
            if self.release >= OPEN_DISK_SINCE:
                source = _block_error("open", source, path)
            raise ChainError(RustError("Disk", "Cannot open disk path", source)) from None
        try:
            detected = self._detect(fd)
            self._check_type(disk, detected)
        except ChainError:
            os.close(fd)
            raise
        return OpenDisk(fd, path, readonly, str(disk.get("image_type", detected)))

    def _detect(self, fd: int) -> str:
        try:
            return detect_image_type(fd)
        except ChainError as exc:
            if self.release >= OPEN_DISK_SINCE:
                error = RustError(
                    "Disk", "Cannot open disk path", _block_error("detect_image_type", exc.error, None)
                )
            else:
                error = RustError("DetectImageType", "Failed to parse disk image format", exc.error)
            raise ChainError(error) from None

    def _check_type(self, disk: dict[str, Any], detected: str) -> None:
        if self.release < IMAGE_TYPE_SINCE:
            return  # v40-v50 have no image_type: the field is ignored (no struct denies unknown fields)
        given = disk.get("image_type", "Unknown")
        shown = IMAGE_TYPES[detected]
        here = "vmm/src/device_manager.rs"
        if given == "Unknown":
            if self.release >= DEPRECATION_SINCE:
                self.warn(
                    here,
                    "DEPRECATION: auto-detection of disk image type is deprecated and will be removed in a "
                    "future release. Please specify image type explicitly.",
                )
            self.warn(
                here,
                f"No image_type specified - detected as {shown}. Configuration updated to persist type "
                "across reboots and migrations.",
            )
            sector0 = ("Raw", "FixedVhd") if self.release >= DEPRECATION_SINCE else ("Raw",)
            if detected in sector0:
                self.warn(here, f"Autodetected {shown} image type. Disabling sector 0 writes.")
            else:
                self.warn(
                    here,
                    "Non-raw image type detected. In the future it will be necessary to specify image_type "
                    "for non-raw files.",
                )
            disk["image_type"] = detected
        elif given != detected:
            raise ChainError(
                RustError(
                    "DiskImageTypeMismatch",
                    "Disk image type does not match expected type: "
                    f"specified = {IMAGE_TYPES.get(given, given)}, detected = {shown}",
                    debug_form=f"DiskImageTypeMismatch {{ specified: {given}, detected: {detected} }}",
                )
            )


def _flock(lock_type: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK, lock_type, os.SEEK_SET, start, length, 0)


def _granularity(release: int, fd: int) -> tuple[int, int]:
    """virtio-devices/src/block.rs `lock_granularity`: (l_start, l_len); l_len 0 is the whole file."""
    if release < BYTE_RANGE_SINCE:
        return 0, 0
    st = os.fstat(fd)
    return 0, max(st.st_size, st.st_blocks * 512)


def lock_disks(release: int, disks: list[OpenDisk], error: Callable[[str, str], None]) -> None:
    """`DeviceManager::try_lock_disks` at `Vm::boot` (from v46), in disk order; raises ChainError with the
    `vm.rs` `LockingError`. `error` logs as `error!` (the "already a ... lock" line)."""
    if release < LOCK_SINCE:
        return
    for disk in disks:
        kind, lock_type = ("Read", fcntl.F_RDLCK) if disk.readonly else ("Write", fcntl.F_WRLCK)
        start, length = _granularity(release, disk.fd)
        try:
            fcntl.fcntl(disk.fd, fcntl.F_OFD_SETLK, _flock(lock_type, start, length))
            continue
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                cause = RustError("AlreadyLocked", "The file is already locked")
                held = _held(disk.fd, start, length)
                error(
                    "virtio-devices/src/block.rs",
                    f"Can't get {kind} lock for {disk.path} as there is already a {held} lock",
                )
            else:
                cause = RustError("Io", "The lock state could not be checked or set", io_error(exc))
        raise ChainError(
            RustError(
                "LockingError",
                "Error locking disk images: Another instance likely holds a lock",
                RustError(
                    "DiskLockError",
                    "Cannot lock images of all block devices",
                    RustError(
                        "LockDiskImage",
                        f"Failed to get {kind} lock for disk image: {disk.path}",
                        cause,
                        debug_form=f"LockDiskImage {{ error: {cause.debug()}, lock_type: {kind}, "
                        f"path: {rust_str(disk.path)} }}",
                    ),
                ),
            )
        )


def _held(fd: int, start: int, length: int) -> str:
    """`get_lock_state` (F_OFD_GETLK for a write lock): the conflicting lock's kind."""
    with contextlib.suppress(OSError):
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
        (lock_type,) = struct.unpack_from("h", got)
        return {fcntl.F_RDLCK: "SharedRead", fcntl.F_WRLCK: "ExclusiveWrite"}.get(lock_type, "Unlocked")
    return "Unlocked"


def close_disks(disks: list[OpenDisk]) -> None:
    """The VM's block devices are dropped: their images close, and so their OFD locks go."""
    for disk in disks:
        with contextlib.suppress(OSError):
            os.close(disk.fd)
