"""Names Procurator derives for host networking: TAP names, MAC addresses and the ownership alias.

All derivations are pure and deterministic: the same (VM, interface) gives the same TAP name and MAC on
every host and after every restart. A TAP name is at most 15 characters (the kernel's IFNAMSIZ minus the
terminating NUL): ``pc-`` + up to three readable characters of the VM name + ``-`` + a base32 hash of
(VM, interface) filling the rest (at least 8 characters, 40 bits). Hash collisions are possible in
principle; they are never silently shared, because every TAP carries its owner in its alias
(``procurator:<vm>:<iface>``) and `ensure_tap` refuses a TAP whose alias names someone else.
"""

from __future__ import annotations

import re

from procurator import limits
from procurator.errors import ValidationError

IFNAMSIZ = limits.IFNAME_MAX  # usable characters of a Linux interface name (the kernel's IFNAMSIZ - 1)
TAP_PREFIX = "pc-"
ALIAS_PREFIX = "procurator"
MAX_ID_LENGTH = 100

_IFNAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{IFNAMSIZ - 1}}}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.@+-]+$")
_READABLE_RE = re.compile(r"[^a-z0-9]")


def check_ifname(name: str, *, source: str = "network", field: str = "ifname") -> str:
    """Return `name` if it is a valid Linux interface name, else raise ValidationError naming `field`."""
    if not _IFNAME_RE.fullmatch(name):
        raise ValidationError(
            source,
            field,
            f"{name!r} is not a valid interface name (1-{IFNAMSIZ} characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit)",
        )
    return name


def check_id(value: str, *, what: str) -> str:
    """Return a VM name or interface id if usable in names and aliases, else raise ValidationError."""
    if not value or len(value) > MAX_ID_LENGTH or not _ID_RE.fullmatch(value):
        raise ValidationError(
            "network",
            what,
            f"{value!r} must be 1-{MAX_ID_LENGTH} characters of letters, digits and '_.@+-'",
        )
    return value


# hashlib (which loads OpenSSL) and base64 are imported where they are used: the worker configuration
# needs this module's checks, and `ps` answered by a worker reads that configuration and derives nothing.
def _blake2b(data: bytes, size: int) -> bytes:
    import hashlib  # noqa: PLC0415 - deferred on purpose, see above

    return hashlib.blake2b(data, digest_size=size).digest()


def _digest(kind: str, vm: str, iface_id: str, size: int) -> bytes:
    return _blake2b("\0".join((kind, vm, iface_id)).encode(), size)


def tap_name(vm: str, iface_id: str) -> str:
    """The TAP name of interface `iface_id` of VM `vm`: deterministic, at most 15 characters.

    >>> tap_name("web", "eth0")
    'pc-web-mp7ozqgo'
    """
    check_id(vm, what="vm")
    check_id(iface_id, what="interface")
    readable = _READABLE_RE.sub("", vm.lower())[:3]
    head = f"{TAP_PREFIX}{readable}-" if readable else TAP_PREFIX
    room = IFNAMSIZ - len(head)
    import base64  # noqa: PLC0415 - deferred on purpose, see _blake2b

    encoded = base64.b32encode(_digest("tap", vm, iface_id, 10)).decode().lower()
    return head + encoded[:room]


def mac_address(vm: str, iface_id: str) -> str:
    """The guest MAC of interface `iface_id` of VM `vm`: locally administered, unicast, hash-derived."""
    check_id(vm, what="vm")
    check_id(iface_id, what="interface")
    raw = bytearray(_digest("mac", vm, iface_id, 6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # clear multicast bit, set locally-administered bit
    return ":".join(f"{b:02x}" for b in raw)


def bridge_mac(bridge: str) -> str:
    """A fixed MAC for the bridge, so it does not change as ports come and go (ARP caches stay valid)."""
    raw = bytearray(_blake2b(f"bridge\0{bridge}".encode(), 6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def tap_alias(vm: str, iface_id: str) -> str:
    """The alias (ifalias) recorded on a TAP: the kernel keeps the owner for us, across our crashes."""
    return f"{ALIAS_PREFIX}:{check_id(vm, what='vm')}:{check_id(iface_id, what='interface')}"


def parse_tap_alias(alias: str | None) -> tuple[str, str] | None:
    """(vm, iface) from a Procurator TAP alias, None for any other alias (or none)."""
    if not alias:
        return None
    parts = alias.split(":")
    if len(parts) != 3 or parts[0] != ALIAS_PREFIX:
        return None
    vm, iface = parts[1], parts[2]
    if not (_ID_RE.fullmatch(vm) and _ID_RE.fullmatch(iface)):
        return None
    return vm, iface
