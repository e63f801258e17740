"""Landlock for cloud-hypervisor: the rule list against a bundle's runtime config, the version gate, and
the double's copy of cloud-hypervisor's rules (access strings, command-line refusals, validation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator.config import WorkerConfig
from procurator.errors import ValidationError
from procurator.hypervisor import keepers, landlock
from procurator.hypervisor.base import LaunchSpec
from procurator.hypervisor.cloud_hypervisor import CloudHypervisor, Version, landlock_fields, wire_config
from procurator.models import Bundle
from procurator.runtime import GuestAddress, NicBinding, runtime_config
from tests.chdouble import BINARY
from tests.chdouble import landlock as double_landlock
from tests.chdouble.double import _landlock_flags
from tests.chdouble.validate import validate
from tests.support.bundles import write_bundle


def web_spec(tmp_path: Path) -> LaunchSpec:
    """The LaunchSpec `up` makes for a bundle with a volume: a TAP, the volume, the serial log."""
    bundle = Bundle.load(write_bundle(tmp_path))
    vm_dir = tmp_path / "vms" / "web"
    config = runtime_config(
        bundle,
        nics=[NicBinding("eth0", "pc-web-1a2b", "02:aa:bb:cc:dd:ee")],
        volumes={"data": tmp_path / "volumes" / "web" / "data.img"},
        serial_log=vm_dir / "serial.log",
        address=GuestAddress("10.100.0.2", 16, "10.100.0.1", "10.100.0.1"),
    )
    writable = (tmp_path / "snapshots" / "web",)
    return LaunchSpec("web", vm_dir, config, vm_dir / "serial.log", writable=writable)


@pytest.mark.parametrize("release", [41, 47, 51, 52, 53])
def test_the_rules_give_the_vm_everything_it_opens_after_vm_create(tmp_path: Path, release: int) -> None:
    spec = web_spec(tmp_path)
    body = wire_config(spec)
    own = landlock.vmm_rules(body, release)
    ours = landlock.extra_rules(body, spec.writable)
    wanted = landlock.needs(body, spec.writable)
    volume = str(tmp_path / "volumes" / "web" / "data.img")
    flags = landlock.Rule("/sys/class/net/pc-web-1a2b/tun_flags", "r")
    snapshots = landlock.Rule(str(spec.writable[0]), "w")
    # the volume, the TAP device, the TAP's flags and the snapshot directory are among what the VM needs
    assert {landlock.Rule(volume, "rw"), landlock.Rule("/dev/net/tun", "rw"), flags, snapshots} <= set(wanted)
    assert landlock.uncovered(wanted, own + ours) == []
    # the VMM grants its disks, payload, serial socket and TAP device itself: we add the TAP's flags in
    # sysfs (open_tap.rs check_mq_support reads them) and the snapshots
    assert ours == [flags, landlock.Rule(str(spec.writable[0]), "rw")]
    assert landlock.Rule(str(spec.vm_dir / "serial" / "serial.sock"), "rw") in own
    # each rule matters: without ours the TAP could not be opened nor a snapshot written, without the
    # VMM's disk rule the volume could not be opened
    assert landlock.uncovered(wanted, own) == [flags, snapshots]
    without_volume = [r for r in own if r.path != volume]
    assert landlock.uncovered(wanted, without_volume + ours) == [landlock.Rule(volume, "rw")]


def test_the_rules_are_what_the_double_grants_itself(tmp_path: Path) -> None:
    """Procurator's copy of `VmConfig::apply_landlock` and the double's agree on a bundle's config."""
    spec = web_spec(tmp_path)
    body = wire_config(spec)
    for release in (41, 51, 52, 53):
        ours = [(r.path, r.access) for r in landlock.vmm_rules(body, release)]
        assert sorted(ours) == sorted(double_landlock.config_rules(body, release))


def test_the_body_says_landlock_and_names_the_tap_flags_and_the_snapshot_directory(tmp_path: Path) -> None:
    spec = web_spec(tmp_path)
    writable = (*spec.writable, keepers.serial_dir(spec.vm_dir))
    fields = landlock_fields(spec, wire_config(spec), Version(53), writable)
    assert fields == {
        "landlock_enable": True,
        "landlock_rules": [
            {"path": "/sys/class/net/pc-web-1a2b/tun_flags", "access": "r"},
            {"path": str(tmp_path / "snapshots" / "web"), "access": "rw"},
            {"path": str(spec.vm_dir / "serial"), "access": "rw"},  # the socket is bound again at a reset
        ],
    }
    # made first: cloud-hypervisor drops a rule whose path is missing
    assert spec.writable[0].is_dir()
    assert keepers.serial_dir(spec.vm_dir).is_dir()


def test_landlock_is_version_gated_and_can_be_turned_off() -> None:
    assert landlock.host_abi() >= landlock.NEEDED_ABI  # this machine's kernel (ABI 7)
    backend = CloudHypervisor(BINARY)
    assert not backend.landlocks(Version(40))  # vmm/src/landlock.rs first in v41.0
    assert backend.landlocks(Version(41))
    assert backend.landlocks(Version(53))
    assert not CloudHypervisor(BINARY, landlock=False).landlocks(Version(53))


def test_the_double_reads_access_strings_as_cloud_hypervisor_does() -> None:
    read, write = double_landlock.READ, double_landlock.WRITE
    assert double_landlock.access_bits("r") == read
    assert double_landlock.access_bits("w") == write
    assert double_landlock.access_bits("rw") == double_landlock.access_bits("wr") == read | write
    empty = double_landlock.access_bits("")
    assert not isinstance(empty, int)
    assert empty.text == "Invalid Landlock access: Access cannot be empty"
    bad = double_landlock.access_bits("rx")
    assert not isinstance(bad, int)
    assert bad.text == "Invalid Landlock access: Invalid access: x"


def test_the_double_refuses_the_flags_where_clap_does() -> None:
    assert _landlock_flags(["--landlock"], 40).startswith("error: unexpected argument '--landlock' found")
    assert _landlock_flags(["--landlock-rules", "path=/x,access=r"], 40).startswith(
        "error: unexpected argument '--landlock-rules' found"
    )
    assert _landlock_flags(["--api-socket", "fd=3", "--landlock"], 43) == ""  # no `requires` before v44
    refused = _landlock_flags(["--api-socket", "fd=3", "--landlock"], 44)
    assert refused.startswith("error: the following required arguments were not provided:")
    assert _landlock_flags(["--kernel", "/k", "--landlock"], 53) == ""
    assert _landlock_flags(["--api-socket", "fd=3"], 40) == ""


def test_vm_boot_validates_the_landlock_rules_from_v41(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = {
        "payload": {"kernel": str(kernel)},
        "landlock_rules": [{"path": str(tmp_path / "gone"), "access": "rw"}],
    }
    refused = validate(config, 53)
    assert refused is not None
    assert refused.chain() == [
        "Failed to validate config",
        f'Path "{tmp_path / "gone"}" provided in landlock-rules does not exist',
    ]
    assert validate(config, 40) is None  # v40 has no such field (serde ignores it)
    config["landlock_rules"] = [{"path": str(tmp_path), "access": "x"}]
    refused = validate(config, 53)
    assert refused is not None
    assert refused.chain()[-1] == "Invalid landlock access: Invalid Landlock access: Invalid access: x"


def test_the_worker_configuration_switch() -> None:
    assert WorkerConfig.parse("w.json", {}).hypervisor.landlock is True  # on by default
    off = WorkerConfig.parse("w.json", {"hypervisor": {"landlock": False}})
    assert off.hypervisor.landlock is False
    with pytest.raises(ValidationError) as refused:
        WorkerConfig.parse("w.json", {"hypervisor": {"landlock": "no"}})
    assert "hypervisor.landlock" in str(refused.value)
    assert "expected true or false" in str(refused.value)
