"""Procurator's nftables table: NAT (masquerade), forwarding between the bridge and the uplink, and the
DNAT of blue-green service addresses.

Procurator owns exactly one table, ``inet procurator``, and only ever replaces or deletes it whole, in
one ``nft -f -`` transaction: "create it if missing, delete it, define it" is atomic and idempotent, so
a half-written ruleset can never be observed and running it twice changes nothing. The rules are
rendered by a pure function (unit-testable); the ``nft`` calls go through `procurator.process` and, for
a named namespace, through ``ip netns exec``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from procurator import process
from procurator.errors import NetworkError, ProcessError

TABLE_FAMILY = "inet"
COMMENT_PREFIX = "procurator sha256:"
_COMMENT_RE = re.compile(r'comment "procurator sha256:([0-9a-f]+)"')
TABLE_NAME = "procurator"
NFT_TIMEOUT = 30.0


Service = tuple[str, str]  # (the address clients use, the guest address it is DNATed to)


def render_table(
    *,
    bridge: str,
    uplink: str | None,
    subnet: IPv4Network,
    masquerade: bool,
    services: Sequence[Service] = (),
) -> str:
    """The whole ``inet procurator`` table as an nft script that replaces any previous version.

    Forwarding (with an uplink): the subnet may leave by the uplink; with NAT only replies come back (new
    connections from the uplink to the VMs are dropped, as behind any NAT); without NAT (routed) both ways
    are accepted. Both chains keep policy accept, so traffic that is not ours is left to the host's other
    rules. `services`: each (service address, guest address) of a VM replaced blue-green is a DNAT in
    prerouting (traffic routed through the host) and output (traffic the host itself sends); connections
    made before a change keep their conntrack entry, so the old generation finishes what it has.
    """
    body: list[str] = []
    if uplink is not None:
        forward = [
            f'iifname "{bridge}" oifname "{uplink}" ip saddr {subnet} accept',
            f'iifname "{uplink}" oifname "{bridge}" ct state established,related accept',
            f'iifname "{uplink}" oifname "{bridge}" '
            + ("drop" if masquerade else f"ip daddr {subnet} accept"),
        ]
        body += [
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy accept;",
            *(f"\t\t{rule}" for rule in forward),
            "\t}",
        ]
    if uplink is not None and masquerade:
        body += [
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f'\t\tip saddr {subnet} oifname "{uplink}" masquerade',
            "\t}",
        ]
    if services:
        dnat = [f"\t\tip daddr {IPv4Address(a)} dnat ip to {IPv4Address(b)}" for a, b in sorted(services)]
        body += [
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;",
            *dnat,
            "\t}",
            "\tchain output {",
            "\t\ttype nat hook output priority -100; policy accept;",
            *dnat,
            "\t}",
        ]
    digest = hashlib.sha256("\n".join(body).encode()).hexdigest()[:16]
    lines = [
        f"table {TABLE_FAMILY} {TABLE_NAME}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
        f"table {TABLE_FAMILY} {TABLE_NAME} {{",
        f'\tcomment "{COMMENT_PREFIX}{digest}"',
        *body,
        "}",
    ]
    return "\n".join(lines) + "\n"


def services_of(rules: list[dict[str, Any]]) -> list[Service]:
    """The (service, guest) DNATs of our prerouting chain in `rules` (`table_rules`), sorted."""
    out: set[Service] = set()
    for rule in rules:
        if rule.get("chain") != "prerouting":
            continue
        daddr = target = None
        for e in rule.get("expr", []):
            if not isinstance(e, dict):
                continue
            match = e.get("match")
            if isinstance(match, dict) and isinstance(match.get("right"), str):
                left = match.get("left")
                if isinstance(left, dict) and left.get("payload", {}).get("field") == "daddr":
                    daddr = match["right"]
            dnat = e.get("dnat")
            if isinstance(dnat, dict) and isinstance(dnat.get("addr"), str):
                target = dnat["addr"]
        if daddr and target:
            out.add((daddr, target))
    return sorted(out)


def fingerprint(script: str) -> str | None:
    """The fingerprint recorded in a rendered script or in `nft list table` output (None if none)."""
    match = _COMMENT_RE.search(script)
    return match.group(1) if match else None


def _argv(netns: str | None, *args: str) -> list[str]:
    prefix = [] if netns is None else ["ip", "netns", "exec", netns]
    return [*prefix, "nft", *args]


def available() -> bool:
    """Whether the nft command is installed (looked up on PATH, nothing run)."""
    return shutil.which("nft") is not None


def _run(netns: str | None, args: list[str], *, what: str, script: str | None = None) -> str:
    try:
        done = process.run(_argv(netns, *args), input_text=script, timeout=NFT_TIMEOUT)
    except ProcessError as exc:
        where = "the host namespace" if netns is None else f"network namespace {netns!r}"
        raise NetworkError(f"nftables: {what} in {where} failed: {exc.message}") from exc
    return done.stdout


def apply_table(netns: str | None, script: str) -> None:
    """Replace the table with `script` (from `render_table`) in one transaction."""
    _run(netns, ["-f", "-"], what=f"replacing table {TABLE_FAMILY} {TABLE_NAME}", script=script)


def delete_table(netns: str | None) -> None:
    """Delete the table if it exists (idempotent, one transaction)."""
    script = f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
    _run(netns, ["-f", "-"], what=f"deleting table {TABLE_FAMILY} {TABLE_NAME}", script=script)


def _objects(text: str, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NetworkError(f"nftables: cannot parse `nft -j` output of {what}: {exc}") from exc
    items = data.get("nftables", []) if isinstance(data, dict) else []
    return [item for item in items if isinstance(item, dict)]


def list_tables(netns: str | None) -> list[tuple[str, str]]:
    """(family, name) of every nftables table in the namespace."""
    out = _run(netns, ["-j", "list", "tables"], what="listing tables")
    return [
        (str(t["table"]["family"]), str(t["table"]["name"]))
        for t in _objects(out, "list tables")
        if isinstance(t.get("table"), dict)
    ]


def table_present(netns: str | None) -> bool:
    if not available():
        return False
    return (TABLE_FAMILY, TABLE_NAME) in list_tables(netns)


def table_rules(netns: str | None) -> list[dict[str, Any]]:
    """The rules of our table as nft's JSON objects ({"family", "chain", "expr", ...}); [] if absent."""
    if not table_present(netns):
        return []
    out = _run(netns, ["-j", "list", "table", TABLE_FAMILY, TABLE_NAME], what="listing our table")
    return [dict(obj["rule"]) for obj in _objects(out, "list table") if isinstance(obj.get("rule"), dict)]


def current_fingerprint(netns: str | None) -> str | None:
    """The fingerprint of the table as it is in the kernel (None if absent or not ours)."""
    if not table_present(netns):
        return None
    out = _run(netns, ["list", "table", TABLE_FAMILY, TABLE_NAME], what="listing our table")
    return fingerprint(out)


def rule_count(script: str) -> int:
    """How many rules a rendered script defines (what the kernel must list after applying it)."""
    return sum(
        1 for line in script.splitlines() if line.startswith("\t\t") and not line.startswith("\t\ttype ")
    )


def has_masquerade(rules: list[dict[str, Any]], subnet: IPv4Network, uplink: str) -> bool:
    """Whether `rules` hold our masquerade rule for `subnet` out of `uplink`."""
    for rule in rules:
        expr = rule.get("expr", [])
        text = json.dumps(expr)
        if (
            rule.get("chain") == "postrouting"
            and any("masquerade" in e for e in expr if isinstance(e, dict))
            and f'"addr": "{subnet.network_address}", "len": {subnet.prefixlen}' in text
            and f'"right": "{uplink}"' in text
        ):
            return True
    return False
