"""`NetworkConfig`: the ``network`` section of the worker configuration (docs/worker.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from typing import Any

from procurator.errors import ValidationError
from procurator.jsonread import Reader
from procurator.net.names import check_ifname

DEFAULT_BRIDGE = "procurator0"
DEFAULT_SUBNET = "10.100.0.0/16"
MAX_PREFIXLEN = 30  # a /31 or /32 leaves no address for a VM besides the gateway
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = ("bridge", "subnet", "gateway", "uplink", "nat", "isolate", "netns")


@dataclass(frozen=True)
class NetworkConfig:
    """Where and how VMs are networked on this host.

    `subnet` is the VMs' IPv4 network; `gateway` the bridge's address in it (None: the first host, .1).
    `uplink` names the interface traffic leaves by: with one, forwarding between bridge and uplink is set up,
    and with `nat` also masquerading. `isolate` makes every TAP an isolated bridge port (VMs reach the host
    and the uplink, not each other). `netns` is the network namespace all of it lives in (None: the host's).
    Construction validates; `parse` reads the worker config's JSON object.
    """

    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET
    gateway: str | None = None
    uplink: str | None = None
    nat: bool = False
    isolate: bool = False
    netns: str | None = None

    def __post_init__(self) -> None:
        source = "NetworkConfig"
        check_ifname(self.bridge, source=source, field="network.bridge")
        if self.uplink is not None:
            check_ifname(self.uplink, source=source, field="network.uplink")
            if self.uplink == self.bridge:
                raise ValidationError(source, "network.uplink", "must not be the bridge itself")
        if self.nat and self.uplink is None:
            raise ValidationError(source, "network.nat", "NAT needs an uplink; set network.uplink")
        if self.netns is not None and not _NETNS_RE.fullmatch(self.netns):
            raise ValidationError(source, "network.netns", f"{self.netns!r} is not a namespace name")
        try:
            net = IPv4Network(self.subnet, strict=True)
        except (AddressValueError, NetmaskValueError, ValueError) as exc:
            raise ValidationError(
                source, "network.subnet", f"{self.subnet!r} is not an IPv4 network like 10.100.0.0/16 ({exc})"
            ) from exc
        if net.prefixlen > MAX_PREFIXLEN:
            raise ValidationError(
                source,
                "network.subnet",
                f"{net} is too small for VMs; use a prefix of /{MAX_PREFIXLEN} or shorter",
            )
        if self.gateway is not None:
            try:
                gw = IPv4Address(self.gateway)
            except (AddressValueError, ValueError) as exc:
                raise ValidationError(
                    source, "network.gateway", f"{self.gateway!r} is not an IPv4 address"
                ) from exc
            if gw not in net or gw in (net.network_address, net.broadcast_address):
                raise ValidationError(source, "network.gateway", f"{gw} is not a host address of {net}")

    @property
    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    @property
    def gateway_address(self) -> IPv4Address:
        if self.gateway is not None:
            return IPv4Address(self.gateway)
        return self.network.network_address + 1

    @classmethod
    def parse(cls, data: Any, *, source: str = "worker config") -> NetworkConfig:
        """Read the ``network`` object of the worker config; ValidationError names the offending field."""
        return cls.read(Reader(source, data, "network"))

    @classmethod
    def read(cls, r: Reader) -> NetworkConfig:
        """The ``network`` object `r` reads (`network.*` of the worker config)."""
        r.only(_FIELDS, listed=_FIELDS)
        values: dict[str, Any] = {}
        for key in ("bridge", "subnet"):
            if r.has(key):
                values[key] = r.text(key, nonempty=True, what="a non-empty string")
        for key in ("gateway", "uplink", "netns"):
            values[key] = r.opt_text(key, nonempty=True, what="a string or null")
        for key in ("nat", "isolate"):
            values[key] = r.boolean(key, False)
        try:
            return cls(**values)
        except ValidationError as exc:  # re-issued naming the config file instead of the class
            raise ValidationError(r.source, exc.field, exc.problem) from exc

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _FIELDS}
