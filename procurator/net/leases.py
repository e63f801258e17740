"""IP leases: one IPv4 address and MAC per VM name, persisted in ``<state>/leases.json``.

A VM keeps its address across calls, restarts of Procurator and reboots of the host, until the lease is
released. The network address, the broadcast address and the gateway are never handed out. Every change
is written atomically (`procurator.state.atomic_write`) before the call returns, so a crash leaves
either the old or the new file. Callers hold the state lock around mutations (one writer at a time).

    {"schema": 1, "subnet": "10.100.0.0/16", "leases": {
        "web": {"ip": "10.100.0.2", "mac": "02:..."}
    }}
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from pathlib import Path

from procurator.errors import DamagedStateError, LeaseExhaustedError, ValidationError
from procurator.jsonread import Reader
from procurator.net.config import NetworkConfig
from procurator.net.names import check_id, mac_address
from procurator.state import atomic_write, read_json

log = logging.getLogger(__name__)

LEASES_SCHEMA = 1
# The interface whose derived MAC a lease records when given none: a VM's first interface is "eth0"
# (nix/lib/spec.nix), so the lease names the MAC that interface really has.
DEFAULT_INTERFACE = "eth0"
REBUILD_FIX = "move it aside: it is rebuilt from the VM records at the next command"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class Lease:
    ip: str
    mac: str

    def to_json(self) -> dict[str, str]:
        return {"ip": self.ip, "mac": self.mac}


class Leases:
    """The lease table of one host for the subnet of `config`; loaded on construction."""

    def __init__(
        self, path: Path, config: NetworkConfig, *, recorded: Callable[[], Mapping[str, str]] | None = None
    ) -> None:
        self.path = path
        self.subnet = config.network
        self.gateway = config.gateway_address
        self._first = int(self.subnet.network_address) + 1
        self._last = int(self.subnet.broadcast_address) - 1
        self._leases: dict[str, Lease] = {}
        self._rows: dict[str, tuple[Lease, str]] = {}  # rendered file lines, so a save is O(n) joins only
        self._used: set[int] = {int(self.gateway)}
        self._hint = self._first  # no free address below this one
        try:
            self._load()
        except FileNotFoundError:
            if recorded is not None:
                self._rebuild(recorded())
        except ValidationError as exc:
            problem = f"{exc.field}: {exc.problem}" if exc.field else exc.problem
            raise DamagedStateError(path, problem, REBUILD_FIX) from exc

    # -- reading -------------------------------------------------------------------------------------

    def _load(self) -> None:
        data = read_json(self.path, fix=REBUILD_FIX)
        r = Reader.versioned(str(self.path), data, LEASES_SCHEMA, what="a lease file")
        table = r.obj("leases", required=True, expected="an object of VM name -> {ip, mac}")
        seen: dict[int, str] = {}
        for name in table.names():
            entry = table.obj(name, expected='{"ip": ..., "mac": ...}')
            text, mac = entry.text("ip"), entry.data.get("mac")
            if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
                raise entry.fail("mac", f"{mac!r} is not a MAC like 02:00:00:00:00:01")
            try:
                ip = IPv4Address(text)
            except (AddressValueError, ValueError) as exc:
                raise entry.fail("ip", f"{text!r} is not an IPv4 address") from exc
            value = int(ip)
            if value in seen:
                raise entry.fail("ip", f"{ip} is also leased to {seen[value]!r}")
            seen[value] = name
            if not self._usable(value):
                log.warning(
                    "lease of %s (%s) is outside %s or reserved; it gets a new address", name, ip, self.subnet
                )
                continue
            self._leases[name] = Lease(str(ip), mac)
            self._used.add(value)

    def _rebuild(self, recorded: Mapping[str, str]) -> None:
        """The table of a missing lease file, from the addresses (VM name -> IP) the VM records hold, each
        with the MAC `acquire` gives; written at once."""
        for name, ip in sorted(recorded.items()):
            try:
                value = int(IPv4Address(ip))
            except (AddressValueError, ValueError):
                continue
            if not self._usable(value) or value in self._used:
                continue
            self._leases[name] = Lease(str(IPv4Address(value)), mac_address(name, DEFAULT_INTERFACE))
            self._used.add(value)
        if self._leases:
            log.warning("%s was missing: rebuilt from %d VM record(s)", self.path, len(self._leases))
            self._save()

    def _usable(self, value: int) -> bool:
        return self._first <= value <= self._last and value != int(self.gateway)

    def get(self, name: str) -> Lease | None:
        return self._leases.get(name)

    def all(self) -> dict[str, Lease]:
        return dict(self._leases)

    def __len__(self) -> int:
        return len(self._leases)

    # -- changing ------------------------------------------------------------------------------------

    def acquire(self, name: str, mac: str | None = None) -> Lease:
        """The lease of VM `name`, allocating (and persisting) one if it has none.

        `mac` is the MAC of the VM's primary interface; by default the one `mac_address` derives for
        interface `DEFAULT_INTERFACE`. An existing lease keeps its address; a new `mac` updates it.
        """
        lease, changed = self._acquire(name, mac)
        if changed:
            self._save()
        return lease

    def release(self, name: str) -> bool:
        """Give up the lease of `name`; False if it had none (nothing written)."""
        lease = self._leases.pop(name, None)
        self._rows.pop(name, None)
        if lease is None:
            return False
        value = int(IPv4Address(lease.ip))
        self._used.discard(value)
        self._hint = min(self._hint, value)
        self._save()
        return True

    def _acquire(self, name: str, mac: str | None) -> tuple[Lease, bool]:
        check_id(name, what="vm")
        if mac is not None and not _MAC_RE.fullmatch(mac):
            raise ValidationError("lease", name, f"{mac!r} is not a lower-case MAC like 02:00:00:00:00:01")
        current = self._leases.get(name)
        if current is not None:
            if mac is None or mac == current.mac:
                return current, False
            updated = Lease(current.ip, mac)
            self._leases[name] = updated
            return updated, True
        value = self._next_free()
        lease = Lease(str(IPv4Address(value)), mac or mac_address(name, DEFAULT_INTERFACE))
        self._leases[name] = lease
        self._used.add(value)
        self._hint = value + 1
        return lease, True

    def _next_free(self) -> int:
        value = self._hint
        while value <= self._last and value in self._used:
            value += 1
        if value > self._last:
            raise LeaseExhaustedError(
                f"no free address left in {self.subnet} ({len(self._leases)} leases, "
                f"gateway {self.gateway}); "
                "release the leases of VMs that are gone (`procurator down --purge <vm>`) or configure a "
                "larger network.subnet in the worker config"
            )
        return value

    def _row(self, name: str, lease: Lease) -> str:
        cached = self._rows.get(name)
        if cached is None or cached[0] != lease:
            cached = (lease, f"    {json.dumps(name)}: {json.dumps(lease.to_json(), sort_keys=True)}")
            self._rows[name] = cached
        return cached[1]

    def _save(self) -> None:
        # One lease per line: readable, diffable, and built with the C JSON encoder (indent= is pure Python).
        rows = ",\n".join(self._row(name, lease) for name, lease in sorted(self._leases.items()))
        head = f'{{"schema": {LEASES_SCHEMA}, "subnet": {json.dumps(str(self.subnet))}, "leases": {{'
        text = f"{head}\n{rows}\n}}}}\n" if rows else f"{head}}}}}\n"
        atomic_write(self.path, text.encode())  # a failure is a StateError saying why
