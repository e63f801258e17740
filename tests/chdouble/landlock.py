"""Landlock in the double, enforced for real with the kernel's landlock syscalls (tests/chdouble/README.md).

After cloud-hypervisor (v41.0-v53.0): `vm.create` with `landlock_enable` makes the VMM thread restrict
itself to the config's own paths and its `landlock_rules` (vmm/src/lib.rs `vm_create`,
vmm/src/vm_config.rs `VmConfig::apply_landlock`, vmm/src/landlock.rs). The double's VMM thread does the
same, so that a path outside the rules really fails to open. Rules are landlock crate `path_beneath_rules`:
a path that cannot be opened is skipped, a non-directory keeps only the file rights.
"""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Any

from tests.chdouble.tap import RustError, io_error, rust_str

LANDLOCK_SINCE = 41  # vmm/src/landlock.rs and VmConfig.landlock_enable first in v41.0
PAYLOAD_REQUIRED_SINCE = (
    44  # cloud-hypervisor main.rs: ArgGroup "vm-config" .requires("vm-payload") from v44.0
)
PTY_RULES_SINCE = 52  # vmm/src/vm_config.rs CommonConsoleConfig: /dev/pts, /dev/ptmx for a Pty from v52.0
VSOCK_PARENT_SINCE = 50  # vmm/src/vm_config.rs VsockConfig: the socket's parent "w" from v50.0
PMEM_DISCARD_SINCE = 47  # vmm/src/vm_config.rs PmemConfig: "r" with discard_writes from v47.0
DEFAULT_RNG = "/dev/urandom"  # vmm/src/vm_config.rs RngConfig::default

# AccessFs bits (include/uapi/linux/landlock.h), the landlock crate's from_read/from_write for ABI::V3
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TRUNCATE = 1 << 14
READ = EXECUTE | READ_FILE | READ_DIR
WRITE = WRITE_FILE | sum(1 << bit for bit in range(4, 15))  # RemoveDir .. Refer, Truncate
HANDLED = READ | WRITE  # AccessFs::from_all(ABI::V3)
ACCESS_FILE = READ_FILE | WRITE_FILE | EXECUTE | TRUNCATE  # the crate's ACCESS_FILE (IoctlDev is not V3)

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def access_bits(text: str) -> int | RustError:
    """vmm/src/landlock.rs `LandlockAccess::try_from`: each `r` and `w` adds its rights; empty or another
    letter is `LandlockError::InvalidLandlockAccess`."""
    if not text:
        return RustError("InvalidLandlockAccess", "Invalid Landlock access: Access cannot be empty")
    bits = 0
    for letter in text:
        if letter not in "rw":
            return RustError("InvalidLandlockAccess", f"Invalid Landlock access: Invalid access: {letter}")
        bits |= READ if letter == "r" else WRITE
    return bits


def config_rules(config: dict[str, Any], release: int) -> list[tuple[str, str]]:
    """`VmConfig::apply_landlock` (vmm/src/vm_config.rs), in its order, for the fields the double reads."""
    rules: list[tuple[str, str]] = []
    for zone in (config.get("memory") or {}).get("zones") or []:
        if zone.get("file"):
            rules.append((zone["file"], "rw"))
    rules += [(d["path"], "rw") for d in config.get("disks") or [] if d.get("path")]
    rules.append(((config.get("rng") or {}).get("src") or DEFAULT_RNG, "r"))
    rules += [(fs["socket"], "rw") for fs in config.get("fs") or [] if fs.get("socket")]
    for pmem in config.get("pmem") or []:
        discard = pmem.get("discard_writes") and release >= PMEM_DISCARD_SINCE
        rules.append((pmem["file"], "r" if discard else "rw"))
    for key in ("console", "serial", "debug_console"):
        device = config.get(key) or {}
        if device.get("mode") == "Pty" and release >= PTY_RULES_SINCE:
            rules += [("/dev/pts", "rw"), ("/dev/ptmx", "rw")]
        rules += [
            (device[k], "rw")
            for k in ("file", "socket")
            if device.get(k) and not (key == "debug_console" and k == "socket")
        ]
    vsock = config.get("vsock") or {}
    if vsock.get("socket"):
        if release >= VSOCK_PARENT_SINCE:
            rules.append((os.path.dirname(vsock["socket"]) or "/", "w"))
        rules.append((vsock["socket"], "rw"))
    payload = config.get("payload") or {}
    rules += [(payload[k], "r") for k in ("firmware", "kernel", "initramfs") if payload.get(k)]
    if config.get("net"):
        rules.append(("/dev/net/tun", "rw"))
    rules += [(r.get("path", ""), r.get("access", "")) for r in config.get("landlock_rules") or []]
    return rules


def restrict(rules: list[tuple[str, str]]) -> RustError | None:
    """`Landlock::new`, `add_rule_with_access` for each rule, `restrict_self` (vmm/src/landlock.rs) on the
    calling thread, which the threads it starts later inherit; an error as `LandlockError`."""
    handled = ctypes.c_uint64(HANDLED)
    ruleset = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(handled), ctypes.sizeof(handled), 0)
    if ruleset < 0:
        return _manage(ctypes.get_errno())
    try:
        for path, access in rules:
            bits = access_bits(access)
            if isinstance(bits, RustError):
                return bits
            try:  # the landlock crate's PathFd: O_PATH; a path it cannot open gives no rule
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    bits &= ACCESS_FILE
                rule = _PathBeneath(bits, fd)
                if _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                    return _manage(ctypes.get_errno())
            finally:
                os.close(fd)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:  # the crate sets no_new_privs first
            return _manage(ctypes.get_errno())
        if _libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            return _manage(ctypes.get_errno())
    finally:
        os.close(ruleset)
    return None


def _manage(errno: int) -> RustError:
    return RustError(
        "ManageRuleset",
        "Error creating/adding/restricting ruleset",
        io_error(OSError(errno, os.strerror(errno))),
    )


def validate_rules(config: dict[str, Any]) -> str | None:
    """`LandlockConfig::validate`, run by `VmConfig::validate` (vmm/src/config.rs, v41.0-v53.0)."""
    for rule in config.get("landlock_rules") or []:
        path = rule.get("path", "")
        if not os.path.exists(path):
            return f"Path {rust_str(path)} provided in landlock-rules does not exist"
        bits = access_bits(rule.get("access", ""))
        if isinstance(bits, RustError):
            return f"Invalid landlock access: {bits.text}"
    return None
