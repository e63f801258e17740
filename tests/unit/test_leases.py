"""IP leases: stable per VM name, persisted atomically, never the gateway, network or broadcast address."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from procurator.errors import DamagedStateError, LeaseExhaustedError, StateError, ValidationError
from procurator.net.leases import REBUILD_FIX
from procurator.network import Lease, Leases, NetworkConfig, mac_address


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "leases.json"


def test_first_lease_is_the_first_host_after_the_gateway(path: Path) -> None:
    lease = Leases(path, NetworkConfig()).acquire("web")

    assert lease == Lease("10.100.0.2", mac_address("web", "eth0"))


def test_acquire_is_stable_across_calls_and_reloads(path: Path) -> None:
    leases = Leases(path, NetworkConfig())
    web = leases.acquire("web")
    db = leases.acquire("db")

    assert leases.acquire("web") == web
    reloaded = Leases(path, NetworkConfig())
    assert reloaded.acquire("web") == web
    assert reloaded.get("db") == db
    assert web.ip != db.ip


def test_file_format(path: Path) -> None:
    Leases(path, NetworkConfig()).acquire("web", mac="02:00:00:00:00:01")

    assert json.loads(path.read_text()) == {
        "schema": 1,
        "subnet": "10.100.0.0/16",
        "leases": {"web": {"ip": "10.100.0.2", "mac": "02:00:00:00:00:01"}},
    }
    assert [p.name for p in path.parent.iterdir()] == ["leases.json"]  # no temp file left behind


def test_release_frees_the_address_for_reuse(path: Path) -> None:
    leases = Leases(path, NetworkConfig())
    a = leases.acquire("a")
    leases.acquire("b")

    assert leases.release("a") is True
    assert leases.release("a") is False
    assert Leases(path, NetworkConfig()).get("a") is None
    assert leases.acquire("c").ip == a.ip


def test_a_new_mac_updates_the_lease_but_keeps_the_address(path: Path) -> None:
    leases = Leases(path, NetworkConfig())
    first = leases.acquire("web")

    updated = leases.acquire("web", mac="02:aa:bb:cc:dd:ee")

    assert updated == Lease(first.ip, "02:aa:bb:cc:dd:ee")
    assert Leases(path, NetworkConfig()).get("web") == updated
    with pytest.raises(ValidationError, match="not a lower-case MAC"):
        leases.acquire("web", mac="02:AA:BB:CC:DD:EE")


def test_gateway_network_and_broadcast_are_never_handed_out(path: Path) -> None:
    cfg = NetworkConfig(subnet="192.168.7.0/29", gateway="192.168.7.4")
    leases = Leases(path, cfg)

    ips = [leases.acquire(f"vm{i}").ip for i in range(5)]  # 8 addresses: network, broadcast, gateway

    assert sorted(ips) == ["192.168.7.1", "192.168.7.2", "192.168.7.3", "192.168.7.5", "192.168.7.6"]
    with pytest.raises(LeaseExhaustedError) as info:
        leases.acquire("one-too-many")
    message = str(info.value)
    assert "no free address left in 192.168.7.0/29" in message
    assert "network.subnet" in message
    assert "procurator down --purge" in message


def test_1000_leases_allocate_and_reload(path: Path) -> None:
    # Speed is measured in benchmarks/bench_network.py; here only what is allocated and reloaded.
    leases = Leases(path, NetworkConfig())
    for i in range(100):
        leases.acquire(f"vm-{i}")  # each one written (atomically, fsynced) before it is returned
    for i in range(1000):  # the first 100 are kept, 900 added
        leases.acquire(f"vm-{i}")

    reloaded = Leases(path, NetworkConfig())

    assert len(reloaded) == 1000
    assert reloaded.all() == leases.all()
    ips = {IPv4Address(lease.ip) for lease in reloaded.all().values()}
    assert len(ips) == 1000
    assert all(ip in IPv4Network("10.100.0.0/16") and ip != IPv4Address("10.100.0.1") for ip in ips)
    assert reloaded.acquire("vm-7") == leases.get("vm-7")


def test_leases_outside_a_changed_subnet_are_reallocated(path: Path) -> None:
    Leases(path, NetworkConfig()).acquire("web")

    moved = Leases(path, NetworkConfig(subnet="172.30.0.0/24"))

    assert moved.get("web") is None
    assert moved.acquire("web").ip == "172.30.0.2"


def test_a_missing_file_is_rebuilt_from_the_records_before_a_new_lease(path: Path) -> None:
    held = {"web": "10.100.0.2", "api": "10.100.0.3", "far": "192.168.9.9", "bad": "10.100.0"}
    leases = Leases(path, NetworkConfig(), recorded=lambda: held)

    assert set(leases.all()) == {"api", "web"}
    assert leases.acquire("new").ip == "10.100.0.4"  # neither web's nor api's
    on_disk = json.loads(path.read_text())["leases"]
    assert on_disk["api"] == {"ip": "10.100.0.3", "mac": mac_address("api", "eth0")}  # as acquire gives
    assert Leases(path, NetworkConfig(), recorded=dict).get("new") == leases.get("new")


def test_an_existing_file_is_not_rebuilt(path: Path) -> None:
    Leases(path, NetworkConfig()).acquire("web")
    calls: list[int] = []

    def recorded() -> dict[str, str]:
        calls.append(1)
        return {}

    Leases(path, NetworkConfig(), recorded=recorded)

    assert calls == []


def test_damaged_file_is_a_state_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    with pytest.raises(StateError, match="damaged state file"):
        Leases(path, NetworkConfig())


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"schema": 2, "leases": {}}, "schema"),
        ({"schema": 1, "leases": []}, "leases"),
        (
            {"schema": 1, "leases": {"web": {"ip": "10.100.0.300", "mac": "02:00:00:00:00:01"}}},
            "leases.web.ip",
        ),
        ({"schema": 1, "leases": {"web": {"ip": "10.100.0.3", "mac": "nope"}}}, "leases.web.mac"),
        (
            {
                "schema": 1,
                "leases": {
                    "a": {"ip": "10.100.0.3", "mac": "02:00:00:00:00:01"},
                    "b": {"ip": "10.100.0.3", "mac": "02:00:00:00:00:02"},
                },
            },
            "leases.b.ip",
        ),
    ],
)
def test_invalid_file_names_the_field(path: Path, content: object, field: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(content))

    with pytest.raises(DamagedStateError) as info:
        Leases(path, NetworkConfig())
    assert info.value.path == path
    assert info.value.problem.startswith(f"{field}: ")
    assert info.value.fix == REBUILD_FIX


def test_unwritable_directory_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(StateError):
        Leases(blocker / "leases.json", NetworkConfig()).acquire("web")
