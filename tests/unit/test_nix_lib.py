"""nix/lib, the pure Nix functions (mkSpec, vmConfig, procuratorJson, deploymentJson), evaluated with
`nix-instantiate --eval --strict --json`: defaults, normalisation, and an error naming the VM and the
field for each way a spec can be wrong."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import chspec

LIB = Path(__file__).resolve().parents[2] / "nix" / "lib"
KERNEL = "/nix/store/00000000000000000000000000000000-kernel"
INITRD = "/nix/store/11111111111111111111111111111111-initrd"
BUNDLE = "/nix/store/22222222222222222222222222222222-procurator-vm-web"
BASE = f'name = "web"; kernel = "{KERNEL}";'
MIB = 1024 * 1024


def run_nix(expr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", f"let lib = import {LIB}; in {expr}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def nix_eval(expr: str) -> Any:
    done = run_nix(expr)
    assert done.returncode == 0, f"{expr}:\n{done.stderr}"
    return json.loads(done.stdout)


def nix_error(expr: str) -> str:
    """The message of the error `expr` throws (the text after `error: `, indentation collapsed)."""
    done = run_nix(expr)
    assert done.returncode != 0, f"{expr} evaluated to {done.stdout}"
    text = done.stderr.split("error: ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if "--show-trace" not in line)


def spec(attrs: str) -> Any:
    return nix_eval(f"lib.mkSpec {{ {attrs} }}")


DEFAULT_SPEC: dict[str, Any] = {
    "name": "web",
    "kernel": KERNEL,
    "initrd": None,
    "vcpus": 1,
    "memoryMiB": 256,
    "cmdline": "",
    "disks": [],
    "interfaces": [{"id": "eth0", "mac": None}],
    "volumes": [],
    "restart": {"policy": "always", "maxRestarts": 5, "backoffSeconds": 1, "fromSnapshot": False},
    "health": [],
    "shutdownTimeout": 30,
    "resources": {
        "memoryMaxMiB": None,
        "cpuQuotaPercent": None,
        "cpuWeight": 100,
        "ioWeight": 100,
        "cpuAffinity": [],
    },
    "replace": {"strategy": "recreate", "drainSeconds": 5},
}


def test_mk_spec_defaults() -> None:
    assert spec(BASE) == DEFAULT_SPEC


def test_mk_spec_normalises() -> None:
    got = spec(
        BASE
        + """
        interfaces = [ { id = "eth0"; mac = "02:AB:00:00:00:01"; } { id = "eth1"; } ];
        volumes = [
          { name = "data"; sizeMiB = 64; }
          { name = "logs"; sizeMiB = 8; fsType = "xfs"; mountPoint = "/var/log"; }
        ];
        restart = { policy = "never"; };
        health = [ { type = "http"; port = 80; } { type = "tcp"; port = 22; retries = 3; } ];
        """
    )
    assert got["interfaces"] == [{"id": "eth0", "mac": "02:ab:00:00:00:01"}, {"id": "eth1", "mac": None}]
    assert got["volumes"] == [
        {"name": "data", "sizeMiB": 64, "fsType": "ext4", "mountPoint": "/mnt/data"},
        {"name": "logs", "sizeMiB": 8, "fsType": "xfs", "mountPoint": "/var/log"},
    ]
    assert got["restart"] == {"policy": "never", "maxRestarts": 5, "backoffSeconds": 1, "fromSnapshot": False}
    assert got["health"] == [
        {
            "type": "http",
            "port": 80,
            "path": "/",
            "expectStatus": 200,
            "intervalSeconds": 2,
            "timeoutSeconds": 2,
            "retries": 30,
        },
        {"type": "tcp", "port": 22, "intervalSeconds": 2, "timeoutSeconds": 2, "retries": 3},
    ]


def test_mk_spec_is_idempotent() -> None:
    attrs = (
        BASE + ' volumes = [ { name = "data"; sizeMiB = 1; } ]; health = [ { type = "http"; port = 80; } ];'
    )
    assert nix_eval(f"let s = lib.mkSpec {{ {attrs} }}; in lib.mkSpec s == s") is True


def test_mk_spec_takes_a_derivation_like_kernel() -> None:
    got = spec(f'name = "web"; kernel = {{ outPath = "{KERNEL}"; }}; initrd = "{INITRD}";')
    assert (got["kernel"], got["initrd"]) == (KERNEL, INITRD)


FULL = (
    BASE
    + f"""
    vcpus = 2; memoryMiB = 512; initrd = "{INITRD}"; cmdline = "loglevel=4 procurator.release=7";
    disks = [ {{ id = "store"; path = "/nix/store/33333333333333333333333333333333-store.img"; }} ];
    interfaces = [ {{ id = "eth0"; mac = "02:00:00:00:00:01"; }} {{ id = "mgmt"; }} ];
    volumes = [ {{ name = "data"; sizeMiB = 64; }} ];
    """
)


def test_vm_config() -> None:
    assert nix_eval(f'lib.vmConfig {{ {FULL} }} "{BUNDLE}"') == {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 512 * MIB},
        "payload": {
            "kernel": KERNEL,
            "initramfs": INITRD,
            "cmdline": "console=ttyS0 reboot=t panic=-1 quiet procurator.name=web "
            f"procurator.bundle={BUNDLE} loglevel=4 procurator.release=7",
        },
        "disks": [
            {"id": "store", "path": "/nix/store/33333333333333333333333333333333-store.img", "readonly": True}
        ],
        "net": [{"id": "eth0", "mac": "02:00:00:00:00:01", "num_queues": 4}, {"id": "mgmt", "num_queues": 4}],
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
    }


@pytest.mark.parametrize("attrs", [BASE, FULL], ids=["minimal", "full"])
def test_vm_config_validates_against_the_cloud_hypervisor_spec(attrs: str) -> None:
    assert chspec.errors("VmConfig", nix_eval(f'lib.vmConfig {{ {attrs} }} "{BUNDLE}"')) == []


def test_vm_config_of_a_small_spec_has_no_optional_fields() -> None:
    config = nix_eval(f'lib.vmConfig (lib.mkSpec {{ {BASE} }}) "{BUNDLE}"')
    assert config["payload"] == {
        "kernel": KERNEL,
        "cmdline": f"console=ttyS0 reboot=t panic=-1 quiet procurator.name=web procurator.bundle={BUNDLE}",
    }
    assert config["net"] == [{"id": "eth0"}]
    assert config["disks"] == []
    assert config["cpus"] == {"boot_vcpus": 1, "max_vcpus": 1}


def test_procurator_json() -> None:
    assert nix_eval(f'lib.procuratorJson {{ {FULL} health = [ {{ type = "tcp"; port = 22; }} ]; }}') == {
        "schema": 1,
        "name": "web",
        "interfaces": [{"id": "eth0", "mac": "02:00:00:00:00:01"}, {"id": "mgmt"}],
        "volumes": [{"name": "data", "sizeMiB": 64, "fsType": "ext4", "mountPoint": "/mnt/data"}],
        "restart": {"policy": "always", "maxRestarts": 5, "backoffSeconds": 1, "fromSnapshot": False},
        "health": [{"type": "tcp", "port": 22, "intervalSeconds": 2, "timeoutSeconds": 2, "retries": 30}],
        "shutdownTimeout": 30,
        "resources": DEFAULT_SPEC["resources"],
        "replace": DEFAULT_SPEC["replace"],
    }


def test_procurator_json_resources() -> None:
    resources = (
        "resources = { memoryMaxMiB = 512; cpuQuotaPercent = 150; cpuWeight = 200; cpuAffinity = [ 1 0 ]; };"
    )
    got = nix_eval(f"lib.procuratorJson {{ {BASE} {resources} }}")["resources"]
    assert got == {
        "memoryMaxMiB": 512,
        "cpuQuotaPercent": 150,
        "cpuWeight": 200,
        "ioWeight": 100,
        "cpuAffinity": [1, 0],
    }


def test_procurator_json_replace_blue_green() -> None:
    got = nix_eval(
        f'lib.procuratorJson {{ {BASE} replace = {{ strategy = "blue-green"; drainSeconds = 0; }}; }}'
    )
    assert got["replace"] == {"strategy": "blue-green", "drainSeconds": 0}


def test_blue_green_is_refused_with_writable_volumes() -> None:
    error = nix_error(
        f'lib.mkSpec {{ {BASE} volumes = [ {{ name = "data"; sizeMiB = 8; }} ]; '
        'replace.strategy = "blue-green"; }'
    )
    assert error == (
        "procurator VM 'web': replace.strategy = \"blue-green\" cannot be used with writable volumes (data): "
        "a volume allows one writer, and blue-green runs the old and the new generation at once; "
        'use strategy "recreate" or move the data off the VM'
    )


def test_blue_green_is_refused_with_a_fixed_mac() -> None:
    error = nix_error(
        f'lib.mkSpec {{ {BASE} interfaces = [ {{ id = "eth0"; mac = "02:00:00:00:00:01"; }} ]; '
        'replace.strategy = "blue-green"; }'
    )
    assert error.startswith(
        "procurator VM 'web': replace.strategy = \"blue-green\" cannot be used with fixed"
    ), error


API = "/nix/store/44444444444444444444444444444444-procurator-vm-api"


def test_deployment_json() -> None:
    got = nix_eval(
        f'lib.deploymentJson {{ host = "worker-1"; vms = {{'
        f' web = {{ outPath = "{BUNDLE}"; vmName = "web"; }}; api = "{API}"; }}; }}'
    )
    assert got == {"schema": 1, "host": "worker-1", "vms": {"web": BUNDLE, "api": API}}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            f'host = "w1"; vms = {{ db = {{ outPath = "{BUNDLE}"; vmName = "web"; }}; }};',
            "procurator deployment 'w1': vms.db is the bundle of VM 'web'; name the attribute web",
        ),
        ('host = "Worker_1"; vms = { };', "procurator deployment 'Worker_1': host must be a DNS label"),
        ('host = "w1"; vms = { web = "/tmp/web"; };', "procurator deployment 'w1': vms.web must be a bundle"),
        ('host = "w1"; vms = [ ];', "procurator deployment 'w1': vms must be an attribute set"),
        ('host = "w1"; vms = { }; hosts = 1;', "procurator deployment 'w1': unknown attribute 'hosts'"),
        (
            f'host = "w1"; vms = {{ Web = "{BUNDLE}"; }};',
            "procurator deployment 'w1': vms.Web: the VM name must be a DNS label",
        ),
    ],
)
def test_deployment_json_errors(args: str, message: str) -> None:
    assert nix_error(f"lib.deploymentJson {{ {args} }}").startswith(message)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("web", True),
        ("a", True),
        ("web-1", True),
        ("0web", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("", False),
        ("-web", False),
        ("web-", False),
        ("Web", False),
        ("we_b", False),
        ("we.b", False),
    ],
)
def test_is_dns_label(value: str, expected: bool) -> None:
    assert nix_eval(f'lib.isDnsLabel "{value}"') is expected


def test_vm_names_are_short_dns_labels() -> None:
    assert nix_eval(f'map lib.isVmName [ "{"a" * 20}" "{"a" * 21}" "web" ]') == [True, False, True]


ERRORS = [
    (
        'name = "Web_1";',
        "Web_1",
        "name must be a DNS label of at most 20 characters"
        " (lowercase letters, digits and '-', not starting or ending with '-'), got \"Web_1\"",
    ),
    (f'name = "{"a" * 21}";', "a" * 21, "name must be a DNS label of at most 20 characters"),
    ('name = "web-";', "web-", "name must be a DNS label"),
    ("memoryMb = 256;", "web", "unknown attribute 'memoryMb' (known: name, kernel, "),
    ("vcpus = 0;", "web", "vcpus must be a positive integer, got 0"),
    # The upper bounds of nix/lib/checks.nix, the same numbers as procurator/models.py refuses at load.
    ("vcpus = 1000000;", "web", "vcpus must be at most 254, got 1000000"),
    ("memoryMiB = 1073741824;", "web", "memoryMiB must be at most 33554432 (MiB), got 1073741824"),
    ("shutdownTimeout = 86400;", "web", "shutdownTimeout must be at most 3600 (seconds), got 86400"),
    (
        'volumes = [ { name = "data"; sizeMiB = 10000000000000; } ];',
        "web",
        "volumes[0].sizeMiB must be at most 16777216 (MiB), got 10000000000000",
    ),
    (
        'health = [ { type = "tcp"; port = 80; retries = 1000000000; } ];',
        "web",
        "health[0].retries must be at most 1000, got 1000000000",
    ),
    (
        "restart = { maxRestarts = 5000; };",
        "web",
        "restart.maxRestarts must be an integer from 0 to 1000, got 5000",
    ),
    ('memoryMiB = "256";', "web", 'memoryMiB must be a positive integer (MiB), got "256"'),
    ("shutdownTimeout = -1;", "web", "shutdownTimeout must be a positive integer (seconds), got -1"),
    (
        "resources = { memoryMaxMiB = 256; };",
        "web",
        "resources.memoryMaxMiB (256) must be above memoryMiB (256): the guest's RAM plus the VMM's overhead"
        " (about 128 MiB, the default when memoryMaxMiB is null)",
    ),
    (
        "resources = { memoryMaxMiB = 8; };",
        "web",
        "2 problems: - resources.memoryMaxMiB must be at least 16, got 8",
    ),
    ("resources = { memory = 8; };", "web", "resources has unknown attribute 'memory' (known: cpuAffinity, "),
    ("resources = { cpuQuotaPercent = 0; };", "web", "resources.cpuQuotaPercent must be a positive integer"),
    ("resources = { cpuQuotaPercent = 30000; };", "web", "resources.cpuQuotaPercent must be at most 25400"),
    ("resources = { cpuWeight = 20000; };", "web", "resources.cpuWeight must be an integer from 1 to 10000"),
    ("resources = { ioWeight = 0; };", "web", "resources.ioWeight must be an integer from 1 to 10000"),
    ("resources = { cpuAffinity = [ 0 0 ]; };", "web", "resources.cpuAffinity: CPU 0 is used more than once"),
    (
        "resources = { cpuAffinity = [ (-1) ]; };",
        "web",
        "resources.cpuAffinity: -1 is not a host CPU number (0-4095)",
    ),
    ("resources = 512;", "web", "resources must be an attribute set like { memoryMaxMiB = 512; }, got 512"),
    (
        'kernel = "/boot/vmlinuz";',
        "web",
        "kernel must be a store path (a path, a derivation or a string under /nix/store/),"
        ' got "/boot/vmlinuz"',
    ),
    ('initrd = "/boot/initrd.img";', "web", "initrd must be a store path"),
    ('cmdline = "quiet procurator.ip=10.0.0.2/24";', "web", "cmdline must not set procurator.ip"),
    ('cmdline = "procurator.name=db";', "web", "cmdline must not set procurator.name"),
    ("cmdline = [ ];", "web", "cmdline must be a string of extra kernel parameters, got a list"),
    (
        'interfaces = [ { id = "eth0"; } { id = "eth0"; } ];',
        "web",
        'interfaces: id "eth0" is used more than once',
    ),
    (
        'interfaces = [ { id = "ethernet0"; } ];',
        "web",
        "interfaces[0].id must be 1-8 characters of a-z and 0-9 (it is part of the TAP name),"
        ' got "ethernet0"',
    ),
    (
        'interfaces = [ { id = "eth0"; mac = "02:00:00:00:00"; } ];',
        "web",
        "interfaces[0].mac must be a MAC address",
    ),
    ('interfaces = [ { mac = "02:00:00:00:00:01"; } ];', "web", "interfaces[0].id is required"),
    (
        'interfaces = [ { id = "a"; mac = "02:00:00:00:00:01"; } { id = "b"; mac = "02:00:00:00:00:01"; } ];',
        "web",
        'interfaces: mac "02:00:00:00:00:01" is used more than once',
    ),
    ("interfaces = { eth0 = { }; };", "web", "interfaces must be a list, got an attribute set"),
    (
        'volumes = [ { name = "data"; sizeMiB = 1; } { name = "data"; sizeMiB = 2; mountPoint = "/srv"; } ];',
        "web",
        'volumes: name "data" is used more than once',
    ),
    (
        'volumes = [ { name = "a"; sizeMiB = 1; mountPoint = "/srv"; }'
        ' { name = "b"; sizeMiB = 2; mountPoint = "/srv"; } ];',
        "web",
        'volumes: mountPoint "/srv" is used more than once',
    ),
    (
        f'volumes = [ {{ name = "{"v" * 17}"; sizeMiB = 1; }} ];',
        "web",
        "volumes[0].name must be a DNS label of at most 16 characters (it is the ext4 filesystem label)",
    ),
    (
        f'volumes = [ {{ name = "{"v" * 13}"; sizeMiB = 1; fsType = "xfs"; }} ];',
        "web",
        "volumes[0].name must be a DNS label of at most 12 characters (it is the xfs filesystem label)",
    ),
    (
        'volumes = [ { name = "data"; sizeMiB = 0; } ];',
        "web",
        "volumes[0].sizeMiB must be a positive integer (MiB), got 0",
    ),
    ('volumes = [ { name = "data"; } ];', "web", "volumes[0].sizeMiB is required"),
    (
        'volumes = [ { name = "data"; sizeMiB = 1; fsType = "zfs"; } ];',
        "web",
        'volumes[0].fsType must be one of ext4, ext2, ext3, xfs, btrfs, got "zfs"',
    ),
    (
        'volumes = [ { name = "data"; sizeMiB = 1; mountPoint = "data"; } ];',
        "web",
        "volumes[0].mountPoint must be an absolute path",
    ),
    (
        'volumes = [ { name = "data"; sizeMiB = 1; size = 1; } ];',
        "web",
        "volumes[0] has unknown attribute 'size' (known: name, sizeMiB, fsType, mountPoint)",
    ),
    ('volumes = [ "data" ];', "web", 'volumes[0] must be an attribute set, got "data"'),
    ('disks = [ { id = "store"; path = "/srv/store.img"; } ];', "web", "disks[0].path must be a store path"),
    (
        f'disks = [ {{ id = "s"; path = "{KERNEL}"; }} {{ id = "s"; path = "{KERNEL}"; }} ];',
        "web",
        'disks: id "s" is used more than once',
    ),
    (
        f'disks = [ {{ id = "vol-data"; path = "{KERNEL}"; }} ];',
        "web",
        "disks[0].id \"vol-data\": ids starting with 'vol-' are reserved",
    ),
    (
        f'disks = [ {{ id = "eth0"; path = "{KERNEL}"; }} ];',
        "web",
        'disks: id "eth0" is also an interface id',
    ),
    (
        'restart = { policy = "sometimes"; };',
        "web",
        'restart.policy must be one of always, on-failure, never, got "sometimes"',
    ),
    (
        "restart = { maxRestarts = -1; };",
        "web",
        "restart.maxRestarts must be an integer from 0 to 1000, got -1",
    ),
    (
        "restart = { backoffSeconds = 0; };",
        "web",
        "restart.backoffSeconds must be a positive integer (seconds), got 0",
    ),
    ("restart = { delay = 1; };", "web", "restart has unknown attribute 'delay'"),
    ('restart = { fromSnapshot = "yes"; };', "web", 'restart.fromSnapshot must be true or false, got "yes"'),
    ('restart = "always";', "web", "restart must be an attribute set"),
    (
        'health = [ { type = "udp"; port = 53; } ];',
        "web",
        'health[0].type must be one of tcp, http, got "udp"',
    ),
    (
        'health = [ { type = "tcp"; port = 22; path = "/"; } ];',
        "web",
        "health[0] (type tcp) has unknown attribute 'path'",
    ),
    (
        'health = [ { type = "http"; port = 70000; } ];',
        "web",
        "health[0].port must be a TCP port (1-65535), got 70000",
    ),
    ('health = [ { type = "http"; } ];', "web", "health[0].port is required"),
    (
        'health = [ { type = "http"; port = 80; path = "health"; } ];',
        "web",
        "health[0].path must start with /",
    ),
    (
        'replace = { strategy = "rolling"; };',
        "web",
        'replace.strategy must be one of recreate, blue-green, got "rolling"',
    ),
    (
        "replace = { drainSeconds = -1; };",
        "web",
        "replace.drainSeconds must be an integer from 0 to 3600, got -1",
    ),
    (
        "replace = { drain = 1; };",
        "web",
        "replace has unknown attribute 'drain' (known: drainSeconds, strategy)",
    ),
    (
        'health = [ { type = "http"; port = 80; expectStatus = 99; } ];',
        "web",
        "health[0].expectStatus must be an HTTP status (100-599), got 99",
    ),
    (
        'health = [ { type = "tcp"; port = 80; retries = 0; } ];',
        "web",
        "health[0].retries must be a positive integer, got 0",
    ),
    (
        'health = [ { type = "tcp"; port = 80; timeoutSeconds = 1.5; } ];',
        "web",
        "health[0].timeoutSeconds must be a positive integer (seconds), got 1.5",
    ),
]


@pytest.mark.parametrize(("attrs", "vm", "message"), ERRORS, ids=[e[0][:48] for e in ERRORS])
def test_mk_spec_errors_name_the_vm_and_the_field(attrs: str, vm: str, message: str) -> None:
    error = nix_error(f"lib.mkSpec ({{ {BASE} }} // {{ {attrs} }})")
    assert error.startswith(f"procurator VM '{vm}': {message}"), error


def test_mk_spec_requires_name_and_kernel() -> None:
    assert nix_error("lib.mkSpec { }") == (
        "procurator VM '<unnamed>': 2 problems: "
        "- name is required (a DNS label of at most 20 characters) "
        "- kernel is required (a path, a derivation or a string under /nix/store/)"
    )
    assert nix_error("lib.mkSpec [ ]").startswith(
        "procurator VM '<unnamed>': mkSpec expects an attribute set, got a list"
    )


def test_mk_spec_reports_every_problem_at_once() -> None:
    error = nix_error(f'lib.mkSpec {{ {BASE} vcpus = 0; volumes = [ {{ name = "Data"; sizeMiB = 1; }} ]; }}')
    assert error.startswith("procurator VM 'web': 2 problems:")
    assert "- vcpus must be a positive integer" in error
    assert "- volumes[0].name must be a DNS label" in error


@pytest.mark.parametrize("fn", ["vmConfig", "procuratorJson"])
def test_outputs_check_raw_attributes_too(fn: str) -> None:
    extra = f' "{BUNDLE}"' if fn == "vmConfig" else ""
    error = nix_error(f"lib.{fn} {{ {BASE} vcpus = 0; }}{extra}")
    assert error.startswith("procurator VM 'web': vcpus must be a positive integer")
