"""The double's copy of cloud-hypervisor's `VmConfig::validate` (tests/chdouble/validate.py): each rule
refuses at vm.boot with the real status and chain, by release; Procurator's own configs pass."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procurator.hypervisor.base import LaunchSpec
from procurator.hypervisor.cloud_hypervisor import wire_config
from procurator.models import Bundle
from procurator.runtime import GuestAddress, NicBinding, runtime_config
from tests.chdouble import sample_config
from tests.chdouble.double import Log, Settings
from tests.chdouble.validate import validate
from tests.support.bundles import write_bundle
from tests.unit.test_chdouble import Served, serve
from tests.unit.test_nix_lib import BASE, BUNDLE, FULL, nix_eval

E = "Error from API"
INVALID = [E, "The VM could not boot", "Failed to validate config"]
NOT_BOOTABLE = "Payload configuration is not bootable"
VHOST_SHARED = "Using vhost-user requires using shared memory or huge pages"
RELEASES = range(40, 54)

Change = Callable[[dict[str, Any]], object]


def config(tmp_path: Path, change: Change | None = None) -> dict[str, Any]:
    """sample_config (what Procurator sends, one vCPU), changed by `change`."""
    made = sample_config(tmp_path, tmp_path / "kernel")
    if change is not None:
        change(made)
    return made


def refusal(made: dict[str, Any], release: int = 53, warnings: list[str] | None = None) -> list[str] | None:
    """The ValidationError chain (below "Failed to validate config"), or None if the config passes."""
    sink = warnings if warnings is not None else []
    error = validate(made, release, lambda _at, message: sink.append(message))
    if error is None:
        return None
    chain = error.chain()
    assert chain[0] == "Failed to validate config"
    return chain[1:]


# --- the rules, one by one (vmm/src/config.rs VmConfig::validate and the configs' validate) ---------


def _set(path: str, value: Any) -> Change:
    """A change setting `config[a][b]...` (a list index for a digit) to `value`."""
    *parents, last = path.split(".")

    def change(made: dict[str, Any]) -> None:
        node: Any = made
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[int(last) if last.isdigit() else last] = value

    return change


def _both(*changes: Change) -> Change:
    def change(made: dict[str, Any]) -> None:
        for one in changes:
            one(made)

    return change


RULES: list[tuple[str, Change, int, list[str]]] = [
    # (name, change, release, the chain below "Failed to validate config")
    (
        "no payload v53",
        lambda c: c.pop("payload"),
        53,
        [NOT_BOOTABLE, "No bootitem provided: neither firmware nor kernel"],
    ),
    (
        "no kernel nor firmware v48",
        _set("payload", {"cmdline": "x"}),
        48,
        [NOT_BOOTABLE, "No bootitem provided: neither firmware nor kernel"],
    ),
    (
        "kernel and firmware",
        _set("payload.firmware", "/fw"),
        53,
        [NOT_BOOTABLE, "Specifying a kernel is not supported when a firmware is provided"],
    ),
    ("no payload v47", lambda c: c.pop("payload"), 47, ["No kernel specified"]),
    (
        "max below boot v53",
        _set("cpus", {"boot_vcpus": 2, "max_vcpus": 1}),
        53,
        ["Max CPUs (1) lower than boot CPUs (2)"],
    ),
    (
        "max below boot v50",
        _set("cpus", {"boot_vcpus": 2, "max_vcpus": 1}),
        50,
        ["Max CPUs lower than boot CPUs"],
    ),
    (
        "too many cpus",
        _set("cpus", {"boot_vcpus": 1, "max_vcpus": 8193}),
        48,
        ["Too many CPUs: specified 8193 but 8192 is the limit"],
    ),
    (
        "serial File without file",
        _set("serial", {"mode": "File"}),
        53,
        ["Path missing when using file console mode"],
    ),
    (
        "console File without file",
        _set("console", {"mode": "File"}),
        40,
        ["Path missing when using file console mode"],
    ),
    (
        "net one queue v53",
        _set("net.0.num_queues", 1),
        53,
        ["Number of queues (1) to virtio_net should be higher than 2"],
    ),
    ("net one queue v47", _set("net.0.num_queues", 1), 47, ["Number of queues to virtio_net less than 2"]),
    (
        "net queues over vCPUs",
        _set("net.0.num_queues", 4),
        53,
        ["Queue count (4) must not exceed boot vCPUs (1)"],
    ),
    (
        "net queues over vCPUs v50",
        _set("net.0.num_queues", 4),
        50,
        ["Number of vCPUs is insufficient for number of queues"],
    ),
    (
        "net queue size v53",
        _set("net.0.queue_size", 100),
        53,
        ["Queue size must be a power of 2 no greater than 32768: 100"],
    ),
    (
        "net mtu",
        _set("net.0.mtu", 1000),
        53,
        ["Provided MTU 1000 is lower than 1280 (expected by VIRTIO specification)"],
    ),
    ("net ip without mask", _set("net.0.ip", "10.0.0.1"), 49, ["IP provided without a mask"]),
    ("net mask without ip", _set("net.0.mask", "255.0.0.0"), 53, ["Mask provided without an IP"]),
    (
        "net offload",
        _set("net.0.offload_csum", False),
        53,
        ['"offload_tso" and "offload_ufo" depend on "offload_csum"'],
    ),
    ("net vhost-user private memory", _set("net.0.vhost_user", True), 53, [VHOST_SHARED]),
    (
        "net vhost-user no socket v53",
        _both(_set("net.0.vhost_user", True), _set("memory.shared", True)),
        53,
        ["No socket provided when using vhost-user"],
    ),
    (
        "disk queues over vCPUs",
        _set("disks.0.num_queues", 2),
        53,
        ["Queue count (2) must not exceed boot vCPUs (1)"],
    ),
    (
        "disk queue size 2 v53",
        _set("disks.0.queue_size", 2),
        53,
        ["Block queue size must be greater than 2: 2"],
    ),
    ("disk queue size 2 v44", _set("disks.0.queue_size", 2), 44, ["Queue size is smaller than 2: 2"]),
    (
        "disk queue size odd v53",
        _set("disks.0.queue_size", 100),
        53,
        ["Queue size must be a power of 2 no greater than 32768: 100"],
    ),
    (
        "disk socket and path",
        _set("disks.0.vhost_socket", "/s"),
        53,
        ["Disk path and vhost socket both provided"],
    ),
    ("disk vhost-user private memory", _set("disks.0.vhost_user", True), 40, [VHOST_SHARED]),
    (
        "disk serial too long",
        _set("disks.0.serial", "x" * 21),
        53,
        ["Block device serial length (21) exceeds maximum allowed length (20)"],
    ),
    ("fs private memory", _set("fs", [{"tag": "t", "socket": "/s"}]), 53, [VHOST_SHARED]),
    (
        "fs queues over vCPUs",
        _both(_set("fs", [{"tag": "t", "socket": "/s", "num_queues": 2}]), _set("memory.shared", True)),
        53,
        ["Queue count (2) must not exceed boot vCPUs (1)"],
    ),
    ("duplicate id", _set("net.0.id", "store"), 53, ["Identifier store is not unique"]),
    (
        "duplicate rng id v52",
        _set("rng", {"src": "/dev/urandom", "id": "eth0"}),
        52,
        ["Identifier eth0 is not unique"],
    ),
    ("reserved id", _set("disks.0.id", "__store"), 53, ["Identifier __store is not invalid"]),
    (
        "hugepage size without hugepages",
        _set("memory.hugepage_size", 2 << 20),
        53,
        ["Huge page size specified but huge pages not enabled"],
    ),
    (
        "hugepage size not a power of 2",
        _both(_set("memory.hugepage_size", 3 << 20), _set("memory.hugepages", True)),
        53,
        [f"Huge page size is not power of 2: {3 << 20}"],
    ),
    (
        "shared and mergeable v52",
        _both(_set("memory.shared", True), _set("memory.mergeable", True)),
        52,
        ["Invalid to set both 'mergeable' and 'shared' for memory"],
    ),
    ("vsock cid 2", _set("vsock", {"cid": 2, "socket": "/v"}), 53, ["2 is a special VSOCK CID"]),
    (
        "topology zero part",
        _set(
            "cpus.topology", {"threads_per_core": 0, "cores_per_die": 1, "dies_per_package": 1, "packages": 1}
        ),
        53,
        ["No part of the CPU topology can be zero"],
    ),
    (
        "topology count",
        _set(
            "cpus.topology", {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 1}
        ),
        53,
        ["Product of CPU topology parts does not match maximum vCPU"],
    ),
]


@pytest.mark.parametrize(("change", "release", "chain"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_each_rule_refuses_with_the_real_text(
    tmp_path: Path, change: Change, release: int, chain: list[str]
) -> None:
    assert refusal(config(tmp_path, change), release) == chain


PASSING: list[tuple[str, Change, int]] = [
    ("as sent", lambda _c: None, 53),
    (
        "net one queue pair per vCPU",
        _both(_set("cpus", {"boot_vcpus": 2, "max_vcpus": 2}), _set("net.0.num_queues", 4)),
        53,
    ),
    ("net odd queue count", _set("net.0.num_queues", 3), 53),  # no parity rule in any release
    ("disk queue size odd before v53", _set("disks.0.queue_size", 100), 52),
    ("disk queue size 2 before v44", _set("disks.0.queue_size", 2), 43),
    ("net ip without mask before v49", _set("net.0.ip", "10.0.0.1"), 48),  # ip and mask had defaults
    ("too many cpus before v48", _set("cpus", {"boot_vcpus": 1, "max_vcpus": 8193}), 47),
    ("kernel and firmware before v48", _set("payload.firmware", "/fw"), 47),
    (
        "vhost-user on shared memory",
        _both(_set("net.0.vhost_user", True), _set("net.0.vhost_socket", "/s"), _set("memory.shared", True)),
        53,
    ),
    (
        "net vhost-user no socket before v53",
        _both(_set("net.0.vhost_user", True), _set("memory.hugepages", True)),
        52,
    ),
    ("rng id before v52", _set("rng", {"src": "/dev/urandom", "id": "eth0"}), 51),
    (
        "shared and mergeable before v52",
        _both(_set("memory.shared", True), _set("memory.mergeable", True)),
        51,
    ),
    ("vsock cid 3", _set("vsock", {"cid": 3, "socket": "/v"}), 53),
    (
        "serial Socket without socket",
        _set("serial", {"mode": "Socket"}),
        53,
    ),  # refused by the CLI parser only
]


@pytest.mark.parametrize(("change", "release"), [p[1:] for p in PASSING], ids=[p[0] for p in PASSING])
def test_what_the_rules_allow_passes(tmp_path: Path, change: Change, release: int) -> None:
    assert refusal(config(tmp_path, change), release) is None


def test_the_first_failing_rule_wins_in_the_real_order(tmp_path: Path) -> None:
    # payload, consoles, vCPUs, then the disks, nets, fs... (VmConfig::validate, v53.0)
    made = config(
        tmp_path, _both(_set("net.0.num_queues", 1), _set("cpus", {"boot_vcpus": 2, "max_vcpus": 1}))
    )
    assert refusal(made) == ["Max CPUs (1) lower than boot CPUs (2)"]
    made = config(tmp_path, _both(_set("net.0.num_queues", 1), _set("disks.0.id", "__d")))
    assert refusal(made) == ["Identifier __d is not invalid"]


def test_tty_on_several_consoles_is_only_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    made = config(
        tmp_path, _both(_set("serial", {"mode": "Tty"}), lambda c: c.pop("console"))
    )  # console: Tty
    assert refusal(made, warnings=warnings) is None
    assert warnings == ['Using TTY output for multiple consoles: ["virtio-console", "serial-console"]']


def test_firmware_ignores_cmdline_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    made = config(tmp_path, _set("payload", {"firmware": "/fw", "cmdline": "x"}))
    assert refusal(made, warnings=warnings) is None
    assert warnings == ["Ignoring cmdline parameter as firmware is provided as the payload"]


# --- through the API: vm.create stores it, vm.boot refuses it ----------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(tmp_path, Settings(no_shutdown=True)) as double:
        yield double


def create(served: Served, change: Change) -> None:
    kernel = served.vm_dir / "kernel"
    kernel.write_bytes(b"not really a kernel")
    made = sample_config(served.vm_dir, kernel)
    change(made)
    answer = served.client.put("vm.create", json=made)
    assert answer.status_code == 204, answer.text


THROUGH_API: list[tuple[str, Change, list[str]]] = [
    (
        "no kernel",
        _set("payload", {"cmdline": "console=ttyS0"}),
        [NOT_BOOTABLE, "No bootitem provided: neither firmware nor kernel"],
    ),
    (
        "max below boot",
        _set("cpus", {"boot_vcpus": 2, "max_vcpus": 1}),
        ["Max CPUs (1) lower than boot CPUs (2)"],
    ),
    (
        "net one queue",
        _set("net.0.num_queues", 1),
        ["Number of queues (1) to virtio_net should be higher than 2"],
    ),
    (
        "net queues over vCPUs",
        _set("net.0.num_queues", 4),
        ["Queue count (4) must not exceed boot vCPUs (1)"],
    ),
    ("duplicate id", _set("disks.0.id", "eth0"), ["Identifier eth0 is not unique"]),
]


@pytest.mark.parametrize(("change", "chain"), [t[1:] for t in THROUGH_API], ids=[t[0] for t in THROUGH_API])
def test_boot_answers_500_with_the_validation_chain(served: Served, change: Change, chain: list[str]) -> None:
    create(served, change)  # vm_create only stores the config (vmm/src/lib.rs)
    answer = served.client.put("vm.boot")
    assert answer.status_code == 500
    assert answer.json() == [*INVALID, *chain]
    assert served.client.get("vm.info").json()["state"] == "Created"
    assert served.events()[-1] == ("vm", "booting")  # never "booted"


def test_validation_comes_before_the_devices_and_the_payload_files(served: Served) -> None:
    # Vm::new_from_memory_manager validates before any device exists and before the kernel is read
    made = sample_config(served.vm_dir, served.vm_dir / "missing-kernel", tap="pct-nonexistent")
    made["net"][0]["num_queues"] = 1
    assert served.client.put("vm.create", json=made).status_code == 204
    answer = served.client.put("vm.boot")
    assert answer.json() == [*INVALID, "Number of queues (1) to virtio_net should be higher than 2"]


def test_fields_outside_the_schema_are_validated_too(tmp_path: Path) -> None:
    with serve(tmp_path, Settings(no_shutdown=True, validate=False)) as served:
        create(served, _set("net.0.vhost_user", True))
        assert served.client.put("vm.boot").json() == [*INVALID, VHOST_SHARED]


def test_older_releases_answer_their_own_texts(tmp_path: Path) -> None:
    with serve(tmp_path, Settings(no_shutdown=True, release=50)) as served:
        create(served, _set("cpus", {"boot_vcpus": 2, "max_vcpus": 1}))
        assert served.client.put("vm.boot").json() == [*INVALID, "Max CPUs lower than boot CPUs"]


def test_a_valid_config_boots_and_logs_the_tty_warning(tmp_path: Path) -> None:
    stream = io.StringIO()
    with serve(tmp_path, Settings(no_shutdown=True)) as served:
        served.vmm.log = Log(stream, 0, 0.0)
        create(served, _both(_set("serial", {"mode": "Tty"}), _set("console", {"mode": "Tty"})))
        assert served.client.put("vm.boot").status_code == 204
    assert (
        'WARN:vmm/src/config.rs -- Using TTY output for multiple consoles: ["virtio-console", '
        in stream.getvalue()
    )


# --- what Procurator builds passes, in every release --------------------------------------------


def procurator_configs(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The vm.create bodies the backend sends for nix/lib's configs (a minimal and a full spec): the bundle's
    vm-config.json (lib.vmConfig) with the host's fields (runtime_config) and the wire's serial socket."""
    for name, attrs in (("minimal", BASE), ("full", FULL)):
        vm_config = nix_eval(f'lib.vmConfig {{ {attrs} }} "{BUNDLE}"')
        meta = nix_eval(f"lib.procuratorJson {{ {attrs} }}")
        bundle = Bundle.load(write_bundle(tmp_path / name, config=vm_config, meta_data=meta))
        nics = [
            NicBinding(i.id, f"pc-web-{n}", f"02:00:00:00:00:0{n}")
            for n, i in enumerate(bundle.meta.interfaces)
        ]
        volumes = {v.name: tmp_path / f"{v.name}.img" for v in bundle.meta.volumes}
        runtime = runtime_config(
            bundle,
            nics=nics,
            volumes=volumes,
            serial_log=tmp_path / "serial.log",
            address=GuestAddress("10.100.0.2", 16, "10.100.0.1"),
        )
        spec = LaunchSpec(
            name="web", vm_dir=tmp_path / "vm", config=runtime, serial_log=tmp_path / "serial.log"
        )
        yield name, wire_config(spec)


def test_procurator_configs_pass_in_every_release(tmp_path: Path) -> None:
    built = dict(procurator_configs(tmp_path))
    assert set(built) == {"minimal", "full"}
    assert built["full"]["cpus"]["boot_vcpus"] == 2
    assert built["full"]["net"][0]["num_queues"] == 4
    for name, made in built.items():
        for release in RELEASES:
            before = json.dumps(made, sort_keys=True)
            assert refusal(copy.deepcopy(made), release) is None, (name, release)
            assert json.dumps(made, sort_keys=True) == before
