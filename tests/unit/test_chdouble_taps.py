"""The double's TAP rules at vm.boot (tests/chdouble/tap.py), against real TAPs in a throwaway network
namespace: the double runs there (`ip netns exec`, so its /sys is the namespace's) as root or as `nobody`,
and the kernel decides, as it does for cloud-hypervisor. Nothing here touches the host's interfaces."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from procurator import process
from procurator.errors import HypervisorApiError
from procurator.hypervisor.api import ApiClient
from procurator.net import netlink
from tests.chdouble import BINARY, sample_config
from tests.chdouble.tap import TUNGETIFF, ChainError, TapOpener
from tests.support.netns import Netns, throwaway_netns
from tests.support.tundev import open_tun_for_everyone

E = "Error from API"
BOOT = [E, "The VM could not boot", "Error from device manager", "Cannot create virtio-net device"]
OPEN = [*BOOT, "Failed to open taps", "Open tap device failed", "Unable to configure tap interface"]
NOBODY = pwd.getpwnam("nobody")
TAP = "pct-tap0"
WAIT = 10.0


@dataclass
class Double:
    """A double process serving `socket` inside `ns`."""

    ns: Netns
    root: Path
    proc: subprocess.Popen[bytes]
    client: httpx.Client

    def create(self, **net: Any) -> None:
        kernel = self.root / "kernel"
        config = sample_config(self.root, kernel, tap=TAP)
        config["net"][0].update(net)
        # one vCPU per queue pair, as nix/lib gives: VmConfig::validate refuses more pairs than boot vCPUs
        vcpus = max(1, int(net.get("num_queues", 2)) // 2)
        config["cpus"] = {"boot_vcpus": vcpus, "max_vcpus": vcpus}
        assert self.client.put("vm.create", json=config).status_code == 204

    def state(self) -> str:
        return str(self.client.get("vm.info").json()["state"])

    def queues(self) -> tuple[int, int]:
        """(queues the kernel shows attached, descriptors this double holds on the TAP)."""
        return attached(self.ns), queues_held(self.proc.pid)

    def log(self) -> str:
        return (self.root / "ch.log").read_text()


@pytest.fixture
def ns() -> Iterator[Netns]:
    with throwaway_netns("pct") as made:
        yield made


def add_tap(ns: Netns, *, owner: int, multi_queue: bool = False, up: bool = True, name: str = TAP) -> None:
    ns.ip("tuntap", "add", "dev", name, "mode", "tap", "user", str(owner), *(["multi_queue"] * multi_queue))
    if up:
        ns.ip("link", "set", name, "up")


def attached(ns: Netns, name: str = TAP) -> int:
    """Queues attached to the TAP, as the kernel reports them: IFLA_TUN_NUM_QUEUES for a multi-queue TAP
    (the kernel sends it only for those); for a single-queue one, its carrier (on while a queue is open)."""
    data = tun(ns, name)
    if data["multi_queue"]:
        return int(data["numqueues"])
    link = ns.link(name)
    assert link is not None
    assert "UP" in link["flags"], "a down TAP shows no carrier either way"
    return 1 if "LOWER_UP" in link["flags"] else 0


def queues_held(pid: int, name: str = TAP) -> int:
    """The process's descriptors attached to TAP `name` (tun's fdinfo names the interface: `iff:`)."""
    held = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            held += f"iff:\t{name}\n" in info.read_text()
    return held


def tun(ns: Netns, name: str = TAP) -> dict[str, Any]:
    link = ns.link(name)
    assert link is not None, f"no link {name} in {ns.name}"
    data: dict[str, Any] = link["linkinfo"]["info_data"]
    return data


@contextlib.contextmanager
def double(ns: Netns, *, as_nobody: bool, tun: bool = True, **env: str) -> Iterator[Double]:
    """Spawn the double in `ns` (as `nobody`: setpriv drops every capability with root's uid, and the
    double gets a 0666 /dev/net/tun, as on a host with udev, unless not `tun`: then this host's, root's
    alone) and wait, bounded, until it answers."""
    with tempfile.TemporaryDirectory(prefix="pct-double-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        (root / "kernel").write_bytes(b"not really a kernel")
        (root / "kernel").chmod(0o644)
        if as_nobody:
            os.chown(root, NOBODY.pw_uid, NOBODY.pw_gid)
        sock = root / "api.sock"
        drop: list[str] = []
        if as_nobody:  # in the mount namespace `ip netns exec` makes; see tests/support/tundev.py
            (root / "dev").mkdir()
            setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
            drop = open_tun_for_everyone(root / "dev", setpriv) if tun else setpriv
        argv = ["ip", "netns", "exec", ns.name, *drop, str(BINARY), "--api-socket", f"path={sock}",
                "--log-file", str(root / "ch.log"), "-v"]  # fmt: skip
        # `nobody` cannot reach the virtualenv (under /root): the system python3 runs it, without jsonschema
        knobs = {"CHDOUBLE_VALIDATE": "0", "CHDOUBLE_PYTHON": "/usr/bin/python3"} if as_nobody else {}
        with (root / "stderr").open("wb") as stderr:
            proc = process.spawn(argv, stdout=stderr, stderr=stderr, env={**knobs, **env})
        try:
            deadline = time.monotonic() + WAIT
            while not sock.exists():
                assert proc.poll() is None, (root / "stderr").read_text()
                assert time.monotonic() < deadline, "the double never bound its socket"
                time.sleep(0.02)
            transport = httpx.HTTPTransport(uds=str(sock))
            with httpx.Client(
                transport=transport, base_url="http://localhost/api/v1/", timeout=WAIT
            ) as client:
                yield Double(ns, root, proc, client)
        finally:
            proc.kill()
            proc.wait(timeout=WAIT)


@pytest.mark.parametrize(("num_queues", "multi_queue"), [(2, False), (4, True), (8, True)])
def test_owned_tap_boots_with_every_queue_attached_until_the_vm_is_dropped(
    ns: Netns, num_queues: int, multi_queue: bool
) -> None:
    add_tap(ns, owner=NOBODY.pw_uid, multi_queue=multi_queue)
    with double(ns, as_nobody=True) as ch:
        ch.create(num_queues=num_queues)
        assert ch.queues() == (0, 0)
        assert ch.client.put("vm.boot").status_code == 204
        assert ch.state() == "Running"
        assert ch.queues() == (num_queues // 2, num_queues // 2)
        assert tun(ns)["vnet_hdr"] is True  # TUNSETIFF with IFF_VNET_HDR
        assert f"Tap {TAP} already exists. IP configuration will not be overwritten." in ch.log()
        assert ch.client.put("vm.reboot").status_code == 204  # the old VM's queues close, the new one's open
        assert ch.queues() == (num_queues // 2, num_queues // 2)
        assert ch.client.put("vm.shutdown").status_code == 204
        assert ch.queues() == (0, 0)
        assert ch.client.put("vm.boot").status_code == 204
        assert ch.queues() == (num_queues // 2, num_queues // 2)
        assert ch.client.put("vm.delete").status_code == 204
        assert ch.queues() == (0, 0)


@pytest.mark.parametrize(
    ("multi_queue", "num_queues", "side"),
    [(True, 2, "no support device side"), (False, 4, "no support TAP side")],
)
def test_queue_flag_mismatch_refuses_the_boot(
    ns: Netns, multi_queue: bool, num_queues: int, side: str
) -> None:
    add_tap(ns, owner=NOBODY.pw_uid, multi_queue=multi_queue)
    with double(ns, as_nobody=True) as ch:
        ch.create(num_queues=num_queues)
        answer = ch.client.put("vm.boot")
        assert answer.status_code == 500
        assert answer.json() == [
            *BOOT,
            "Failed to open taps",
            f"Error related to the multiqueue support ({side})",
        ]
        assert ch.state() == "Created"
        assert ch.queues() == (0, 0)


def test_tap_of_another_user_without_cap_net_admin_is_refused_by_the_kernel(ns: Netns) -> None:
    add_tap(ns, owner=0)
    with double(ns, as_nobody=True) as ch:
        ch.create()
        answer = ch.client.put("vm.boot")
        assert answer.status_code == 500
        assert answer.json() == [*OPEN, "Operation not permitted (os error 1)"]
        assert ch.state() == "Created"
        assert ch.queues() == (0, 0)
        assert "HTTP API error response: Error from API: The VM could not boot: " in ch.log()


def test_missing_tap_needs_cap_net_admin_to_be_created(ns: Netns) -> None:
    with double(ns, as_nobody=True) as ch:
        ch.create()
        answer = ch.client.put("vm.boot")
        assert answer.json() == [*OPEN, "Operation not permitted (os error 1)"]
    assert TAP not in ns.link_names()
    # root: TUNSETIFF creates it (not persistent), set_ip_addr gives it the address, enable() ups it; our
    # schema of the API has no `ip`/`mask` (Procurator never sends them), so validation is off
    with double(ns, as_nobody=False, CHDOUBLE_VALIDATE="0") as ch:
        ch.create(ip="10.9.8.1", mask="255.255.255.0")
        assert ch.client.put("vm.boot").status_code == 204
        link = ns.link(TAP)
        assert link is not None
        assert "UP" in link["flags"]
        assert ch.queues() == (1, 1)
        assert tun(ns)["persist"] is False
        assert [
            (a["local"], a["prefixlen"]) for a in ns.ip_json("-4", "addr", "show", "dev", TAP)[0]["addr_info"]
        ] == [("10.9.8.1", 24)]
        assert ch.client.put("vm.shutdown").status_code == 204
        assert TAP not in ns.link_names()  # the last queue closed: the kernel removed it


@pytest.mark.parametrize(("release", "address"), [("48", [("192.168.249.1", 24)]), ("49", [])])
def test_a_created_tap_gets_the_default_address_only_up_to_v48(
    ns: Netns, release: str, address: list[tuple[str, int]]
) -> None:
    with double(ns, as_nobody=False, CHDOUBLE_VERSION=release) as ch:
        ch.create()
        assert ch.client.put("vm.boot").status_code == 204
        got = ns.ip_json("-4", "addr", "show", "dev", TAP)
        assert [(a["local"], a["prefixlen"]) for entry in got for a in entry["addr_info"]] == address
        warned = "Deprecation warning: No IP address provided." in ch.log()
        assert warned is (release == "48")


def test_root_attaches_to_another_users_tap_and_brings_a_down_tap_up(ns: Netns) -> None:
    add_tap(ns, owner=NOBODY.pw_uid, up=False)
    with double(ns, as_nobody=False) as ch:
        ch.create()
        assert ch.client.put("vm.boot").status_code == 204
        link = ns.link(TAP)
        assert link is not None
        assert "UP" in link["flags"]
        assert ch.queues() == (1, 1)


@pytest.mark.parametrize(
    ("release", "ioctl"),
    [
        ("53", ["Ioctl failed (35092)"]),
        ("52", ["ioctl (35092) failed: Operation not permitted (os error 1)"]),
    ],
)
def test_a_down_tap_cannot_be_enabled_without_cap_net_admin(
    ns: Netns, release: str, ioctl: list[str]
) -> None:
    add_tap(ns, owner=NOBODY.pw_uid, up=False)
    with double(ns, as_nobody=True, CHDOUBLE_VERSION=release) as ch:
        ch.create()
        answer = ch.client.put("vm.boot")
        enabling = [*BOOT, "Failed to open taps", "Enabling tap interface failed"]
        assert answer.json() == [*enabling, *ioctl, "Operation not permitted (os error 1)"]
        assert queues_held(ch.proc.pid) == 0  # the queue opened before enable() was closed again


def test_a_single_queue_tap_in_use_is_busy(ns: Netns) -> None:
    add_tap(ns, owner=NOBODY.pw_uid)
    with double(ns, as_nobody=True) as first, double(ns, as_nobody=True) as second:
        first.create()
        assert first.client.put("vm.boot").status_code == 204
        second.create()
        answer = second.client.put("vm.boot")
        assert answer.json() == [*OPEN, "Device or resource busy (os error 16)"]
        assert first.queues() == (1, 1)
        assert queues_held(second.proc.pid) == 0
        first.proc.kill()  # its descriptors close with the process
        first.proc.wait(timeout=WAIT)
        assert second.client.put("vm.boot").status_code == 204
        assert second.queues() == (1, 1)


def test_an_over_long_tap_name_is_refused_before_any_descriptor_is_opened() -> None:
    opener = TapOpener(53, lambda _where, _what: None)
    with pytest.raises(ChainError) as refused:
        opener.open_tap({"tap": "a-name-of-16-chr"})
    assert refused.value.error.chain() == [
        "Open tap device failed",
        "Interface name too long (max length is 15): a-name-of-16-chr",
    ]
    assert refused.value.error.debug() == 'TapOpen(IfnameTooLong("a-name-of-16-chr"))'


# --- TAPs handed over as descriptors (vm.add-net with SCM_RIGHTS, Net::from_tap_fds) -------------------


def hand(ch: Double, ns: Netns, num_queues: int, fds: list[int] | None = None) -> Any:
    """vm.add-net for TAP's queues, opened here (as Procurator opens them) and sent with the request."""
    net = {"id": "eth0", "num_queues": num_queues}
    with netlink.session(ns.name) as nl:
        queues = fds if fds is not None else nl.open_tap(TAP, num_queues // 2)
    try:
        with ApiClient(ch.root / "api.sock") as api:
            return api.put_with_fds("vm.add-net", net, queues)
    finally:
        for fd in queues:
            os.close(fd)


def create_without_nets(ch: Double, vcpus: int) -> None:
    config = sample_config(ch.root, ch.root / "kernel", tap=TAP)
    del config["net"]
    config["cpus"] = {"boot_vcpus": vcpus, "max_vcpus": vcpus}
    assert ch.client.put("vm.create", json=config).status_code == 204


@pytest.mark.parametrize(("num_queues", "multi_queue"), [(2, False), (4, True)])
def test_handed_queues_boot_a_double_that_cannot_open_dev_net_tun(
    ns: Netns, num_queues: int, multi_queue: bool
) -> None:
    add_tap(ns, owner=0, multi_queue=multi_queue)  # root's TAP, and /dev/net/tun root's alone: no way by name
    with double(ns, as_nobody=True, tun=False) as ch:
        create_without_nets(ch, num_queues // 2)
        assert hand(ch, ns, num_queues) is None  # 204: added to the config of a VM not booted
        assert ch.queues() == (num_queues // 2, num_queues // 2)  # ours are closed, the double holds them
        assert ch.client.put("vm.boot").status_code == 204
        assert ch.state() == "Running"
        assert ch.queues() == (num_queues // 2, num_queues)  # from_tap_fds dup()s each
        assert "Creating virtio-net device: NetConfig { tap: None, fds: Some([" in ch.log()
        net = ch.client.get("vm.info").json()["config"]["net"][0]
        assert "tap" not in net
        assert len(net["fds"]) == num_queues // 2
        assert ch.client.put("vm.shutdown").status_code == 204
        assert ch.queues() == (num_queues // 2, num_queues // 2)  # the config keeps the ones it was sent
        assert ch.client.put("vm.delete").status_code == 204
        assert ch.queues() == (0, 0)


def test_handed_queues_must_match_num_queues(ns: Netns) -> None:
    add_tap(ns, owner=0, multi_queue=True)
    with double(ns, as_nobody=False) as ch:
        create_without_nets(ch, 2)
        with netlink.session(ns.name) as nl:
            first, second = nl.open_tap(TAP, 2)
        os.close(second)
        one = [first]  # one queue for two pairs
        with pytest.raises(HypervisorApiError) as refused:
            hand(ch, ns, 4, one)
        assert refused.value.details[-3:] == (
            "The network device could not be added to the VM",
            "Failed to validate config",
            "Number of queues (4) to virtio_net does not match the number of FDs (2)",
        )
        assert ch.queues() == (0, 0)  # dropped with the request
        assert "net" not in ch.client.get("vm.info").json()["config"]


def test_a_handed_descriptor_that_is_no_tap_fails_the_boot(ns: Netns, tmp_path: Path) -> None:
    with double(ns, as_nobody=False) as ch:
        create_without_nets(ch, 1)
        fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
        assert hand(ch, ns, 2, [fd]) is None
        answer = ch.client.put("vm.boot")
        assert answer.status_code == 500
        assert answer.json()[:7] == [
            *BOOT[:2], "Error from device manager", "Cannot create virtio-net device", "Using existing tap",
            f"Ioctl failed ({TUNGETIFF})", "Inappropriate ioctl for device (os error 25)",
        ]  # fmt: skip
        assert ch.state() == "Created"
