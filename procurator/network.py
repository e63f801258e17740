"""Host networking (docs/worker.md): the bridge, a TAP per VM interface, IP leases, NAT and forwarding.

The public API of this module is what the CLI (`procurator net up|down|status`) and the VM lifecycle
use. Every function takes a `NetworkConfig` (its `netns` is the namespace everything happens in; None is
the host's), is idempotent, and works as measure, act, verify: it looks at what the kernel has, changes
only what differs, and checks the result, raising `NetworkError` (or `ConflictError` for something that
is not ours) with the interface named and the fix said.

Implementation lives in `procurator.net`: `names` (TAP names, MACs, aliases), `config`, `leases`,
`netlink` (the one pyroute2 chokepoint) and `nft` (the nftables table, through `procurator.process`).

Ownership: every TAP Procurator makes carries the alias ``procurator:<vm>:<iface>``, recorded by the
kernel on the link itself. That is how a TAP name collision is detected (never silently shared), how a
crash is survived (nothing to reconcile with a file of ours) and how `net_down` finds every TAP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from procurator.errors import ConflictError, NetworkError, ValidationError
from procurator.net import nft
from procurator.net.config import NetworkConfig
from procurator.net.leases import Lease, Leases
from procurator.net.names import (
    bridge_mac,
    check_id,
    mac_address,
    parse_tap_alias,
    tap_alias,
    tap_name,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from procurator.net.netlink import Link, Netlink


# pyroute2 takes a few hundred milliseconds to import; commands that never touch the network (`ps`,
# `logs`, `build`) must not pay for it, so the netlink module is imported on first use.
@contextlib.contextmanager
def session(netns: str | None) -> Iterator[Netlink]:
    from procurator.net import netlink  # noqa: PLC0415 - deferred on purpose, see above

    with netlink.session(netns) as nl:
        yield nl


def step(name: str) -> None:
    from procurator.net import netlink  # noqa: PLC0415 - deferred on purpose, see above

    netlink.step(name)


__all__ = [
    "BridgeStatus",
    "Lease",
    "Leases",
    "NatStatus",
    "NetStatus",
    "NetworkConfig",
    "TapInfo",
    "attach_vm",
    "delete_tap",
    "detach_vm",
    "ensure_bridge",
    "ensure_tap",
    "list_taps",
    "mac_address",
    "net_down",
    "net_status",
    "net_up",
    "tap_name",
]

log = logging.getLogger(__name__)

IP_FORWARD = "net.ipv4.ip_forward"


# -- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapInfo:
    """A Procurator TAP. `mac` is the guest MAC derived for (vm, iface), not the TAP's own address."""

    name: str
    vm: str
    iface: str
    mac: str
    index: int
    owner_uid: int | None
    multi_queue: bool
    master: str | None
    up: bool
    isolated: bool = False
    created: bool = False  # made by the call that returned it (attach_vm rolls back only those)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vm": self.vm,
            "iface": self.iface,
            "mac": self.mac,
            "ownerUid": self.owner_uid,
            "multiQueue": self.multi_queue,
            "master": self.master,
            "up": self.up,
            "isolated": self.isolated,
        }


@dataclass(frozen=True)
class BridgeStatus:
    name: str
    present: bool
    up: bool = False
    addresses: tuple[str, ...] = ()  # "10.100.0.1/16"
    kind: str | None = None  # what the interface of that name is, when present

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "present": self.present,
            "kind": self.kind,
            "up": self.up,
            "addresses": list(self.addresses),
        }


@dataclass(frozen=True)
class NatStatus:
    uplink: str | None
    nat: bool  # masquerading is configured
    table_present: bool
    masquerade: bool  # the masquerade rule is in the table
    ip_forward: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "uplink": self.uplink,
            "nat": self.nat,
            "tablePresent": self.table_present,
            "masquerade": self.masquerade,
            "ipForward": self.ip_forward,
        }


@dataclass(frozen=True)
class NetStatus:
    netns: str | None
    subnet: str
    gateway: str
    bridge: BridgeStatus
    taps: tuple[TapInfo, ...]
    nat: NatStatus
    created: bool = False  # net_up made the bridge (it was not there): the caller may undo that

    def to_json(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "subnet": self.subnet,
            "gateway": self.gateway,
            "bridge": self.bridge.to_json(),
            "taps": [t.to_json() for t in self.taps],
            "nat": self.nat.to_json(),
        }


# -- bridge ------------------------------------------------------------------------------------------------


def _bridge_status(nl: Netlink, cfg: NetworkConfig) -> BridgeStatus:
    link = nl.link(cfg.bridge)
    if link is None:
        return BridgeStatus(cfg.bridge, present=False)
    addresses = tuple(f"{a.address}/{a.prefixlen}" for a in nl.addresses() if a.index == link.index)
    return BridgeStatus(cfg.bridge, present=True, up=link.up, addresses=addresses, kind=link.kind)


def _check_bridge(nl: Netlink, cfg: NetworkConfig, link: Link | None) -> None:
    """Raise NetworkError if the bridge's name, address or subnet clash with what the namespace has."""
    gateway, prefixlen, subnet = cfg.gateway_address, cfg.prefixlen, cfg.network
    if link is not None and link.kind != "bridge":
        raise NetworkError(
            f"interface {cfg.bridge} exists in {nl.where} but is a {link.kind or 'plain'} device, not a "
            f"bridge; remove it (ip link del {cfg.bridge}) or set another network.bridge in the worker config"
        )
    own = link.index if link is not None else None
    addresses = nl.addresses()
    for addr in addresses:
        if addr.index == own and (addr.address, addr.prefixlen) != (gateway, prefixlen):
            raise NetworkError(
                f"bridge {cfg.bridge} has address {addr.address}/{addr.prefixlen}, expected "
                f"{gateway}/{prefixlen}; remove it (ip addr del {addr.address}/{addr.prefixlen} dev "
                f"{cfg.bridge}) or set network.subnet and network.gateway to match"
            )
    for addr in addresses:
        if addr.index != own and addr.network.overlaps(subnet):
            other = nl.link_by_index(addr.index)
            raise NetworkError(
                f"subnet {subnet} overlaps address {addr.address}/{addr.prefixlen} of "
                f"{other.name if other else f'interface #{addr.index}'} in {nl.where}; choose another "
                "network.subnet in the worker config"
            )
    for route in nl.routes():
        if own is not None and route.oif == own:
            continue
        if route.dst.overlaps(subnet):
            other = nl.link_by_index(route.oif) if route.oif else None
            via = f" dev {other.name}" if other else ""
            raise NetworkError(
                f"subnet {subnet} overlaps route {route.dst}{via} in {nl.where}; choose another "
                "network.subnet in the worker config or remove that route"
            )


def _ensure_bridge(nl: Netlink, cfg: NetworkConfig) -> Link:
    link = nl.link(cfg.bridge)
    _check_bridge(nl, cfg, link)
    if link is None:
        log.info("creating bridge %s in %s", cfg.bridge, nl.where)
        nl.add_bridge(cfg.bridge, bridge_mac(cfg.bridge))
        link = nl.link(cfg.bridge)
        if link is None:
            raise NetworkError(f"bridge {cfg.bridge} was created but is not there; is something removing it?")
    want = (cfg.gateway_address, cfg.prefixlen)
    if not any(a.index == link.index and (a.address, a.prefixlen) == want for a in nl.addresses()):
        nl.add_address(link.index, cfg.gateway_address, cfg.prefixlen, what=f"addressing bridge {cfg.bridge}")
    if not link.up:
        nl.set_link(link.index, up=True, what=f"bringing bridge {cfg.bridge} up")
    status = _bridge_status(nl, cfg)
    if not (status.present and status.up and f"{want[0]}/{want[1]}" in status.addresses):
        raise NetworkError(
            f"bridge {cfg.bridge} in {nl.where} is not as set up (up={status.up}, addresses="
            f"{', '.join(status.addresses) or 'none'}); something else is changing it"
        )
    checked = nl.link(cfg.bridge)
    if checked is None:
        raise NetworkError(f"bridge {cfg.bridge} vanished from {nl.where} while being set up")
    return checked


def ensure_bridge(cfg: NetworkConfig) -> BridgeStatus:
    """Create the bridge with the gateway address and bring it up; leave a matching one alone.

    Raises NetworkError if an interface of that name is not a bridge, has another address, or the subnet
    overlaps an address or route the namespace already has (other than the bridge's own).
    """
    with session(cfg.netns) as nl:
        _ensure_bridge(nl, cfg)
        return _bridge_status(nl, cfg)


# -- TAPs --------------------------------------------------------------------------------------------------


def _require_bridge(nl: Netlink, cfg: NetworkConfig) -> Link:
    link = nl.link(cfg.bridge)
    if link is None or link.kind != "bridge":
        raise NetworkError(f"bridge {cfg.bridge} does not exist in {nl.where}; run `procurator net up` first")
    return link


def _check_tap_owner(nl: Netlink, link: Link, vm: str, iface: str) -> None:
    if link.tun is None or not link.tun.tap:
        raise ConflictError(
            f"interface {link.name} (for {vm}:{iface}) exists in {nl.where} and is not a TAP "
            f"(kind {link.kind or 'plain'}); it is not Procurator's: remove or rename it"
        )
    if link.alias == tap_alias(vm, iface):
        return
    owner = parse_tap_alias(link.alias)
    if owner is not None:
        raise ConflictError(
            f"TAP name {link.name} of {vm}:{iface} collides with the TAP of {owner[0]}:{owner[1]}; "
            "rename one of the VMs or interfaces"
        )
    raise ConflictError(
        f"a TAP named {link.name} exists in {nl.where} that Procurator did not make (alias "
        f"{link.alias!r}); if it is stale remove it (ip link del {link.name}), else rename VM {vm!r}"
    )


def _tap_info(link: Link, vm: str, iface: str, master: str | None, *, created: bool = False) -> TapInfo:
    tun = link.tun
    return TapInfo(
        name=link.name,
        vm=vm,
        iface=iface,
        mac=mac_address(vm, iface),
        index=link.index,
        owner_uid=tun.owner if tun else None,
        multi_queue=bool(tun and tun.multi_queue),
        master=master,
        up=link.up,
        isolated=bool(link.isolated),
        created=created,
    )


@dataclass(frozen=True)
class _TapSpec:
    name: str
    vm: str
    iface: str
    owner_uid: int
    multi_queue: bool


def _create_tap(nl: Netlink, cfg: NetworkConfig, bridge: Link, spec: _TapSpec) -> bool:
    """Create, configure and commit the TAP; False (nothing done) if an interface has its name."""
    name = spec.name
    pending = nl.create_tap(name, spec.owner_uid, spec.multi_queue)
    if pending is None:
        return False
    # The TAP exists only while `pending` is open: a failure or a crash before commit() leaves nothing.
    with pending:
        step("tap-created")
        nl.set_link(
            pending.index,
            alias=tap_alias(spec.vm, spec.iface),
            master=bridge.index,
            up=True,
            what=f"attaching TAP {name} to {cfg.bridge}",
        )
        if cfg.isolate:
            nl.set_isolated(pending.index, True, what=f"isolating TAP {name}")
        step("tap-configured")
        pending.commit()
        step("tap-persistent")
    return True


def _converge_existing_tap(nl: Netlink, cfg: NetworkConfig, bridge: Link, spec: _TapSpec) -> bool:
    """Check and correct the TAP that holds `spec.name`; True if it had to be recreated."""
    name, vm, iface = spec.name, spec.vm, spec.iface
    link = nl.link(name)
    if link is None:  # gone between the create attempt and now: try once more
        if _create_tap(nl, cfg, bridge, spec):
            return True
        raise NetworkError(
            f"interface {name} in {nl.where} keeps appearing and disappearing; who manages it?"
        )
    _check_tap_owner(nl, link, vm, iface)
    tun = link.tun
    if tun is None:  # pragma: no cover - _check_tap_owner raised already
        raise ConflictError(f"interface {name} is not a TAP")
    if tun.owner != spec.owner_uid or tun.multi_queue != spec.multi_queue or not tun.persist:
        if tun.attached:
            raise ConflictError(
                f"TAP {name} of {vm}:{iface} is open by a running hypervisor with owner uid {tun.owner} "
                f"and multi-queue {tun.multi_queue}; stop VM {vm!r} before changing its user or vCPUs"
            )
        log.info("recreating TAP %s of %s:%s (owner/queues changed)", name, vm, iface)
        nl.delete_link(link.index, what=f"deleting TAP {name}")
        if not _create_tap(nl, cfg, bridge, spec):
            raise NetworkError(f"TAP {name} in {nl.where} came back while being recreated")
        return True
    if link.master != bridge.index or not link.up:
        nl.set_link(link.index, master=bridge.index, up=True, what=f"attaching TAP {name} to {cfg.bridge}")
    if bool(link.isolated) != cfg.isolate:
        nl.set_isolated(link.index, cfg.isolate, what=f"setting isolation of TAP {name}")
    return False


def _ensure_tap(nl: Netlink, cfg: NetworkConfig, bridge: Link, spec: _TapSpec) -> TapInfo:
    # Act first: creating is create-or-fail in one ioctl, so a new TAP costs no extra lookup; an existing
    # name is then measured and converged. Either way the result is verified.
    created = _create_tap(nl, cfg, bridge, spec) or _converge_existing_tap(nl, cfg, bridge, spec)
    name, vm, iface = spec.name, spec.vm, spec.iface
    final = nl.link(name)
    if (
        final is None
        or final.tun is None
        or final.alias != tap_alias(vm, iface)
        or final.master != bridge.index
        or not final.up
        or final.tun.owner != spec.owner_uid
        or final.tun.multi_queue != spec.multi_queue
        or not final.tun.persist
        or bool(final.isolated) != cfg.isolate
    ):
        raise NetworkError(
            f"TAP {name} of {vm}:{iface} in {nl.where} is not as set up; something else changed it"
        )
    return _tap_info(final, vm, iface, cfg.bridge, created=created)


def ensure_tap(
    cfg: NetworkConfig, name: str, owner_uid: int, multi_queue: bool, *, vm: str, iface_id: str
) -> TapInfo:
    """Make TAP `name` for interface `iface_id` of `vm` exist: owned by `owner_uid`, on the bridge, up.

    An existing TAP of ours is left (or corrected: bridge, up, isolation; recreated if owner or queues
    differ and no hypervisor has it open). ConflictError if the name belongs to another (vm, iface) or to
    something that is not Procurator's. The bridge must exist (`ensure_bridge`).
    """
    check_id(vm, what="vm")
    check_id(iface_id, what="interface")
    with session(cfg.netns) as nl:
        bridge = _require_bridge(nl, cfg)
        return _ensure_tap(nl, cfg, bridge, _TapSpec(name, vm, iface_id, owner_uid, multi_queue))


PROBE_TAP = "pc-doctor"  # never a VM's TAP name: those have a '-' after at most three readable characters


def probe_tap(cfg: NetworkConfig, owner_uid: int) -> None:
    """Create a throwaway multi-queue TAP owned by `owner_uid`, read back what the kernel reports, and let
    it go (it is never made persistent, so closing it deletes it). For `procurator doctor`.

    NetworkError when it cannot be created, reads back otherwise, or outlives its descriptor.
    """
    with session(cfg.netns) as nl:
        pending = nl.create_tap(PROBE_TAP, owner_uid, multi_queue=True)
        if pending is None:
            raise NetworkError(
                f"interface {PROBE_TAP} already exists in {nl.where}; another doctor runs, or delete it "
                f"(`ip link del {PROBE_TAP}`)"
            )
        with pending:
            link = nl.link(PROBE_TAP)
        if nl.link(PROBE_TAP) is not None:
            raise NetworkError(f"TAP {PROBE_TAP} in {nl.where} outlived its descriptor; delete it by hand")
    if link is None or link.tun is None or not link.tun.tap:
        raise NetworkError(f"TAP {PROBE_TAP} in {nl.where} vanished or is not a TAP right after creation")
    if link.tun.owner != owner_uid or not link.tun.multi_queue:
        raise NetworkError(
            f"TAP {PROBE_TAP} in {nl.where} reads back owner {link.tun.owner} and multi-queue "
            f"{link.tun.multi_queue}, not {owner_uid} and True"
        )


def delete_tap(cfg: NetworkConfig, name: str) -> bool:
    """Delete Procurator TAP `name`; False if it did not exist. ConflictError if it is not ours."""
    with session(cfg.netns) as nl:
        link = nl.link(name)
        if link is None:
            return False
        if link.tun is None or parse_tap_alias(link.alias) is None:
            raise ConflictError(
                f"interface {name} in {nl.where} is not a Procurator TAP (alias {link.alias!r}); "
                "not deleting it"
            )
        nl.delete_link(link.index, what=f"deleting TAP {name}")
        if nl.link(name) is not None:
            raise NetworkError(f"TAP {name} in {nl.where} is still there after deleting it")
        return True


def _our_taps(nl: Netlink, links: list[Link] | None = None) -> list[TapInfo]:
    links = nl.links() if links is None else links
    names = {link.index: link.name for link in links}
    out: list[TapInfo] = []
    for link in links:
        owner = parse_tap_alias(link.alias)
        if owner is None or link.tun is None:
            continue
        out.append(_tap_info(link, owner[0], owner[1], names.get(link.master) if link.master else None))
    return sorted(out, key=lambda t: (t.vm, t.iface, t.name))


def list_taps(cfg: NetworkConfig) -> list[TapInfo]:
    """Every Procurator TAP in the namespace (found by alias), sorted by VM and interface."""
    with session(cfg.netns) as nl:
        return _our_taps(nl)


def attach_vm(
    cfg: NetworkConfig,
    vm: str,
    iface_ids: Sequence[str],
    owner_uid: int,
    vcpus: int,
    *,
    multi_queue: bool | None = None,
    ip: str | None = None,
    mac: str | None = None,
) -> list[TapInfo]:
    """Create (or keep) a TAP for each interface of `vm`, in the order given; all or nothing.

    TAPs are multi-queue when the VM has more than one vCPU (override with `multi_queue`); the
    hypervisor must open them accordingly (net ``num_queues`` > 2). If any TAP fails, the TAPs this call
    created are removed again and the error is raised.

    With `ip` (the VM's lease, which the guest puts on its first interface) the bridge's neighbour table
    gets a permanent entry from `ip` to that interface's MAC (`mac`, by default the derived one), so the
    host never has to ARP for the guest: a probe sent while the guest boots would otherwise leave the
    entry INCOMPLETE, then FAILED, and the kernel asks again only once a second (its retrans_time), which
    put up to a second between the guest's service starting and its health check passing. `detach_vm`
    with the same `ip` removes it.
    """
    check_id(vm, what="vm")
    ids = [check_id(i, what="interface") for i in iface_ids]
    if len(set(ids)) != len(ids):
        raise ValidationError("network", "interfaces", f"VM {vm!r} lists an interface id twice: {ids}")
    names = [tap_name(vm, i) for i in ids]
    if len(set(names)) != len(names):
        raise ConflictError(f"two interfaces of VM {vm!r} derive the same TAP name; rename one of {ids}")
    mq = vcpus > 1 if multi_queue is None else multi_queue
    with session(cfg.netns) as nl:
        bridge = _require_bridge(nl, cfg)
        made: list[TapInfo] = []
        out: list[TapInfo] = []
        try:
            for iface, name in zip(ids, names, strict=True):
                info = _ensure_tap(nl, cfg, bridge, _TapSpec(name, vm, iface, owner_uid, mq))
                out.append(info)
                if info.created:
                    made.append(info)
            if ip is not None and ids:
                _pin_neighbour(nl, bridge, vm, IPv4Address(ip), mac or mac_address(vm, ids[0]))
        except BaseException:
            if made:
                log.info("rolling back TAPs of %s: %s", vm, ", ".join(t.name for t in made))
                try:
                    nl.delete_links([t.index for t in made], what=f"rolling back TAPs of {vm}")
                except NetworkError as cleanup:
                    log.warning("rolling back TAPs of %s failed: %s", vm, cleanup)
            raise
        return out


def open_taps(cfg: NetworkConfig, queues: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Descriptors of each TAP named in `queues` (name -> queue count), for a hypervisor that is handed its
    TAPs (docs/architecture.md, "Users"); all or nothing. The caller closes them once they are passed on."""
    opened: dict[str, tuple[int, ...]] = {}
    try:
        with session(cfg.netns) as nl:
            for name, count in queues.items():
                opened[name] = tuple(nl.open_tap(name, count))
    except BaseException:
        close_fds(opened)
        raise
    return opened


def close_fds(opened: Mapping[str, Sequence[int]]) -> None:
    for fds in opened.values():
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def detach_vm(
    cfg: NetworkConfig, vm: str, taps: Sequence[str] | None = None, *, ip: str | None = None
) -> list[str]:
    """Remove every TAP of `vm`; returns their names. The bridge stays.

    With `taps` (the names the VM's record lists), only those are looked up, each by name: a stop costs
    no listing of every link. Without, every link is listed and the VM's found by alias (after a crash,
    when no record says which TAPs exist). With `ip`, the permanent neighbour entry `attach_vm` made for
    it goes too (an entry left by a caller that did not know the address is harmless: it names a lease
    no running VM holds, and the next `attach_vm` for that address replaces it).
    """
    check_id(vm, what="vm")
    with session(cfg.netns) as nl:
        if ip:
            _unpin_neighbour(nl, cfg, vm, IPv4Address(ip))
        if taps is None:
            found = [t for t in _our_taps(nl) if t.vm == vm]
        else:
            found = []
            for name in taps:
                link = nl.link(name)
                owner = parse_tap_alias(link.alias) if link is not None else None
                if link is not None and owner is not None and owner[0] == vm:
                    found.append(_tap_info(link, vm, owner[1], None))
        if found:
            nl.delete_links([t.index for t in found], what=f"deleting TAPs of {vm}")
            left = [t.name for t in found if nl.link(t.name) is not None]
            if left:
                raise NetworkError(f"TAPs of {vm} still present after deleting them: {', '.join(left)}")
        return [t.name for t in found]


def _pin_neighbour(nl: Netlink, bridge: Link, vm: str, ip: IPv4Address, mac: str) -> None:
    what = f"pinning {ip} to {mac} ({vm}) on {bridge.name}"
    nl.pin_neighbour(bridge.index, ip, mac, what=what)
    entry = nl.neighbour(bridge.index, ip)
    if entry is None or not entry.permanent or (entry.mac or "").lower() != mac.lower():
        raise NetworkError(f"{what}: the entry is not as set ({entry}); something else changed it")


def _unpin_neighbour(nl: Netlink, cfg: NetworkConfig, vm: str, ip: IPv4Address) -> None:
    bridge = nl.link(cfg.bridge)
    if bridge is None:  # the bridge went, and its neighbour table with it
        return
    entry = nl.neighbour(bridge.index, ip)
    if entry is not None and entry.permanent:
        nl.delete_neighbour(bridge.index, ip, what=f"removing the neighbour entry of {ip} ({vm})")


# -- NAT and the whole network -----------------------------------------------------------------------------


def _nat_status(nl: Netlink, cfg: NetworkConfig, present: bool | None = None) -> NatStatus:
    """`present`: whether the table is there, when the caller measured it and changed nothing since."""
    if present is None:
        present = nft.table_present(cfg.netns)
    rules = nft.table_rules(cfg.netns) if present else []
    return NatStatus(
        uplink=cfg.uplink,
        nat=cfg.nat,
        table_present=present,
        masquerade=cfg.uplink is not None and nft.has_masquerade(rules, cfg.network, cfg.uplink),
        ip_forward=nl.read_sysctl(IP_FORWARD) == "1",
    )


def _status(nl: Netlink, cfg: NetworkConfig, table_present: bool | None = None) -> NetStatus:
    return NetStatus(
        netns=cfg.netns,
        subnet=str(cfg.network),
        gateway=str(cfg.gateway_address),
        bridge=_bridge_status(nl, cfg),
        taps=tuple(_our_taps(nl)),
        nat=_nat_status(nl, cfg, table_present),
    )


def _ensure_forwarding(nl: Netlink, uplink: str) -> None:
    if nl.link(uplink) is None:
        raise NetworkError(
            f"uplink {uplink} does not exist in {nl.where}; fix network.uplink in the worker config"
        )
    if nl.read_sysctl(IP_FORWARD) != "1":
        nl.write_sysctl(IP_FORWARD, "1")
        if nl.read_sysctl(IP_FORWARD) != "1":
            raise NetworkError(f"{IP_FORWARD} in {nl.where} did not stay 1; something resets it")


def _ensure_table(nl: Netlink, cfg: NetworkConfig, services: Sequence[nft.Service]) -> None:
    """The table as `cfg` and `services` say, replaced in one transaction when it differs (verified)."""
    script = nft.render_table(
        bridge=cfg.bridge, uplink=cfg.uplink, subnet=cfg.network, masquerade=cfg.nat, services=services
    )
    want, count = nft.fingerprint(script), nft.rule_count(script)
    if nft.current_fingerprint(cfg.netns) == want and len(nft.table_rules(cfg.netns)) == count:
        return
    nft.apply_table(cfg.netns, script)
    rules = nft.table_rules(cfg.netns)
    if nft.current_fingerprint(cfg.netns) != want or len(rules) != count:
        raise NetworkError(f"nftables table inet procurator in {nl.where} is not as written")
    if cfg.uplink is not None and cfg.nat and not nft.has_masquerade(rules, cfg.network, cfg.uplink):
        raise NetworkError(f"nftables table inet procurator in {nl.where} lacks the masquerade rule")
    if nft.services_of(rules) != sorted(services):
        raise NetworkError(f"nftables table inet procurator in {nl.where} lacks a service DNAT")


def current_services(cfg: NetworkConfig) -> list[nft.Service]:
    """The service DNATs the kernel's table has now (none without nft or the table)."""
    return nft.services_of(nft.table_rules(cfg.netns)) if nft.available() else []


def _converge_isolation(nl: Netlink, cfg: NetworkConfig, bridge: Link) -> None:
    for link in nl.links():
        if link.master == bridge.index and parse_tap_alias(link.alias) and bool(link.isolated) != cfg.isolate:
            nl.set_isolated(link.index, cfg.isolate, what=f"setting isolation of TAP {link.name}")


def net_up(cfg: NetworkConfig, services: Sequence[nft.Service] | None = None) -> NetStatus:
    """Bridge, and with an uplink forwarding (ip_forward, nftables table with NAT if `nat`). Idempotent.

    `services`: the service DNATs of VMs replaced blue-green (docs/architecture.md); None keeps those
    the table has. Without an uplink and without services, a table left by an earlier configuration is
    removed. ip_forward is never turned off again (other things on the host may rely on it).
    """
    with session(cfg.netns) as nl:
        created = nl.link(cfg.bridge) is None
        bridge = _ensure_bridge(nl, cfg)
        _converge_isolation(nl, cfg, bridge)
        if cfg.uplink is not None:
            _ensure_forwarding(nl, cfg.uplink)
        # measured once (each nft call is a process: about 15 ms), again only after a step that acts on it
        present: bool | None = nft.table_present(cfg.netns)
        if services is None:  # kept as the kernel has them: only the VMs' owner (lifecycle) changes them
            services = nft.services_of(nft.table_rules(cfg.netns)) if present else []
        if cfg.uplink is not None or services:
            _ensure_table(nl, cfg, services)
            present = None
        elif present:
            log.info("removing nftables table inet procurator (no uplink configured, no service DNAT)")
            nft.delete_table(cfg.netns)
            present = None
        return dataclasses.replace(_status(nl, cfg, present), created=created)


def net_down(cfg: NetworkConfig) -> NetStatus:
    """Remove every Procurator TAP, the bridge and the nftables table. Idempotent.

    TAPs in use by running VMs are removed too: stop the VMs first. ip_forward is left as it is.
    """
    with session(cfg.netns) as nl:
        taps = _our_taps(nl)
        if taps:
            log.info("deleting %d TAPs in %s", len(taps), nl.where)
            nl.delete_links([t.index for t in taps], what="deleting Procurator TAPs")
        link = nl.link(cfg.bridge)
        if link is not None:
            if link.kind != "bridge":
                raise NetworkError(
                    f"interface {cfg.bridge} in {nl.where} is not a bridge; not deleting it "
                    "(check network.bridge)"
                )
            nl.delete_link(link.index, what=f"deleting bridge {cfg.bridge}")
        if nft.table_present(cfg.netns):
            nft.delete_table(cfg.netns)
        status = _status(nl, cfg)
        if status.taps or status.bridge.present or status.nat.table_present:
            raise NetworkError(f"network teardown in {nl.where} left something behind: {status.to_json()}")
        return status


def net_status(cfg: NetworkConfig) -> NetStatus:
    """What is there: the bridge, the Procurator TAPs, the NAT table and ip_forward. Changes nothing."""
    with session(cfg.netns) as nl:
        return _status(nl, cfg)
