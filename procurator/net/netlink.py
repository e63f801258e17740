"""The one place Procurator talks to the kernel's network stack: pyroute2 (netlink), the TUN ioctls and
the per-namespace sysctls.

Everything pyroute2 returns is untyped; this module converts it into the small frozen dataclasses below
at once, so no `Any` leaves it, and translates every netlink/OS error into `NetworkError` naming the
interface and the operation.

Namespaces: creating a socket, opening ``/dev/net/tun`` and opening ``/proc/sys/net/...`` all act in the
network namespace of the *calling thread*. For a named namespace those three things (the rtnetlink
socket handed to pyroute2, the TAP ioctls, the sysctls) run on one shared worker thread that enters the
namespace with setns for the call (setns changes only that thread) and leaves it afterwards. Netlink
requests on the socket run on the caller's thread. No fork per session or per TAP.

TAPs are created crash-safe: the device is made non-persistent (it lives only while our file descriptor
is open), configured (owner, alias, bridge, up), and only then marked persistent. A crash at any step
before that closes the descriptor and the kernel removes the half-made TAP itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib
import importlib.util
import logging
import os
import secrets
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from procurator.errors import NetworkError, WaitTimeoutError


def _register_pyroute2_lazily() -> None:
    """Register the pyroute2 package without running its __init__, which imports every module pyroute2
    has (IPDB, NDB, conntrack, plan9, IPVS, WireGuard, ...: 370 modules, some 40 ms and 6 MB of a
    worker; svinota/pyroute2#1404). The submodules below then load alone, from the package's own
    directory (module_from_spec keeps its __path__); `from pyroute2 import config`, which they do, gets
    the submodule. The real __init__ runs in the registered module on the first other attribute asked of
    it (PEP 562 __getattr__), so any other `from pyroute2 import X` in the process still gets X."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not the package layout this expects: the plain import below reports what is wrong
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    running: list[bool] = []

    def whole(name: str) -> Any:
        if running:  # asked while __init__ runs: it has not defined `name` yet
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r} (yet)")
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:  # `from pyroute2 import config`
            return importlib.import_module(f"pyroute2.{name}")
        running.append(True)
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = whole
    sys.modules["pyroute2"] = package


_register_pyroute2_lazily()

from pyroute2.iproute.linux import IPRoute  # noqa: E402 - after the registration above
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.rtnl import RTM_NEWLINK  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netns import setns  # noqa: E402

# setns's libc: pyroute2 finds its own with ctypes.util.find_library, which runs `ldconfig -p` (a fork
# of this process and some 25 ms) on the first namespace entered.
_LIBC = ctypes.CDLL(None, use_errno=True)

log = logging.getLogger(__name__)

T = TypeVar("T")

NETNS_RUN_DIR = Path("/run/netns")
TUN_DEVICE = "/dev/net/tun"
WORKER_TIMEOUT = 10.0  # seconds a single call on the namespace thread may take

# <linux/if_tun.h>, asm-generic ioctl layout (x86_64, aarch64, riscv64, s390x, loongarch64)
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFF_NO_PI = 0x1000
IFF_TUN_EXCL = 0x8000  # fail with EBUSY if a device of that name exists: create, never adopt
IFF_UP = 0x1
IFF_TUN_TYPE_TAP = 2  # IFLA_TUN_TYPE value of a TAP
RT_TABLE_MAIN = 254
NUD_PERMANENT = 0x80  # <linux/neighbour.h>

# A step hook, called with a step name between the steps of TAP creation. Only tests set it (to kill the
# process at a precise point and show the kernel cleans up); it is None in production.
STEP_HOOK: Callable[[str], None] | None = None


@dataclass(frozen=True)
class TunDetails:
    """What the kernel reports about a tun/tap device (IFLA_INFO_DATA of kind "tun")."""

    tap: bool
    owner: int | None
    multi_queue: bool
    persist: bool
    queues: int  # queues attached (reported for multi-queue TAPs only)
    attached: bool = False  # a process has the TAP open (a TAP has carrier exactly while attached)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None  # "bridge", "tun", "veth", ... (None for a plain device such as lo)
    master: int | None
    up: bool  # administratively up (IFF_UP)
    operstate: str
    alias: str | None
    mac: str | None
    group: int
    tun: TunDetails | None = None
    isolated: bool | None = None  # bridge port flag, None when not a bridge port


@dataclass(frozen=True)
class Address:
    index: int
    address: IPv4Address
    prefixlen: int

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(f"{self.address}/{self.prefixlen}", strict=False)


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    oif: int | None
    table: int


@dataclass(frozen=True)
class Neighbour:
    """One IPv4 entry of a device's neighbour (ARP) table."""

    index: int
    ip: IPv4Address
    mac: str | None
    permanent: bool


# Attribute numbers of <linux/if_link.h> read by `_decode_link`.
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_IFALIAS = 1, 3, 10, 16, 18, 20
IFLA_GROUP, IFLA_CARRIER = 27, 33
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_TUN_OWNER, IFLA_TUN_TYPE, IFLA_TUN_PERSIST, IFLA_TUN_MULTI_QUEUE, IFLA_TUN_NUM_QUEUES = 1, 3, 6, 7, 8
IFLA_BRPORT_ISOLATED = 33
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")
_NLA_HEADER = struct.Struct("HH")
_U32 = struct.Struct("I")
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


class _RawLinkMsg(ifinfmsg):  # type: ignore[misc]  # pyroute2 is untyped
    """A link message whose attributes pyroute2 leaves undecoded.

    pyroute2 decodes every one of a link's ~40 attributes (some large, nested) into Python objects, about
    a millisecond per link; a dump of hundreds of TAPs took most of a second. This class keeps pyroute2 as
    the transport (request, sequence numbers, errors) and lets `_decode_link` read only what we use.
    """

    nla_start = 0

    def decode_nlas(self, offset: int) -> None:
        self.nla_start = offset


def _nlas(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) for the NLA chain in data[start:end]."""
    out: dict[int, tuple[int, int]] = {}
    offset = start
    while offset + 4 <= end:
        length, kind = _NLA_HEADER.unpack_from(data, offset)
        if length < 4:
            break
        out.setdefault(kind & NLA_TYPE_MASK, (offset + 4, min(offset + length, end)))
        offset += (length + 3) & ~3
    return out


def _text(data: bytes, span: tuple[int, int] | None) -> str | None:
    if span is None:
        return None
    return data[span[0] : span[1]].split(b"\0", 1)[0].decode(errors="replace")


def _u32(data: bytes, span: tuple[int, int] | None) -> int | None:
    return None if span is None or span[1] - span[0] < 4 else int(_U32.unpack_from(data, span[0])[0])


def _u8(data: bytes, span: tuple[int, int] | None) -> int | None:
    return None if span is None or span[1] <= span[0] else data[span[0]]


def _nested(data: bytes, span: tuple[int, int] | None) -> dict[int, tuple[int, int]]:
    return {} if span is None else _nlas(data, span[0], span[1])


def _decode_link(msg: Any) -> Link:
    data: bytes = msg.data
    top = _nlas(data, int(msg.nla_start), int(msg.offset) + int(msg.length))
    info = _nested(data, top.get(IFLA_LINKINFO))
    kind = _text(data, info.get(IFLA_INFO_KIND))
    tun = None
    if kind == "tun":
        tdata = _nested(data, info.get(IFLA_INFO_DATA))
        owner = _u32(data, tdata.get(IFLA_TUN_OWNER))
        tun = TunDetails(
            tap=_u8(data, tdata.get(IFLA_TUN_TYPE)) == IFF_TUN_TYPE_TAP,
            owner=None if owner is None or owner == 0xFFFFFFFF else owner,
            multi_queue=bool(_u8(data, tdata.get(IFLA_TUN_MULTI_QUEUE))),
            persist=bool(_u8(data, tdata.get(IFLA_TUN_PERSIST))),
            queues=_u32(data, tdata.get(IFLA_TUN_NUM_QUEUES)) or 0,
            attached=bool(_u8(data, top.get(IFLA_CARRIER)))
            or bool(_u32(data, tdata.get(IFLA_TUN_NUM_QUEUES))),
        )
    isolated = None
    if _text(data, info.get(IFLA_INFO_SLAVE_KIND)) == "bridge":
        port = _nested(data, info.get(IFLA_INFO_SLAVE_DATA))
        isolated = bool(_u8(data, port.get(IFLA_BRPORT_ISOLATED)))
    mac_span = top.get(IFLA_ADDRESS)
    mac = ":".join(f"{b:02x}" for b in data[mac_span[0] : mac_span[1]]) if mac_span else None
    operstate = _u8(data, top.get(IFLA_OPERSTATE)) or 0
    return Link(
        index=int(msg["index"]),
        name=_text(data, top.get(IFLA_IFNAME)) or "",
        kind=kind,
        master=_u32(data, top.get(IFLA_MASTER)) or None,
        up=bool(int(msg["flags"]) & IFF_UP),
        operstate=OPERSTATES[operstate] if operstate < len(OPERSTATES) else "UNKNOWN",
        alias=_text(data, top.get(IFLA_IFALIAS)) or None,
        mac=mac or None,
        group=_u32(data, top.get(IFLA_GROUP)) or 0,
        tun=tun,
        isolated=isolated,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        code = int(exc.code)
        return f"{os.strerror(code)} (errno {code})" if code > 0 else str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return int(exc.code)
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _netlink_socket_fd() -> int:
    """A new rtnetlink socket in the calling thread's namespace, as a bare descriptor."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE).detach()


class _CannotEnterError(Exception):
    """setns into (or back out of) a namespace failed on the worker thread; translated by `run`."""


class _NetnsRunner:
    """One worker thread, shared by all sessions, that runs calls inside named network namespaces.

    For each call it enters the target namespace with setns (which affects only that thread), runs the
    call and goes back to the namespace it started in, so between calls it holds no namespace alive
    (a deleted namespace really goes away). Creating a thread per session cost more than the work.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0
        self._home = -1

    def _init_thread(self) -> None:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _executor_now(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():  # a forked child has no worker thread
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="procurator-netns", initializer=self._init_thread
                )
                self._pid = os.getpid()
            return self._executor

    def _discard(self, executor: ThreadPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False)

    def run(self, netns: str, fn: Callable[[], T], where: str) -> T:
        executor = self._executor_now()

        def call() -> T:
            try:
                setns(netns, flags=0, libc=_LIBC)
            except OSError as exc:
                raise _CannotEnterError(str(exc)) from exc
            try:
                return fn()
            finally:
                try:
                    setns(self._home, libc=_LIBC)
                except OSError as exc:  # never leave the shared thread inside a namespace
                    raise _CannotEnterError(f"cannot return from it: {exc}") from exc

        try:
            return executor.submit(call).result(timeout=WORKER_TIMEOUT)
        except BrokenExecutor as exc:
            self._discard(executor)
            raise NetworkError(f"the namespace worker thread broke while working in {where}") from exc
        except FutureTimeout as exc:
            self._discard(executor)
            raise WaitTimeoutError(f"a kernel call in {where}", WORKER_TIMEOUT) from exc
        except _CannotEnterError as exc:
            self._discard(executor)
            raise NetworkError(f"cannot enter {where} ({exc}); does it still exist?") from exc


_RUNNER = _NetnsRunner()


class PendingTap:
    """A TAP that exists only while this object's file descriptor is open (not yet persistent).

    `commit()` makes it persistent; leaving the `with` block without committing closes the descriptor and
    the kernel deletes the device. A crash in between has the same effect.
    """

    def __init__(self, fd: int, name: str, index: int) -> None:
        self._fd = fd
        self.name = name
        self.index = index
        self.committed = False

    def commit(self) -> None:
        try:
            fcntl.ioctl(self._fd, TUNSETPERSIST, 1)
        except OSError as exc:
            raise NetworkError(f"TAP {self.name}: cannot make it persistent: {_describe(exc)}") from exc
        self.committed = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PendingTap:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class Netlink:
    """A netlink session in one network namespace (None: the caller's own). Use as a context manager."""

    netns: str | None = None
    _ipr: Any = field(default=None, init=False, repr=False)

    # -- session -------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        where = self.where
        if self.netns is not None and not (NETNS_RUN_DIR / self.netns).exists():
            raise NetworkError(
                f"network namespace {self.netns!r} does not exist ({NETNS_RUN_DIR / self.netns}); "
                f"create it (ip netns add {self.netns}) or fix network.netns in the worker config"
            )
        try:
            if self.netns is None:
                self._ipr = IPRoute(groups=0)
            else:
                # A netlink socket belongs to the namespace it is created in: make it on our namespace
                # thread and hand pyroute2 the descriptor (cheaper than pyroute2's fork-per-socket).
                fd = self.in_netns(_netlink_socket_fd)
                self._ipr = IPRoute(fileno=fd, groups=0)
        except (OSError, NetlinkError) as exc:
            self.close()
            raise NetworkError(f"cannot open a netlink socket in {where}: {_describe(exc)}") from exc
        self._ipr.asyncore.marshal.msg_map[RTM_NEWLINK] = _RawLinkMsg

    @property
    def where(self) -> str:
        return "the host namespace" if self.netns is None else f"network namespace {self.netns!r}"

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def in_netns(self, fn: Callable[[], T]) -> T:
        """Run `fn` in this session's namespace (on the shared namespace thread for a named one)."""
        if self.netns is None:
            return fn()
        return _RUNNER.run(self.netns, fn, self.where)

    def _call(self, what: str, fn: Callable[[], T], *, ok: tuple[int, ...] = ()) -> T | None:
        """Run a pyroute2 request; errors in `ok` give None, others a NetworkError about `what`."""
        try:
            return fn()
        except (NetlinkError, OSError) as exc:
            if _errno(exc) in ok:
                return None
            raise NetworkError(f"{what} in {self.where}: {_describe(exc)}") from exc

    # -- links ---------------------------------------------------------------------------------------

    def links(self) -> list[Link]:
        msgs = self._call("listing interfaces", lambda: list(self._ipr.link("dump")))
        return [_decode_link(m) for m in msgs or []]

    def link(self, name: str) -> Link | None:
        msgs = self._call(
            f"looking up interface {name}",
            lambda: list(self._ipr.link("get", ifname=name)),
            ok=(errno.ENODEV,),
        )
        return _decode_link(msgs[0]) if msgs else None

    def link_by_index(self, index: int) -> Link | None:
        msgs = self._call(
            f"looking up interface #{index}",
            lambda: list(self._ipr.link("get", index=index)),
            ok=(errno.ENODEV,),
        )
        return _decode_link(msgs[0]) if msgs else None

    def add_bridge(self, name: str, mac: str) -> None:
        self._call(
            f"creating bridge {name}",
            lambda: self._ipr.link("add", ifname=name, kind="bridge", address=mac),
        )

    def set_link(
        self,
        index: int,
        *,
        what: str,
        master: int | None = None,
        up: bool | None = None,
        alias: str | None = None,
        group: int | None = None,
    ) -> None:
        spec: dict[str, Any] = {}
        if master is not None:
            spec["master"] = master
        if up is not None:
            spec["state"] = "up" if up else "down"
        if alias is not None:
            spec["ifalias"] = alias
        if group is not None:
            spec["group"] = group
        if spec:
            self._call(what, lambda: self._ipr.link("set", index=index, **spec))

    def set_isolated(self, index: int, isolated: bool, *, what: str) -> None:
        self._call(what, lambda: self._ipr.brport("set", index=index, isolated=int(isolated)))

    def delete_link(self, index: int, *, what: str) -> bool:
        """Delete one link; False if it was already gone."""
        done = self._call(what, lambda: self._ipr.link("del", index=index) or True, ok=(errno.ENODEV,))
        return done is not None

    def delete_links(self, indexes: list[int], *, what: str) -> None:
        """Delete several links in one kernel transaction when there is more than one.

        Deleting a device waits for an RCU grace period (~20 ms); one request deleting a whole device group
        pays it once. The group is a fresh random number that no link in the namespace uses (checked),
        given to exactly our links, and deleted at once. Links that vanish meanwhile are fine.
        """
        if len(indexes) <= 1:
            for index in indexes:
                self.delete_link(index, what=what)
            return
        in_use = {link.group for link in self.links()}
        group = 0
        while group == 0 or group in in_use:
            group = (1 << 24) + secrets.randbelow((1 << 31) - (1 << 24))
        marked = 0
        for index in indexes:
            marked += self._mark(index, group, what=what)
        if marked:
            gone = self._call(what, lambda: self._ipr.link("del", group=group) or True, ok=(errno.ENODEV,))
            if gone is None:
                log.debug("group %d had no links left to delete", group)

    def _mark(self, index: int, group: int, *, what: str) -> bool:
        done = self._call(
            what, lambda: self._ipr.link("set", index=index, group=group) or True, ok=(errno.ENODEV,)
        )
        return done is not None

    # -- TAPs ----------------------------------------------------------------------------------------

    def create_tap(self, name: str, owner_uid: int, multi_queue: bool) -> PendingTap | None:
        """Create a non-persistent TAP `name` owned by `owner_uid`; None if any interface has that name.

        Create-or-fail is one ioctl (IFF_TUN_EXCL), so there is no window between looking and creating.
        """
        flags = IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | (IFF_MULTI_QUEUE if multi_queue else 0)
        request = struct.pack("16sH", name.encode(), flags)

        def make() -> tuple[int, int] | None:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, request)
                fcntl.ioctl(fd, TUNSETOWNER, owner_uid)
                return fd, socket.if_nametoindex(name)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    return None
                raise
            except BaseException:
                os.close(fd)
                raise

        try:
            made = self.in_netns(make)
        except OSError as exc:
            raise NetworkError(f"creating TAP {name} in {self.where}: {_describe(exc)}") from exc
        return None if made is None else PendingTap(made[0], name, made[1])

    def open_tap(self, name: str, queues: int) -> list[int]:
        """Descriptors of `queues` queues of the existing TAP `name` (its owner need not be us), for a
        hypervisor that gets its TAP as inherited or passed descriptors and so needs no /dev/net/tun of
        its own. IFF_VNET_HDR as cloud-hypervisor's own open_tap asks it; IFF_MULTI_QUEUE for more than
        one queue (the kernel refuses a mismatch with how the TAP was made). Close-on-exec: whoever
        passes them on says so (pass_fds, SCM_RIGHTS). All or nothing."""
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        request = struct.pack("16sH", name.encode(), flags)

        def attach() -> list[int]:
            fds: list[int] = []
            try:
                for _ in range(queues):
                    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
                    fds.append(fd)
                    fcntl.ioctl(fd, TUNSETIFF, request)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return fds

        try:
            return self.in_netns(attach)
        except OSError as exc:
            where = f"{queues} queues, in {self.where}"
            raise NetworkError(f"opening TAP {name} ({where}): {_describe(exc)}") from exc

    # -- addresses and routes ------------------------------------------------------------------------

    def addresses(self) -> list[Address]:
        msgs = self._call("listing addresses", lambda: list(self._ipr.addr("dump", family=socket.AF_INET)))
        return [
            Address(int(m["index"]), IPv4Address(str(m.get("IFA_ADDRESS"))), int(m["prefixlen"]))
            for m in msgs or []
            if m.get("IFA_ADDRESS")
        ]

    def add_address(self, index: int, address: IPv4Address, prefixlen: int, *, what: str) -> None:
        self._call(
            what,
            lambda: self._ipr.addr("add", index=index, address=str(address), prefixlen=prefixlen),
            ok=(errno.EEXIST,),
        )

    def routes(self) -> list[Route]:
        """IPv4 routes of the main table that have a destination prefix (the default route left out)."""
        msgs = self._call(
            "listing routes",
            lambda: list(self._ipr.route("dump", family=socket.AF_INET, table=RT_TABLE_MAIN)),
        )
        out: list[Route] = []
        for m in msgs or []:
            dst_len = int(m["dst_len"])
            if dst_len == 0:
                continue
            oif = m.get("RTA_OIF")
            table = m.get("RTA_TABLE") or m["table"]
            out.append(
                Route(IPv4Network(f"{m.get('RTA_DST')}/{dst_len}"), int(oif) if oif else None, int(table))
            )
        return out

    # -- neighbours ----------------------------------------------------------------------------------

    def neighbour(self, index: int, ip: IPv4Address) -> Neighbour | None:
        """The entry for `ip` on device `index`, None when there is none."""
        msgs = self._call(
            f"looking up the neighbour entry of {ip}",
            lambda: list(self._ipr.neigh("get", dst=str(ip), ifindex=index)),
            ok=(errno.ENOENT,),
        )
        if not msgs:
            return None
        m = msgs[0]
        mac = m.get("NDA_LLADDR")
        return Neighbour(index, ip, str(mac) if mac else None, bool(int(m["state"]) & NUD_PERMANENT))

    def pin_neighbour(self, index: int, ip: IPv4Address, mac: str, *, what: str) -> None:
        """Make `ip` resolve to `mac` on device `index` without ARP: a permanent entry, replacing any."""
        self._call(
            what,
            lambda: self._ipr.neigh("replace", dst=str(ip), lladdr=mac, ifindex=index, state=NUD_PERMANENT),
        )

    def delete_neighbour(self, index: int, ip: IPv4Address, *, what: str) -> bool:
        """Remove the entry for `ip` on device `index`; False if there was none."""
        done = self._call(
            what,
            lambda: self._ipr.neigh("del", dst=str(ip), ifindex=index) or True,
            ok=(errno.ENOENT, errno.ENODEV),
        )
        return done is not None

    # -- sysctls -------------------------------------------------------------------------------------

    def read_sysctl(self, key: str) -> str:
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            return self.in_netns(path.read_text).strip()
        except OSError as exc:
            raise NetworkError(f"reading {key} in {self.where}: {_describe(exc)}") from exc

    def write_sysctl(self, key: str, value: str) -> None:
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            self.in_netns(lambda: path.write_text(f"{value}\n"))
        except OSError as exc:
            raise NetworkError(f"setting {key}={value} in {self.where}: {_describe(exc)}") from exc


@contextlib.contextmanager
def session(netns: str | None) -> Iterator[Netlink]:
    """A `Netlink` session in `netns`, closed on exit."""
    with Netlink(netns) as nl:
        yield nl


def step(name: str) -> None:
    """Mark a step of a multi-step operation (a no-op unless a test installed STEP_HOOK)."""
    if STEP_HOOK is not None:
        STEP_HOOK(name)
