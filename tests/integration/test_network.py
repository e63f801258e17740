"""Host networking against the real kernel, inside throwaway network namespaces (root required).

Nothing here touches the host's own interfaces: every link, address, route and nftables table lives in a
namespace a fixture creates and deletes. What the code did is observed with `ip -j` and `nft`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from procurator import network, process
from procurator.errors import ConflictError, NetworkError
from procurator.net import nft
from procurator.net.netlink import Netlink
from procurator.network import NetworkConfig, tap_name
from tests.support.netns import Netns, throwaway_netns, veth

REPO = Path(__file__).resolve().parents[2]
UID = 1000


@pytest.fixture
def ns() -> Iterator[Netns]:
    with throwaway_netns() as made:
        yield made


@pytest.fixture
def cfg(ns: Netns) -> NetworkConfig:
    return NetworkConfig(netns=ns.name)


def _link_of(ns: Netns, name: str) -> dict[str, Any]:
    link = ns.link(name)
    assert link is not None, f"{name} missing in {ns.name}"
    return link


# -- bridge ------------------------------------------------------------------------------------------------


_LEAN = """
import ctypes.util, json, sys
looked_up = []  # find_library runs `ldconfig -p`: a fork of the process
find_library = ctypes.util.find_library
ctypes.util.find_library = lambda name: looked_up.append(name) or find_library(name)
from procurator.net import netlink
whole = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.plan9", "pyroute2.ipset")  # the __init__'s
loaded = sorted(m for m in whole if m in sys.modules)
with netlink.session(sys.argv[1]) as nl:
    links = sorted(link.name for link in nl.links())
lean = {"loaded": loaded, "links": links, "looked_up": looked_up}
from pyroute2 import NDB, IPRoute  # anyone else's import of the package: its __init__ runs whole then
lean.update(same=IPRoute is netlink.IPRoute, ndb=NDB.__module__)
print(json.dumps(lean))
"""


def test_netlink_loads_pyroute2_without_its_package_init_and_others_still_get_it_whole(ns: Netns) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LEAN, ns.name], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lean = json.loads(done.stdout)
    assert lean["loaded"] == []  # none of what the package's __init__ would have imported
    assert lean["links"] == ["lo"]  # the namespace was entered (setns with our libc) and read
    assert lean["looked_up"] == []  # pyroute2 did not look for libc with find_library (ldconfig)
    assert lean["same"] is True
    assert lean["ndb"] == "pyroute2.ndb.main"


def test_bridge_is_created_addressed_up_and_left_alone_the_second_time(ns: Netns, cfg: NetworkConfig) -> None:
    first = network.ensure_bridge(cfg)
    link = _link_of(ns, "procurator0")
    second = network.ensure_bridge(cfg)

    assert first == second
    assert first.addresses == ("10.100.0.1/16",)
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in link["flags"]
    assert _link_of(ns, "procurator0")["ifindex"] == link["ifindex"]
    addrs = ns.ip_json("addr", "show", "dev", "procurator0")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [("10.100.0.1", 16)]


def test_bridge_name_taken_by_another_kind_of_interface(ns: Netns, cfg: NetworkConfig) -> None:
    ns.ip("link", "add", "procurator0", "type", "veth", "peer", "name", "other0")

    with pytest.raises(NetworkError, match=r"procurator0 .* is a veth device, not a bridge; remove it"):
        network.ensure_bridge(cfg)


def test_bridge_with_another_address(ns: Netns, cfg: NetworkConfig) -> None:
    ns.ip("link", "add", "procurator0", "type", "bridge")
    ns.ip("addr", "add", "10.200.0.1/24", "dev", "procurator0")

    with pytest.raises(
        NetworkError, match=r"bridge procurator0 has address 10.200.0.1/24, expected 10.100.0.1/16"
    ):
        network.ensure_bridge(cfg)


def test_subnet_overlapping_a_route_of_the_namespace(ns: Netns, cfg: NetworkConfig) -> None:
    ns.ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    ns.ip("link", "set", "lan0", "up")
    ns.ip("link", "set", "lan1", "up")
    ns.ip("route", "add", "10.100.64.0/18", "dev", "lan0")

    with pytest.raises(NetworkError, match=r"subnet 10.100.0.0/16 overlaps route 10.100.64.0/18 dev lan0"):
        network.ensure_bridge(cfg)
    assert ns.link("procurator0") is None  # refused before acting


def test_subnet_overlapping_an_address_of_another_interface(ns: Netns, cfg: NetworkConfig) -> None:
    ns.ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    ns.ip("addr", "add", "10.100.3.7/32", "dev", "lan0")

    with pytest.raises(NetworkError, match=r"overlaps address 10.100.3.7/32 of lan0"):
        network.ensure_bridge(cfg)


def test_missing_namespace_is_a_clear_error() -> None:
    cfg = NetworkConfig(netns="pct-does-not-exist")

    with pytest.raises(NetworkError, match=r"'pct-does-not-exist' does not exist .*\(ip netns add"):
        network.net_status(cfg)


# -- TAPs --------------------------------------------------------------------------------------------------


def test_attach_vm_creates_owned_multiqueue_taps_on_the_bridge(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)

    taps = network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=2)

    assert [t.name for t in taps] == [tap_name("web", "eth0"), tap_name("web", "eth1")]
    for tap in taps:
        link = _link_of(ns, tap.name)
        data = link["linkinfo"]["info_data"]
        assert link["ifalias"] == f"procurator:web:{tap.iface}"
        assert link["master"] == "procurator0"
        assert "UP" in link["flags"]
        assert (data["type"], data["pi"], data["multi_queue"], data["persist"]) == ("tap", False, True, True)
        assert data["user"] in {UID, str(UID), _user_name(UID)}
        assert tap.mac == network.mac_address("web", tap.iface)
    assert network.attach_vm(cfg, "one", ["eth0"], UID, vcpus=1)[0].multi_queue is False
    assert _link_of(ns, tap_name("one", "eth0"))["linkinfo"]["info_data"]["multi_queue"] is False


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def test_attach_is_idempotent_and_a_tap_deleted_behind_our_back_comes_back(
    ns: Netns, cfg: NetworkConfig
) -> None:
    network.ensure_bridge(cfg)
    first = network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=1)
    before = ns.snapshot()

    again = network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=1)
    assert ns.snapshot() == before
    assert [t.created for t in again] == [False, False]
    assert [t.index for t in again] == [t.index for t in first]

    ns.ip("link", "del", first[0].name)
    healed = network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=1)
    assert [t.created for t in healed] == [True, False]
    assert _link_of(ns, first[0].name)["master"] == "procurator0"


def test_tap_taken_off_the_bridge_or_down_is_corrected(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    tap = network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)[0]
    ns.ip("link", "set", tap.name, "nomaster")
    ns.ip("link", "set", tap.name, "down")

    fixed = network.ensure_tap(cfg, tap.name, UID, False, vm="web", iface_id="eth0")

    assert (fixed.created, fixed.master, fixed.up) == (False, "procurator0", True)
    assert _link_of(ns, tap.name)["master"] == "procurator0"


def test_owner_change_recreates_an_unused_tap(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)

    tap = network.attach_vm(cfg, "web", ["eth0"], UID + 1, vcpus=4)[0]

    assert (tap.created, tap.owner_uid, tap.multi_queue) == (True, UID + 1, True)


def test_a_tap_open_by_a_hypervisor_is_never_recreated(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    tap = network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)[0]
    fd = ns.open_tap(tap.name)
    try:
        assert network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)[0].index == tap.index  # same: fine
        with pytest.raises(ConflictError, match=r"open by a running hypervisor .* stop VM 'web'"):
            network.attach_vm(cfg, "web", ["eth0"], UID + 1, vcpus=1)
        assert _link_of(ns, tap.name)["ifindex"] == tap.index
    finally:
        os.close(fd)


def test_tap_name_collision_is_detected_not_shared(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    name = tap_name("alpha", "eth0")
    network.ensure_tap(cfg, name, UID, False, vm="alpha", iface_id="eth0")

    # Force the same name for another (vm, iface), as a hash collision would.
    with pytest.raises(
        ConflictError, match=rf"TAP name {name} of beta:eth0 collides with the TAP of alpha:eth0"
    ):
        network.ensure_tap(cfg, name, UID, False, vm="beta", iface_id="eth0")
    assert _link_of(ns, name)["ifalias"] == "procurator:alpha:eth0"


def test_names_occupied_by_foreign_interfaces_are_refused(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    foreign_tap = tap_name("web", "eth0")
    foreign_veth = tap_name("web", "eth1")
    ns.ip("tuntap", "add", "dev", foreign_tap, "mode", "tap")
    ns.ip("link", "add", foreign_veth, "type", "veth", "peer", "name", "x0")

    with pytest.raises(ConflictError, match=rf"{foreign_tap} .* Procurator did not make .*\(ip link del"):
        network.ensure_tap(cfg, foreign_tap, UID, False, vm="web", iface_id="eth0")
    with pytest.raises(ConflictError, match=rf"{foreign_veth} .* is not a TAP \(kind veth\)"):
        network.ensure_tap(cfg, foreign_veth, UID, False, vm="web", iface_id="eth1")
    with pytest.raises(ConflictError, match="not a Procurator TAP"):
        network.delete_tap(cfg, foreign_tap)
    assert {foreign_tap, foreign_veth} <= ns.link_names()


def test_attach_failure_rolls_back_only_what_it_made(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    kept = network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)[0]
    blocker = tap_name("web", "eth2")
    ns.ip("link", "add", blocker, "type", "veth", "peer", "name", "x0")

    with pytest.raises(ConflictError):
        network.attach_vm(cfg, "web", ["eth0", "eth1", "eth2"], UID, vcpus=1)

    names = ns.link_names()
    assert kept.name in names  # existed before the call: left alone
    assert tap_name("web", "eth1") not in names  # made by the failed call: rolled back
    assert [t.name for t in network.list_taps(cfg)] == [kept.name]


def test_ensure_tap_needs_the_bridge(cfg: NetworkConfig) -> None:
    with pytest.raises(NetworkError, match=r"bridge procurator0 does not exist .*`procurator net up`"):
        network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)


def test_detach_vm_removes_only_that_vms_taps_and_keeps_the_bridge(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    web = network.attach_vm(cfg, "web", ["eth0", "eth1", "eth2"], UID, vcpus=1)
    db = network.attach_vm(cfg, "db", ["eth0"], UID, vcpus=1)

    removed = network.detach_vm(cfg, "web")

    assert sorted(removed) == sorted(t.name for t in web)
    assert network.detach_vm(cfg, "web") == []
    assert [(t.vm, t.name) for t in network.list_taps(cfg)] == [("db", db[0].name)]
    assert ns.link("procurator0") is not None
    assert network.delete_tap(cfg, db[0].name) is True
    assert network.delete_tap(cfg, db[0].name) is False


def _neighbours(ns: Netns) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", ns.name, "-j", "neigh", "show", "dev", "procurator0"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    return [n for n in json.loads(out or "[]") if n.get("dst")]


def test_the_guests_address_is_pinned_to_its_mac_until_detach(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=1, ip="10.100.0.7")
    network.attach_vm(cfg, "db", ["eth0"], UID, vcpus=1, ip="10.100.0.8", mac="02:00:00:00:00:42")
    # again, as a restart does: the entry is replaced, never doubled
    network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=1, ip="10.100.0.7")

    pinned = {n["dst"]: (n["lladdr"], n["state"]) for n in _neighbours(ns)}
    assert pinned == {
        "10.100.0.7": (network.mac_address("web", "eth0"), ["PERMANENT"]),
        "10.100.0.8": ("02:00:00:00:00:42", ["PERMANENT"]),
    }

    network.detach_vm(cfg, "web", ip="10.100.0.7")
    assert [n["dst"] for n in _neighbours(ns)] == ["10.100.0.8"]
    network.detach_vm(cfg, "web", ip="10.100.0.7")  # nothing left to remove: no error
    network.detach_vm(cfg, "db", ip="10.100.0.8")
    assert _neighbours(ns) == []


def test_isolation_flag_is_set_and_converged(ns: Netns, cfg: NetworkConfig) -> None:
    isolated = NetworkConfig(netns=cfg.netns, isolate=True)
    network.net_up(isolated)
    tap = network.attach_vm(isolated, "web", ["eth0"], UID, vcpus=1)[0]
    assert tap.isolated is True
    assert _link_of(ns, tap.name)["linkinfo"]["info_slave_data"]["isolated"] is True

    status = network.net_up(cfg)

    assert [t.isolated for t in status.taps] == [False]
    assert _link_of(ns, tap.name)["linkinfo"]["info_slave_data"]["isolated"] is False


# -- crash safety ------------------------------------------------------------------------------------------

CHILD = """
import sys, time
from procurator import network
from procurator.net import netlink

netns, vm, iface, stop_at = sys.argv[1:5]

def hook(step):
    if step == stop_at:
        print("at", step, flush=True)
        time.sleep(60)

netlink.STEP_HOOK = hook
cfg = network.NetworkConfig(netns=netns)
network.ensure_tap(cfg, network.tap_name(vm, iface), 1000, False, vm=vm, iface_id=iface)
print("done", flush=True)
"""


def _run_child_until(ns: Netns, step: str) -> None:
    """Run ensure_tap in a child process, wait (bounded) until it reaches `step`, then SIGKILL it."""
    child = process.spawn(
        [sys.executable, "-c", CHILD, ns.name, "web", "eth0", step],
        stdout=subprocess.PIPE,
        env={"PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert child.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(child.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            line = b""
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise AssertionError(f"child did not reach {step} within 30 s")
                chunk = os.read(child.stdout.fileno(), 1)
                if not chunk:
                    raise AssertionError(f"child exited (rc={child.wait(5)}) before reaching {step}")
                line += chunk
        assert line.decode().strip() == f"at {step}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()


@pytest.mark.parametrize("step", ["tap-created", "tap-configured"])
def test_crash_before_the_tap_is_recorded_leaves_nothing(ns: Netns, cfg: NetworkConfig, step: str) -> None:
    network.ensure_bridge(cfg)
    name = tap_name("web", "eth0")

    _run_child_until(ns, step)

    # The TAP was not yet persistent: the kernel removed it when the killed process's descriptor closed.
    deadline = time.monotonic() + 5
    while name in ns.link_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in ns.link_names()
    tap = network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)[0]
    assert (tap.name, tap.created, tap.master) == (name, True, "procurator0")


def test_crash_after_the_tap_is_recorded_is_adopted(ns: Netns, cfg: NetworkConfig) -> None:
    network.ensure_bridge(cfg)
    name = tap_name("web", "eth0")

    _run_child_until(ns, "tap-persistent")

    assert _link_of(ns, name)["ifalias"] == "procurator:web:eth0"
    tap = network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)[0]
    assert (tap.name, tap.created) == (name, False)


# -- whole network: idempotence, teardown, NAT -------------------------------------------------------------


@contextlib.contextmanager
def _world(ns: Netns) -> Iterator[tuple[Netns, Netns]]:
    """An uplink peer namespace (veth up0 <-> eth0, 192.0.2.0/24) and a 'VM' namespace on the bridge."""
    with throwaway_netns("pcp") as peer, throwaway_netns("pcv") as vm:
        veth(ns, "up0", peer, "eth0")
        ns.ip("addr", "add", "192.0.2.1/24", "dev", "up0")
        peer.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
        peer.ip("link", "set", "lo", "up")
        yield peer, vm


def test_everything_twice_changes_nothing_and_down_leaves_nothing(ns: Netns) -> None:
    with _world(ns):
        cfg = NetworkConfig(netns=ns.name, uplink="up0", nat=True)
        empty = ns.snapshot()
        tables_before = ns.nft_tables()

        network.net_up(cfg)
        network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=2)
        network.attach_vm(cfg, "db", ["eth0"], UID, vcpus=1)
        once = ns.snapshot()
        handle = _table_handle(ns)
        network.net_up(cfg)
        network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=2)
        network.attach_vm(cfg, "db", ["eth0"], UID, vcpus=1)
        assert ns.snapshot() == once
        assert _table_handle(ns) == handle  # measured equal: not even re-applied

        status = network.net_down(cfg)
        network.net_down(cfg)

        assert not status.taps
        assert not status.bridge.present
        assert not status.nat.table_present
        after = ns.snapshot()
        after["ip_forward"] = empty["ip_forward"]  # turned on by net_up and deliberately left on
        assert after == empty
        assert ns.nft_tables() == tables_before == []


def test_net_up_without_nat_measures_the_table_once_and_still_removes_one_left_behind(
    ns: Netns, cfg: NetworkConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = nft._run

    def counted(netns: str | None, args: list[str], **kw: Any) -> str:
        calls.append(args)
        return real(netns, args, **kw)

    monkeypatch.setattr(nft, "_run", counted)
    assert not network.net_up(cfg).nat.table_present
    assert calls == [["-j", "list", "tables"]]  # one nft process, not one per question
    ns.exec("nft", "add", "table", "inet", "procurator")  # left by a configuration with NAT
    calls.clear()
    status = network.net_up(cfg)
    assert not status.nat.table_present  # measured again after removing it
    assert ns.nft_tables() == []
    assert calls.count(["-j", "list", "tables"]) == 3  # before, in table_rules, and after the removal


def _table_handle(ns: Netns) -> int:
    data = json.loads(ns.exec("nft", "-j", "list", "tables"))
    return next(int(t["table"]["handle"]) for t in data["nftables"] if "table" in t)


def _source_seen_by_peer(peer: Netns, vm: Netns) -> str:
    """Connect from the 'VM' namespace to a server in the peer namespace; the source address it saw."""
    with peer.socket() as server, vm.socket() as client:
        server.bind(("192.0.2.2", 0))
        server.listen(1)
        server.settimeout(5)
        client.settimeout(5)
        client.connect(("192.0.2.2", server.getsockname()[1]))
        conn, (addr, _port) = server.accept()
        conn.close()
        return str(addr)


def test_nat_masquerades_vm_traffic_out_of_the_uplink(ns: Netns) -> None:
    host_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with _world(ns) as (peer, vm):
        cfg = NetworkConfig(netns=ns.name, uplink="up0", nat=True)
        status = network.net_up(cfg)

        assert (status.nat.table_present, status.nat.masquerade, status.nat.ip_forward) == (True, True, True)
        rules = json.loads(ns.exec("nft", "-j", "list", "table", "inet", "procurator"))["nftables"]
        masq = [r["rule"] for r in rules if "rule" in r and any("masquerade" in e for e in r["rule"]["expr"])]
        assert len(masq) == 1
        assert masq[0]["chain"] == "postrouting"
        text = json.dumps(masq[0]["expr"])
        assert '"addr": "10.100.0.0", "len": 16' in text
        assert '"right": "up0"' in text

        # A stand-in for a VM: a veth with a subnet address at its far end (in `vm`), near end on the bridge.
        veth(ns, "vmport", vm, "eth0")
        ns.ip("link", "set", "vmport", "master", "procurator0")
        vm.ip("addr", "add", "10.100.0.2/16", "dev", "eth0")
        vm.ip("route", "add", "default", "via", "10.100.0.1")

        assert _source_seen_by_peer(peer, vm) == "192.0.2.1"

        # Routed (no NAT): the peer sees the VM's own address once it has a route back.
        routed = network.net_up(NetworkConfig(netns=ns.name, uplink="up0", nat=False))
        assert (routed.nat.table_present, routed.nat.masquerade) == (True, False)
        peer.ip("route", "add", "10.100.0.0/16", "via", "192.0.2.1")
        assert _source_seen_by_peer(peer, vm) == "10.100.0.2"

        # Dropping the uplink from the config removes the table on the next net up.
        assert network.net_up(NetworkConfig(netns=ns.name)).nat.table_present is False
        assert ns.nft_tables() == []
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forward


def test_missing_uplink_is_a_clear_error(ns: Netns) -> None:
    cfg = NetworkConfig(netns=ns.name, uplink="wan9", nat=True)

    with pytest.raises(NetworkError, match=r"uplink wan9 does not exist .* network.uplink"):
        network.net_up(cfg)


def test_status_reports_bridge_taps_and_nat_as_json(ns: Netns, cfg: NetworkConfig) -> None:
    assert network.net_status(cfg).bridge.present is False
    network.net_up(cfg)
    network.attach_vm(cfg, "web", ["eth0"], UID, vcpus=1)

    data = network.net_status(cfg).to_json()

    assert json.loads(json.dumps(data)) == data
    assert data["bridge"] == {
        "name": "procurator0",
        "present": True,
        "kind": "bridge",
        "up": True,
        "addresses": ["10.100.0.1/16"],
    }
    assert [(t["vm"], t["iface"], t["master"], t["up"]) for t in data["taps"]] == [
        ("web", "eth0", "procurator0", True)
    ]
    assert data["nat"]["tablePresent"] is False


def test_bulk_teardown_of_many_taps_spares_what_is_not_ours(ns: Netns, cfg: NetworkConfig) -> None:
    network.net_up(cfg)
    for i in range(60):
        network.attach_vm(cfg, f"vm{i}", ["eth0"], UID, vcpus=1)
    ns.ip("tuntap", "add", "dev", "foreign0", "mode", "tap")
    ns.ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
    ns.ip("link", "set", "lan0", "master", "procurator0")
    assert len(network.list_taps(cfg)) == 60

    network.net_down(cfg)  # its speed is measured in benchmarks/bench_network.py

    assert ns.link_names() == {"lo", "foreign0", "lan0", "lan1"}


def test_host_namespace_interfaces_are_untouched() -> None:
    """Guard: the test session never creates anything named like ours in the host namespace."""
    host_links = process.run(["ip", "-j", "link", "show"], timeout=10).stdout
    names = {link["ifname"] for link in json.loads(host_links)}
    assert not any(n.startswith("pc-") or n == "procurator0" for n in names)
    assert socket.if_nameindex()  # the host namespace is readable, and we only read it


def test_fast_link_decoder_agrees_with_pyroute2(ns: Netns, cfg: NetworkConfig) -> None:
    """The chokepoint reads link attributes itself (for speed); pyroute2's full decoder must agree."""
    isolated = NetworkConfig(netns=ns.name, isolate=True)
    network.net_up(isolated)
    network.attach_vm(isolated, "web", ["eth0"], UID, vcpus=4)
    ns.ip("tuntap", "add", "dev", "plain0", "mode", "tap")
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ns.ip("link", "set", "v0", "alias", "someone else's", "group", "7", "master", "procurator0", "up")

    with Netlink(ns.name) as nl:
        ours = {link.name: link for link in nl.links()}
    with IPRoute(netns=ns.name, flags=0) as ipr:
        theirs = list(ipr.link("dump"))

    assert set(ours) == {m.get_attr("IFLA_IFNAME") for m in theirs}
    for msg in theirs:
        link = ours[msg.get_attr("IFLA_IFNAME")]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        assert link.index == msg["index"]
        assert link.kind == kind
        assert link.alias == msg.get_attr("IFLA_IFALIAS")
        assert link.mac == msg.get_attr("IFLA_ADDRESS")
        assert link.group == msg.get_attr("IFLA_GROUP")
        assert link.master == msg.get_attr("IFLA_MASTER")
        assert link.operstate == msg.get_attr("IFLA_OPERSTATE")
        if kind == "tun":
            data = info.get_attr("IFLA_INFO_DATA")
            owner = data.get_attr("IFLA_TUN_OWNER")
            assert link.tun is not None
            assert link.tun.owner == (None if owner in (None, 0xFFFFFFFF) else owner)
            assert link.tun.multi_queue == bool(data.get_attr("IFLA_TUN_MULTI_QUEUE"))
            assert link.tun.persist == bool(data.get_attr("IFLA_TUN_PERSIST"))
            assert link.tun.tap == (data.get_attr("IFLA_TUN_TYPE") == 2)
            assert link.tun.queues == (data.get_attr("IFLA_TUN_NUM_QUEUES") or 0)
            assert link.tun.attached == bool(msg.get_attr("IFLA_CARRIER"))
        if info and info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge":
            port = info.get_attr("IFLA_INFO_SLAVE_DATA")
            assert link.isolated == bool(port.get_attr("IFLA_BRPORT_ISOLATED"))
        else:
            assert link.isolated is None
    web = ours[tap_name("web", "eth0")]
    assert (web.isolated, web.alias, web.master) == (True, "procurator:web:eth0", ours["procurator0"].index)
    assert web.tun is not None
    assert (web.tun.owner, web.tun.multi_queue) == (UID, True)
    assert (ours["v0"].alias, ours["v0"].group, ours["v0"].isolated) == ("someone else's", 7, False)
    assert ours["plain0"].tun is not None
    assert ours["plain0"].tun.owner is None


def test_detach_by_recorded_names_removes_only_that_vms_taps(ns: Netns, cfg: NetworkConfig) -> None:
    network.net_up(cfg)
    web = [t.name for t in network.attach_vm(cfg, "web", ["eth0", "eth1"], UID, vcpus=1)]
    api = [t.name for t in network.attach_vm(cfg, "api", ["eth0"], UID, vcpus=1)]
    # a name the record lists that is not (or no longer) a TAP of this VM is left alone
    assert network.detach_vm(cfg, "web", [*web, api[0], "pc-nothere"]) == web
    assert {t.name for t in network.list_taps(cfg)} == set(api)
    assert network.detach_vm(cfg, "web", web) == []  # idempotent
