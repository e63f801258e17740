"""Bundle and deployment parsing: every contract violation names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from procurator import cgroup, lifecycle
from procurator.config import CgroupSettings, WatchdogSettings, WorkerConfig
from procurator.errors import ValidationError
from procurator.models import MIB, VMM_OVERHEAD_MIB, Bundle, Deployment, Resources, RestartPolicy, store_hash
from tests.support.bundles import meta, vm_config, write_bundle, write_deployment


def test_bundle_loads_with_its_generation(tmp_path: Path) -> None:
    path = write_bundle(tmp_path)
    bundle = Bundle.load(path)
    assert bundle.name == "web"
    assert bundle.generation == "0123456789abcdfghijklmnpqrsvwxyz"
    assert bundle.meta.volumes[0].size_mib == 16
    assert bundle.meta.restart.policy is RestartPolicy.ALWAYS
    assert bundle.meta.health[0].path == "/health"
    assert bundle.meta.shutdown_timeout == 10
    assert bundle.vcpus == 1


def test_store_hash_of_a_non_store_name_is_empty() -> None:
    assert store_hash(Path("/tmp/foo")) == ""


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"name": "Web_1"}, "name", "not a DNS label"),
        ({"schema": 7}, "schema", "unknown schema version 7"),
        ({"schema": "1"}, "schema", 'of schema 1, not "1"'),
        ({"interfaces": [{"id": "eth0"}, {"id": "eth0"}]}, "interfaces", "must be unique"),
        ({"interfaces": [{"id": "eth0", "mac": "zz"}]}, "interfaces[0].mac", "not a lower-case MAC"),
        ({"restart": {"policy": "sometimes"}}, "restart.policy", "always, on-failure, never"),
        ({"volumes": [{"name": "d", "sizeMiB": 0}]}, "volumes[0].sizeMiB", "at least 1"),
        ({"health": [{"type": "udp", "port": 1}]}, "health[0].type", "tcp or http"),
        ({"shutdownTimeout": True}, "shutdownTimeout", "expected a whole number, not true"),
    ],
)
def test_invalid_procurator_json_names_file_and_field(
    tmp_path: Path, change: dict[str, object], field: str, problem: str
) -> None:
    data = meta()
    data.update(change)
    path = write_bundle(tmp_path, meta_data=data)
    with pytest.raises(ValidationError) as err:
        Bundle.load(path)
    assert err.value.source == str(path / "procurator.json")
    assert err.value.field == field
    assert problem in str(err.value)


def test_missing_name_is_reported(tmp_path: Path) -> None:
    data = meta()
    del data["name"]
    with pytest.raises(ValidationError, match=r"procurator.json: name: missing"):
        Bundle.load(write_bundle(tmp_path, meta_data=data))


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = write_bundle(tmp_path)
    (path / "vm-config.json").write_text('{"cpus": ')
    with pytest.raises(
        ValidationError, match=r"vm-config.json: not JSON \(Expecting value at line 1 column 10\)"
    ):
        Bundle.load(path)


def test_host_fields_in_the_bundle_are_refused(tmp_path: Path) -> None:
    config = vm_config()
    config["net"][0]["tap"] = "tap0"
    with pytest.raises(ValidationError, match=r"net\[0\].tap: belongs to the host"):
        Bundle.load(write_bundle(tmp_path, config=config))


def test_writable_bundle_disk_is_refused(tmp_path: Path) -> None:
    config = vm_config()
    config["disks"][0]["readonly"] = False
    with pytest.raises(ValidationError, match=r"disks\[0\].readonly"):
        Bundle.load(write_bundle(tmp_path, config=config))


def test_net_ids_must_match_interfaces(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"do not match procurator\.json interfaces"):
        Bundle.load(write_bundle(tmp_path, config=vm_config(nets=2)))


def test_relative_kernel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"payload.kernel: 'vmlinuz' must be an absolute"):
        Bundle.load(write_bundle(tmp_path, config=vm_config(kernel="vmlinuz")))


def test_deployment_loads_and_checks_names(tmp_path: Path) -> None:
    web = write_bundle(tmp_path, "web")
    dep = Deployment.load(write_deployment(tmp_path, "host1", {"web": web}))
    assert dep.host == "host1"
    assert [b.name for b in dep.bundles()] == ["web"]
    wrong = Deployment.load(write_deployment(tmp_path / "x", "host2", {"api": web}))
    with pytest.raises(ValidationError, match=r"vms.api: points at a bundle named 'web'"):
        wrong.bundles()


def test_deployment_with_bad_host_is_refused(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, "host1", {})
    (path / "deployment.json").write_text(json.dumps({"schema": 1, "host": "Bad Host", "vms": {}}))
    with pytest.raises(ValidationError, match=r"deployment.json: host: 'Bad Host' is not a DNS label"):
        Deployment.load(path)


def test_deployment_naming_a_vm_twice_is_refused(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, "host1", {})
    (path / "deployment.json").write_text(
        '{"schema": 1, "host": "host1", "vms": {"web": "/nix/store/a", "web": "/nix/store/b"}}'
    )
    with pytest.raises(ValidationError, match=r"deployment.json: web: appears twice"):
        Deployment.load(path)


# --- resources (docs/bundle.md) ---------------------------------------------------------------------


def test_a_bundle_without_resources_gets_every_default(tmp_path: Path) -> None:
    bundle = Bundle.load(write_bundle(tmp_path))  # as built before the field existed
    assert bundle.meta.resources == Resources()
    assert bundle.meta.resources.memory_max(256 * MIB) == (256 + VMM_OVERHEAD_MIB) * MIB
    limits = lifecycle.limits(bundle)
    assert limits == cgroup.Limits(memory_max=(256 + 128) * MIB)


def test_resources_are_parsed_and_translated(tmp_path: Path) -> None:
    resources = {"memoryMaxMiB": 512, "cpuQuotaPercent": 150, "cpuWeight": 300, "ioWeight": 20,
                 "cpuAffinity": [3, 1]}  # fmt: skip
    bundle = Bundle.load(write_bundle(tmp_path, meta_data=meta(resources=resources)))
    assert bundle.meta.resources == Resources(512, 150, 300, 20, (1, 3))
    assert lifecycle.limits(bundle) == cgroup.Limits(
        memory_max=512 * MIB, cpu_quota_us=150_000, cpu_weight=300, io_weight=20
    )


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"memoryMaxMiB": 256}, "resources.memoryMaxMiB: 256 MiB is not above the guest's 256 MiB of RAM"),
        ({"memoryMaxMiB": 8}, "resources.memoryMaxMiB: must be at least 16, found 8"),
        ({"cpuQuotaPercent": 0}, "resources.cpuQuotaPercent: must be at least 1, found 0"),
        ({"cpuWeight": 10001}, "resources.cpuWeight: must be at most 10000, found 10001"),
        ({"ioWeight": "high"}, 'resources.ioWeight: expected a whole number, not "high"'),
        ({"cpuAffinity": [0, 0]}, "resources.cpuAffinity: names a CPU more than once: [0, 0]"),
        ({"cpuAffinity": [True]}, "resources.cpuAffinity: [0] True is not a host CPU number 0-4095"),
    ],
)
def test_bad_resources_are_refused_naming_the_field(
    tmp_path: Path, resources: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Bundle.load(write_bundle(tmp_path, meta_data=meta(resources=resources)))
    assert f"procurator.json: {message}" in str(caught.value)


def test_the_worker_configuration_watchdog_setting() -> None:
    assert WorkerConfig.parse("w.json", {}).watchdog == WatchdogSettings(True, 10.0, 3.0, 3)
    got = WorkerConfig.parse("w.json", {"watchdog": {"interval": 5, "timeout": 1.5, "failures": 2}})
    assert got.watchdog == WatchdogSettings(True, 5.0, 1.5, 2)
    assert not WorkerConfig.parse("w.json", {"watchdog": {"enable": False}}).watchdog.enable
    for bad, message in [
        ({"interval": 0}, r"w.json: watchdog.interval: expected seconds from 0.1 to 3600, not 0"),
        ({"timeout": True}, r"watchdog.timeout: expected seconds from 0.1 to 3600, not true"),
        ({"failures": 0}, r"watchdog.failures: expected a count from 1 to 100, not 0"),
        ({"enable": "yes"}, r'watchdog.enable: expected true or false, not "yes"'),
        ({"every": 3}, r"watchdog.every: unknown setting; known: enable, failures, interval, timeout"),
    ]:
        with pytest.raises(ValidationError, match=message):
            WorkerConfig.parse("w.json", {"watchdog": bad})
    with pytest.raises(ValidationError, match=r"watchdog: expected an object"):
        WorkerConfig.parse("w.json", {"watchdog": 3})


def test_the_worker_configuration_cgroups_setting() -> None:
    assert WorkerConfig.parse("w.json", {}).cgroups == CgroupSettings("auto", "procurator.slice")
    got = WorkerConfig.parse("w.json", {"cgroups": {"mode": "required", "base": "a.slice/b.service"}})
    assert got.cgroups == CgroupSettings("required", "a.slice/b.service")
    with pytest.raises(
        ValidationError, match=r"w.json: cgroups.mode: 'on' is not one of auto, required, off"
    ):
        WorkerConfig.parse("w.json", {"cgroups": {"mode": "on"}})
    with pytest.raises(ValidationError, match=r"cgroups.base: '../x' is not a relative cgroup path"):
        WorkerConfig.parse("w.json", {"cgroups": {"base": "../x"}})


def test_the_worker_configuration_checks_schema_user_and_binary() -> None:
    """`schema`, `user` and `hypervisor.binary` are checked like every other setting (issue 12): a file
    of another schema, a user that is no user name, a binary that is no path are refused, naming them."""
    got = WorkerConfig.parse(
        "w.json", {"schema": 1, "user": "procurator-vm", "hypervisor": {"binary": "/bin/ch", "accel": "auto"}}
    )
    assert (got.user, got.hypervisor.binary) == ("procurator-vm", "/bin/ch")
    assert WorkerConfig.parse("w.json", {"user": None, "hypervisor": None}).user is None
    for bad, message in [
        (
            {"schema": 2},
            r"^w.json: schema: unknown schema version 2; this procurator reads 1 \(upgrade it\)$",
        ),
        ({"schema": "1"}, r'^w.json: schema: expected a worker configuration of schema 1, not "1"'),
        ({"user": "root user"}, r'^w.json: user: "root user" is not a user name'),
        ({"user": 0}, r"^w.json: user: expected a string, not 0$"),
        ({"hypervisor": {"binary": 7}}, r"^w.json: hypervisor.binary: expected a path as a string, not 7$"),
        ({"hypervisor": {"binary": ""}}, r'^w.json: hypervisor.binary: expected a path as a string, not ""$'),
        ({"hypervisor": {"bin": "/x"}}, r"^w.json: hypervisor.bin: unknown setting; known: accel, backend,"),
        ({"network": {"bridge": None}}, r"^w.json: network.bridge: expected a non-empty string, not null$"),
    ]:
        with pytest.raises(ValidationError, match=message):
            WorkerConfig.parse("w.json", bad)
