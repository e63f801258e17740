"""Throwaway network namespaces for tests and benchmarks, and independent observers of their contents.

Everything here acts only inside namespaces it creates (named ``pct-<pid>-<random>``) and deletes them
on exit, which removes every interface, address, route and nftables table they held. Observations go
through ``ip -j`` and ``nft``, not through the code under test, so tests check what the kernel really has.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2.netns import setns

from procurator import process

TIMEOUT = 20.0
T = TypeVar("T")


def _run(*argv: str, check: bool = True, input_text: str | None = None) -> str:
    return process.run(list(argv), check=check, input_text=input_text, timeout=TIMEOUT).stdout


@dataclass(frozen=True)
class Netns:
    name: str

    def ip(self, *args: str, check: bool = True) -> str:
        """Run ``ip -n <ns> ...`` and return its output."""
        return _run("ip", "-n", self.name, *args, check=check)

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        out = _run("ip", "-j", "-n", self.name, *args).strip()
        data = json.loads(out) if out else []
        return [d for d in data if isinstance(d, dict)]

    def exec(self, *argv: str, check: bool = True, input_text: str | None = None) -> str:
        """Run a command inside the namespace (``ip netns exec``)."""
        return _run("ip", "netns", "exec", self.name, *argv, check=check, input_text=input_text)

    def link(self, name: str) -> dict[str, Any] | None:
        for link in self.ip_json("-d", "link", "show"):
            if link.get("ifname") == name:
                return link
        return None

    def link_names(self) -> set[str]:
        return {str(link["ifname"]) for link in self.ip_json("link", "show")}

    def nft_tables(self) -> list[str]:
        return sorted(
            line.strip() for line in self.exec("nft", "list", "tables").splitlines() if line.strip()
        )

    def nft_ruleset(self) -> str:
        return self.exec("nft", "list", "ruleset")

    def sysctl(self, key: str) -> str:
        return self.exec("cat", "/proc/sys/" + key.replace(".", "/")).strip()

    def snapshot(self) -> dict[str, Any]:
        """What the namespace holds, in a form that compares equal when nothing changed.

        IPv4 only: the kernel adds IPv6 link-local addresses and routes by itself, at its own pace; and
        carrier-derived flags (NO-CARRIER, linkdown) are left out: they follow the carrier, not us.
        """
        links = []
        for link in self.ip_json("-d", "link", "show"):
            info = link.get("linkinfo", {})
            data = info.get("info_data", {})
            links.append(
                {
                    "ifindex": link.get("ifindex"),
                    "ifname": link.get("ifname"),
                    "address": link.get("address"),
                    "flags": sorted(f for f in link.get("flags", []) if f not in {"NO-CARRIER", "LOWER_UP"}),
                    "master": link.get("master"),
                    "ifalias": link.get("ifalias"),
                    "group": link.get("group"),
                    "kind": info.get("info_kind"),
                    "tun": {k: data.get(k) for k in ("type", "user", "multi_queue", "persist")}
                    if info.get("info_kind") == "tun"
                    else None,
                    "isolated": info.get("info_slave_data", {}).get("isolated"),
                }
            )
        addrs = [
            (a.get("ifname"), [(i.get("local"), i.get("prefixlen")) for i in a.get("addr_info", [])])
            for a in self.ip_json("-4", "addr", "show")
        ]
        routes = sorted(
            json.dumps({k: v for k, v in r.items() if k != "flags"}, sort_keys=True)  # flags follow carrier
            for r in self.ip_json("-4", "route", "show", "table", "all")
        )
        return {
            "links": links,
            "addrs": addrs,
            "routes": routes,
            "nft": self.nft_ruleset(),
            "ip_forward": self.sysctl("net.ipv4.ip_forward"),
        }

    def _in_netns(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a short-lived thread that entered this namespace (setns changes only that thread)."""
        made: list[T] = []
        failed: list[BaseException] = []

        def enter_and_run() -> None:
            try:
                setns(self.name, flags=0)
                made.append(fn())
            except OSError as exc:
                failed.append(exc)

        thread = threading.Thread(target=enter_and_run, daemon=True)
        thread.start()
        thread.join(timeout=5)
        if failed:
            raise failed[0]
        if not made:
            raise TimeoutError(f"a call in {self.name} took more than 5 s")
        return made[0]

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace."""
        return self._in_netns(lambda: socket.socket(family, kind))

    def open_tap(self, name: str, *, multi_queue: bool = False) -> int:
        """Attach to TAP `name` as a hypervisor would; returns the descriptor (close it to detach)."""
        flags = 0x0002 | 0x1000 | (0x0100 if multi_queue else 0)  # IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE
        request = struct.pack("16sH", name.encode(), flags)

        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, 0x400454CA, request)  # TUNSETIFF
            except OSError:
                os.close(fd)
                raise
            return fd

        return self._in_netns(attach)


def unique_name(prefix: str = "pct") -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def throwaway_netns(prefix: str = "pct") -> Iterator[Netns]:
    """A new, empty network namespace, deleted (with all it holds) on exit."""
    name = unique_name(prefix)
    _run("ip", "netns", "add", name)
    try:
        yield Netns(name)
    finally:
        _run("ip", "netns", "del", name, check=False)


def veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair from `a` (end `a_name`) to `b` (end `b_name`), created inside `a`, both ends up."""
    a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    a.ip("link", "set", a_name, "up")
    b.ip("link", "set", b_name, "up")
