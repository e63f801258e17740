"""What cloud-hypervisor does to a net entry's TAP when vm.boot creates its virtio-net device, done for real
with the double's own credentials, so the kernel decides every outcome as it does for the real binary.

Sources (read at v40.0 to v53.0): `net_util/src/open_tap.rs` (`open_tap`, `check_mq_support`,
`open_tap_rx_q_0`), `net_util/src/tap.rs` (`Tap::open_named`, `set_ip_addr`, `set_mac_addr`,
`get_mac_addr`, `set_mtu`, `enable`, `set_vnet_hdr_size`, the `Error` enum), `net_util/src/lib.rs`
(`create_unix_socket`, `create_inet_socket`, `vnet_hdr_len`), `virtio-devices/src/net.rs` (`Net::new`:
`open_tap(..., num_queues / 2, None)`, `Error::OpenTap`), `vmm/src/device_manager.rs`
(`make_virtio_net_device`, `DeviceManagerError::CreateVirtioNet`), `vmm/src/vm.rs` (`Error::DeviceManager`),
`vmm/src/vm_config.rs` (`NetConfig` defaults).

Errors are `RustError` chains: each level's Display text (what the API answers, top to root) and its
Debug form (what the fatal-error log line shows).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# <linux/if_tun.h>, <linux/sockios.h>, <linux/if.h> (x86_64)
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETVNETHDRSZ = 0x400454D8
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq: 16 bytes of name, a 24-byte union
VNET_HDR_LEN = 12  # net_util/src/lib.rs vnet_hdr_len(): size_of::<virtio_net_hdr_v1>()
DEFAULT_NET_NUM_QUEUES = 2  # vmm/src/vm_config.rs (v40.0-v53.0)

IOCTL_TEXT_SINCE = 53  # tap.rs IoctlError: "Ioctl failed ({0})" from v53, "ioctl ({0}) failed: {1}" before
NUL_CHECK_SINCE = 52  # tap.rs IfnameContainsNUL (CString::new) first in v52
I32_FLAGS_SINCE = 52  # open_tap.rs check_mq_support parses tun_flags as i32 from v52, as u32 before
DEFAULT_IP_UNTIL = (
    48  # vm_config.rs NetConfig: ip/mask default to 192.168.249.1/24 up to v48; Option from v49
)
DEFAULT_IP = "192.168.249.1"
DEFAULT_MASK = "255.255.255.0"

# std's decode_error_kind (library/std/src/sys/pal/unix/mod.rs), for the Debug form of an io::Error
_KINDS = {
    errno.EPERM: "PermissionDenied", errno.EACCES: "PermissionDenied", errno.ENOENT: "NotFound",
    errno.EINTR: "Interrupted", errno.E2BIG: "ArgumentListTooLong", errno.EAGAIN: "WouldBlock",
    errno.ENOMEM: "OutOfMemory", errno.EBUSY: "ResourceBusy", errno.EEXIST: "AlreadyExists",
    errno.ENOTDIR: "NotADirectory", errno.EISDIR: "IsADirectory", errno.EINVAL: "InvalidInput",
    errno.ENOSPC: "StorageFull", errno.EROFS: "ReadOnlyFilesystem", errno.EPIPE: "BrokenPipe",
    errno.ENAMETOOLONG: "InvalidFilename", errno.ENOSYS: "Unsupported", errno.EADDRINUSE: "AddrInUse",
    errno.EADDRNOTAVAIL: "AddrNotAvailable", errno.ENETDOWN: "NetworkDown",
}  # fmt: skip


@dataclass(frozen=True)
class RustError:
    """One level of a Rust error chain (thiserror): `text` is its Display, `source` the next level."""

    variant: str
    text: str
    source: RustError | None = None
    fields: tuple[str, ...] = ()  # the Debug form of fields other than the source
    debug_form: str | None = None  # a leaf whose Debug is not `Variant(fields)`

    def chain(self) -> list[str]:
        out: list[str] = []
        level: RustError | None = self
        while level is not None:
            out.append(level.text)
            level = level.source
        return out

    def debug(self) -> str:
        if self.debug_form is not None:
            return self.debug_form
        inner = [*self.fields, *([self.source.debug()] if self.source is not None else [])]
        return f"{self.variant}({', '.join(inner)})" if inner else self.variant


class ChainError(Exception):
    def __init__(self, error: RustError) -> None:
        super().__init__(error.text)
        self.error = error


def io_error(exc: OSError) -> RustError:
    """std::io::Error::last_os_error(): Display `<strerror> (os error N)`, Debug `Os { code, kind, .. }`."""
    code = exc.errno or 0
    message = os.strerror(code)
    kind = _KINDS.get(code, "Uncategorized")
    return RustError(
        "Os",
        f"{message} (os error {code})",
        debug_form=f"Os {{ code: {code}, kind: {kind}, message: {rust_str(message)} }}",
    )


def rust_str(value: str) -> str:
    """Rust's Debug for a str."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
    return '"' + "".join(escapes.get(c, c) for c in value) + '"'


def boot_chain(net: RustError) -> RustError:
    """vmm/src/vm.rs Error::DeviceManager <- device_manager.rs CreateVirtioNet <- net.rs Error::OpenTap."""
    return RustError(
        "DeviceManager",
        "Error from device manager",
        RustError(
            "CreateVirtioNet",
            "Cannot create virtio-net device",
            RustError("OpenTap", "Failed to open taps", net),
        ),
    )


def _ifreq(name: bytes, union: bytes = b"") -> bytearray:
    return bytearray(struct.pack(f"{IFNAMSIZ}s{IFREQ_SIZE - IFNAMSIZ}s", name, union))


@dataclass
class TapOpener:
    """`net_util::open_tap` for one release; `warn` and `info` log as cloud-hypervisor's `warn!`/`info!`."""

    release: int
    warn: Callable[[str, str], None]

    # --- net_util/src/open_tap.rs ---------------------------------------------------------------

    def open_tap(self, net: dict[str, Any]) -> list[int]:
        """The descriptors of one net entry's TAP queues (virtio-devices/src/net.rs `Net::new`), all
        closed again if any step fails (the `Tap`s are dropped)."""
        name = str(net["tap"])
        pairs = int(net.get("num_queues", DEFAULT_NET_NUM_QUEUES)) // 2
        ip = net.get("ip")
        mask = net.get("mask")
        if self.release <= DEFAULT_IP_UNTIL:  # non-optional fields with serde defaults
            ip = ip or DEFAULT_IP
            mask = mask or DEFAULT_MASK
        self._check_mq_support(name, pairs)
        fds: list[int] = []
        try:
            for i in range(pairs):
                if i == 0:
                    fd, name = self._open_tap_rx_q_0(
                        name, pairs, ip=ip, mask=mask, host_mac=net.get("host_mac"), mtu=net.get("mtu")
                    )
                    fds.append(fd)
                else:
                    fds.append(
                        self._step(
                            "TapOpen",
                            "Open tap device failed",
                            functools.partial(self._open_named, name, pairs),
                        )[0]
                    )
                    self._step(
                        "TapSetVnetHdrSize",
                        "Setting vnet header size failed",
                        lambda: self._set_vnet_hdr_size(fds[-1]),
                    )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    @staticmethod
    def _step(variant: str, text: str, action: Callable[[], Any]) -> Any:
        """Run a `Tap` call whose TapError open_tap.rs wraps as `variant` (`map_err(Error::<variant>)`)."""
        try:
            return action()
        except ChainError as exc:
            raise ChainError(RustError(variant, text, exc.error)) from None

    def _check_mq_support(self, name: str, pairs: int) -> None:
        mq = pairs > 1
        path = f"/sys/class/net/{name}/tun_flags"
        if not os.path.exists(path):  # "interface does not exist, check is not required"
            return
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise ChainError(
                RustError("ReadSysfsTunFlags", "Failed to read the TAP flags from sysfs", io_error(exc))
            ) from None
        flags = self._from_str_radix(text.strip().removeprefix("0x"))
        if flags & IFF_MULTI_QUEUE and not mq:
            raise ChainError(
                RustError(
                    "MultiQueueNoDeviceSupport",
                    "Error related to the multiqueue support (no support device side)",
                )
            )
        if not flags & IFF_MULTI_QUEUE and mq:
            raise ChainError(
                RustError(
                    "MultiQueueNoTapSupport", "Error related to the multiqueue support (no support TAP side)"
                )
            )

    def _from_str_radix(self, digits: str) -> int:
        """`i32::from_str_radix(s, 16)` (v52+; `u32` before), with ParseIntError's texts."""
        limit = 0x7FFFFFFF if self.release >= I32_FLAGS_SINCE else 0xFFFFFFFF
        body = digits[1:] if digits[:1] in ("+", "-") and len(digits) > 1 else digits
        if not digits:
            kind, text = "Empty", "cannot parse integer from empty string"
        elif not all(c in "0123456789abcdefABCDEF" for c in body):
            kind, text = "InvalidDigit", "invalid digit found in string"
        elif int(digits, 16) > limit:
            kind, text = "PosOverflow", "number too large to fit in target type"
        else:
            return int(digits, 16)
        cause = RustError("ParseIntError", text, debug_form=f"ParseIntError {{ kind: {kind} }}")
        raise ChainError(
            RustError(
                "ConvertHexStringToInt", "Failed to convert an hexadecimal string into an integer", cause
            )
        )

    def _open_tap_rx_q_0(
        self,
        name: str,
        pairs: int,
        *,
        ip: str | None,
        mask: str | None,
        host_mac: str | None,
        mtu: int | None,
    ) -> tuple[int, str]:
        exists = os.path.exists(f"/sys/class/net/{name}")  # checked before the TAP is (maybe) created
        fd, name = self._step("TapOpen", "Open tap device failed", lambda: self._open_named(name, pairs))
        try:
            if exists:
                self.warn(
                    "net_util/src/open_tap.rs:84",
                    f"Tap {name} already exists. IP configuration will not be overwritten.",
                )
            elif ip is not None:
                text = "Setting tap IP and/or netmask failed"
                self._step("TapSetIpNetmask", text, lambda: self._set_ip_addr(name, ip, mask))
            if host_mac is not None:
                self._step(
                    "TapSetMac", "Setting MAC address failed", lambda: self._set_mac_addr(name, host_mac)
                )
            else:
                self._step("TapGetMac", "Getting MAC address failed", lambda: self._get_mac_addr(name))
            if mtu is not None:
                self._step("TapSetMtu", "Setting MTU failed", lambda: self._set_mtu(name, int(mtu)))
            self._step("TapEnable", "Enabling tap interface failed", lambda: self._enable(name))
            self._step(
                "TapSetVnetHdrSize", "Setting vnet header size failed", lambda: self._set_vnet_hdr_size(fd)
            )
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    # --- net_util/src/tap.rs --------------------------------------------------------------------

    def _ioctl_error(self, request: int, exc: OSError) -> ChainError:
        io = io_error(exc)
        text = (
            f"Ioctl failed ({request})"
            if self.release >= IOCTL_TEXT_SINCE
            else f"ioctl ({request}) failed: {io.text}"
        )
        return ChainError(RustError("IoctlError", text, io, fields=(str(request),)))

    def _ioctl(self, fd: int, request: int, buffer: bytearray) -> bytearray:
        try:
            fcntl.ioctl(fd, request, buffer, True)
        except OSError as exc:
            raise self._ioctl_error(request, exc) from None
        return buffer

    def _open_named(self, name: str, pairs: int) -> tuple[int, str]:
        """`Tap::open_named`: the descriptor, and the name the kernel answered in `ifr_name`."""
        raw = name.encode()
        if len(raw) > IFNAMSIZ - 1:
            raise ChainError(
                RustError(
                    "IfnameTooLong",
                    f"Interface name too long (max length is {IFNAMSIZ - 1}): {name}",
                    fields=(rust_str(name),),
                )
            )
        if "\0" in name and self.release >= NUL_CHECK_SINCE:
            raise ChainError(
                RustError(
                    "IfnameContainsNUL",
                    f"Interface name contains interior NUL byte: {rust_str(name)}",
                    fields=(rust_str(name),),
                )
            )
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ChainError(RustError("OpenTun", "Couldn't open /dev/net/tun", io_error(exc))) from None
        try:
            ifreq = self._set_iff(fd, raw, pairs)
        except BaseException:
            os.close(fd)  # the `File` is dropped
            raise
        return fd, bytes(ifreq[:IFNAMSIZ]).split(b"\0", 1)[0].decode(errors="replace")

    @staticmethod
    def _set_iff(fd: int, raw_name: bytes, pairs: int) -> bytearray:
        """TUNGETFEATURES, the kernel's multi-queue support, then TUNSETIFF; the ifreq the kernel answered."""
        features = bytearray(4)
        try:
            fcntl.ioctl(fd, TUNGETFEATURES, features, True)
        except OSError as exc:
            raise ChainError(RustError("GetFeatures", "Unable to retrieve features", io_error(exc))) from None
        if not struct.unpack("I", features)[0] & IFF_MULTI_QUEUE and pairs > 1:
            raise ChainError(RustError("MultiQueueKernelSupport", "Missing multiqueue support in the kernel"))
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
        ifreq = _ifreq(raw_name, struct.pack("H", flags))
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifreq, True)
        except OSError as exc:
            raise ChainError(
                RustError("ConfigureTap", "Unable to configure tap interface", io_error(exc))
            ) from None
        return ifreq

    def _socket(self, family: int) -> socket.socket:
        try:
            return socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            created = RustError("CreateSocket", "Failed to create a socket", io_error(exc))
            raise ChainError(RustError("NetUtil", "Failed to create a socket", created)) from None

    def _set_ip_addr(self, name: str, ip: str, mask: str | None) -> None:
        address = ipaddress.ip_address(ip)
        if address.version != 4:
            raise ChainError(RustError("Chdouble", f"chdouble: IPv6 TAP address {ip} is not simulated"))
        with self._socket(socket.AF_INET) as sock:
            sockaddr = struct.pack("HH4s8x", socket.AF_INET, 0, address.packed)
            self._ioctl(sock.fileno(), SIOCSIFADDR, _ifreq(name.encode(), sockaddr))
            if mask is not None and ipaddress.ip_address(mask).version == 4:
                netmask = struct.pack("HH4s8x", socket.AF_INET, 0, ipaddress.ip_address(mask).packed)
                self._ioctl(sock.fileno(), SIOCSIFNETMASK, _ifreq(name.encode(), netmask))

    def _get_mac_addr(self, name: str) -> bytes:
        with self._socket(socket.AF_UNIX) as sock:
            ifreq = self._ioctl(sock.fileno(), SIOCGIFHWADDR, _ifreq(name.encode()))
        return bytes(ifreq[IFNAMSIZ + 2 : IFNAMSIZ + 8])  # sockaddr.sa_data[0..6]

    def _set_mac_addr(self, name: str, mac: str) -> None:
        wanted = bytes.fromhex(mac.replace(":", ""))
        if self._get_mac_addr(name) == wanted:  # a VMM without the privilege still boots
            return
        with self._socket(socket.AF_UNIX) as sock:
            ifreq = self._ioctl(sock.fileno(), SIOCGIFHWADDR, _ifreq(name.encode()))
            ifreq[IFNAMSIZ + 2 : IFNAMSIZ + 8] = wanted
            self._ioctl(sock.fileno(), SIOCSIFHWADDR, ifreq)

    def _set_mtu(self, name: str, mtu: int) -> None:
        with self._socket(socket.AF_UNIX) as sock:
            self._ioctl(sock.fileno(), SIOCSIFMTU, _ifreq(name.encode(), struct.pack("i", mtu)))

    def _enable(self, name: str) -> None:
        with self._socket(socket.AF_UNIX) as sock:
            ifreq = self._ioctl(sock.fileno(), SIOCGIFFLAGS, _ifreq(name.encode()))
            (flags,) = struct.unpack_from("h", ifreq, IFNAMSIZ)
            if flags & IFF_UP == IFF_UP:  # "If TAP device is already up don't try and enable it"
                return
            self._ioctl(sock.fileno(), SIOCSIFFLAGS, _ifreq(name.encode(), struct.pack("h", IFF_UP)))

    def _set_vnet_hdr_size(self, fd: int) -> None:
        self._ioctl(fd, TUNSETVNETHDRSZ, bytearray(struct.pack("i", VNET_HDR_LEN)))


TUNGETIFF = 0x800454D2


def from_tap_fds(release: int, fds: list[int]) -> list[int]:
    """virtio-devices/src/net.rs `Net::from_tap_fds` (v40.0, v53.0): each descriptor vm.add-net was sent
    is dup()ed ("so that it can survive reboots") and made a `Tap` by net_util/src/tap.rs
    `Tap::from_tap_fd`: O_NONBLOCK, TUNGETIFF (the descriptor must be an attached TAP), TUNSETIFF with
    IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (| IFF_MULTI_QUEUE for more than one pair; EEXIST, an attached
    descriptor's answer, is ignored), then the vnet header size. The descriptors are the double's own
    duplicates; all closed again if one fails. Errors as `boot_chain` builds them, with `TapError` or
    `DuplicateTapFd` in place of `OpenTap`."""
    opener = TapOpener(release, lambda _where, _text: None)
    pairs = len(fds)
    made: list[int] = []

    def fail(net: RustError) -> ChainError:
        for fd in made:
            os.close(fd)
        chain = RustError(
            "DeviceManager",
            "Error from device manager",
            RustError("CreateVirtioNet", "Cannot create virtio-net device", net),
        )
        return ChainError(chain)

    for fd in fds:
        try:
            copy = os.dup(fd)
        except OSError as exc:
            raise fail(RustError("DuplicateTapFd", "Error calling dup() on tap fd", io_error(exc))) from None
        made.append(copy)
        try:
            flags = fcntl.fcntl(copy, fcntl.F_GETFL)
            fcntl.fcntl(copy, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError as exc:
            tap = RustError("ConfigureTap", "Unable to configure tap interface", io_error(exc))
            raise fail(RustError("TapError", "Using existing tap", tap)) from None
        try:
            ifreq = opener._ioctl(copy, TUNGETIFF, _ifreq(b""))
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
            request = _ifreq(bytes(ifreq[:IFNAMSIZ]), struct.pack("H", flags))
            try:
                fcntl.ioctl(copy, TUNSETIFF, request, True)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    tap = RustError("ConfigureTap", "Unable to configure tap interface", io_error(exc))
                    raise ChainError(tap) from None
            opener._set_vnet_hdr_size(copy)
        except ChainError as exc:
            raise fail(RustError("TapError", "Using existing tap", exc.error)) from None
    return made
