"""Real nix-build of examples/minimal.nix: the bundles and the deployment hold the contract of
docs/bundle.md (docs/bundle.md), share one kernel and one initrd, and change only where the spec does."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO, ExampleBuild, NixBuild, host_cache_args
from tests.support import chspec

MIB = 1024 * 1024


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def newc_entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc cpio archive (symlinks carry their target as data)."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        header = archive[pos : pos + 110]
        assert header[:6] == b"070701", f"bad cpio header at {pos}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        data = archive[pos : pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data)


@pytest.fixture(scope="module")
def initrd(example_build: ExampleBuild) -> dict[str, tuple[int, bytes]]:
    return newc_entries(gzip.decompress((example_build.web / "initrd").read_bytes()))


def test_bundle_layout(example_build: ExampleBuild) -> None:
    for name, bundle in example_build.bundles.items():
        assert bundle.name.endswith(f"-procurator-vm-{name}")
        assert sorted(p.name for p in bundle.iterdir()) == [
            "initrd",
            "kernel",
            "procurator.json",
            "vm-config.json",
        ]
        config = load(bundle / "vm-config.json")
        assert (bundle / "kernel").is_symlink()
        assert os.readlink(bundle / "kernel") == config["payload"]["kernel"]
        assert os.readlink(bundle / "initrd") == config["payload"]["initramfs"]
        assert Path(config["payload"]["kernel"]).is_file()
        assert Path(config["payload"]["initramfs"]).is_file()


@pytest.mark.parametrize("name", ["web", "api"])
def test_vm_config_validates_against_the_cloud_hypervisor_spec(
    example_build: ExampleBuild, name: str
) -> None:
    config = load(example_build.bundles[name] / "vm-config.json")
    assert chspec.errors("VmConfig", config) == []


def test_vm_config_of_web(example_build: ExampleBuild) -> None:
    config = load(example_build.web / "vm-config.json")
    payload = config.pop("payload")
    assert config == {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 192 * MIB},
        "disks": [],
        "net": [{"id": "eth0"}],
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "rng": {"src": "/dev/urandom"},
    }
    assert payload["cmdline"] == (
        f"console=ttyS0 reboot=t panic=-1 quiet procurator.name=web procurator.bundle={example_build.web}"
    )
    assert payload["kernel"].startswith("/nix/store/")
    assert payload["initramfs"].startswith("/nix/store/")


def test_vm_config_of_api_has_multiqueue_net(example_build: ExampleBuild) -> None:
    config = load(example_build.api / "vm-config.json")
    assert config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert config["memory"] == {"size": 256 * MIB}
    assert config["net"] == [{"id": "eth0", "num_queues": 4}]
    assert f"procurator.bundle={example_build.api}" in config["payload"]["cmdline"].split()


def test_procurator_json(example_build: ExampleBuild) -> None:
    assert load(example_build.web / "procurator.json") == {
        "schema": 1,
        "name": "web",
        "interfaces": [{"id": "eth0"}],
        "volumes": [{"name": "data", "sizeMiB": 64, "fsType": "ext4", "mountPoint": "/mnt/data"}],
        "restart": {"policy": "always", "maxRestarts": 5, "backoffSeconds": 1, "fromSnapshot": False},
        "health": [
            {
                "type": "http",
                "port": 80,
                "path": "/health",
                "expectStatus": 200,
                "intervalSeconds": 2,
                "timeoutSeconds": 2,
                "retries": 30,
            }
        ],
        "shutdownTimeout": 20,
        # the box per VM (docs/bundle.md): no memory limit given, so guest RAM plus the VMM overhead
        "replace": {"strategy": "recreate", "drainSeconds": 5},  # the default: no blue-green
        "resources": {
            "memoryMaxMiB": None,
            "cpuQuotaPercent": None,
            "cpuWeight": 100,
            "ioWeight": 100,
            "cpuAffinity": [],
        },
    }
    api = load(example_build.api / "procurator.json")
    assert api["name"] == "api"
    assert api["volumes"] == []
    assert api["restart"] == {
        "policy": "on-failure",
        "maxRestarts": 3,
        "backoffSeconds": 1,
        "fromSnapshot": False,
    }
    assert api["health"] == [
        {"type": "tcp", "port": 80, "intervalSeconds": 2, "timeoutSeconds": 2, "retries": 30}
    ]


def test_bundles_share_one_kernel_and_one_initrd(example_build: ExampleBuild) -> None:
    web = load(example_build.web / "vm-config.json")["payload"]
    api = load(example_build.api / "vm-config.json")["payload"]
    assert web["kernel"] == api["kernel"]
    assert web["initramfs"] == api["initramfs"]
    assert Path(web["kernel"]).name.split("-", 1)[1].startswith("procurator-kernel-")
    assert Path(web["initramfs"]).name.split("-", 1)[1].startswith("procurator-minimal-initrd-")


def test_initrd_holds_busybox_init_and_modules_in_dependency_order(
    initrd: dict[str, tuple[int, bytes]],
) -> None:
    mode, _ = initrd["init"]
    assert mode & 0o111, "/init must be executable"
    assert b"busybox" in initrd["bin/sh"][1]
    modules = initrd["etc/procurator/modules"][1].decode().split()
    for name in modules:
        assert f"lib/modules/{name}.ko" in initrd
    # Each module after the modules it depends on (modinfo depends= of the Debian cloud kernel).
    for dependency, module in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio", "virtio_blk"),
    ]:
        assert modules.index(dependency) < modules.index(module), modules
    for wanted in ("virtio_pci", "virtio_net", "virtio_blk", "button", "evdev"):
        assert wanted in modules
    assert len(set(modules)) == len(modules)
    assert initrd["etc/acpi/PWRF/00000080"][1] == b"/etc/procurator/poweroff"
    assert initrd["etc/procurator/poweroff"][0] & 0o111


def test_deployment_lists_and_carries_both_bundles(example_build: ExampleBuild) -> None:
    deployment = example_build.deployment
    assert deployment.name.endswith("-procurator-deployment-local")
    assert load(deployment / "deployment.json") == {
        "schema": 1,
        "host": "local",
        "vms": {"web": str(example_build.web), "api": str(example_build.api)},
    }
    closure = subprocess.run(
        ["nix-store", "-qR", str(deployment)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    payload = load(example_build.web / "vm-config.json")["payload"]
    for path in (example_build.web, example_build.api, payload["kernel"], payload["initramfs"]):
        assert str(path) in closure


def test_a_bundle_closure_is_itself_its_kernel_and_its_initrd(example_build: ExampleBuild) -> None:
    # What `nix copy` sends for a VM: nothing twice and nothing beyond what the hypervisor opens
    # (docs/nixos.md "Size" for the NixOS bundles, whose store image refers to none of its paths).
    closure = subprocess.run(
        ["nix-store", "-qR", str(example_build.web)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    payload = load(example_build.web / "vm-config.json")["payload"]
    assert sorted(closure) == sorted([str(example_build.web), payload["kernel"], payload["initramfs"]])


def test_changing_one_vm_changes_only_its_bundle(
    example_build: ExampleBuild, nix_build_example: NixBuild
) -> None:
    web, api, deployment = nix_build_example(
        "web", "api", "deployment", args=["--arg", "overrides", "{ web = { memoryMiB = 256; }; }"]
    )
    assert web != example_build.web
    assert api == example_build.api
    assert deployment != example_build.deployment
    assert load(web / "vm-config.json")["memory"] == {"size": 256 * MIB}
    assert load(deployment / "deployment.json")["vms"] == {"web": str(web), "api": str(api)}
    assert os.readlink(web / "initrd") == os.readlink(example_build.web / "initrd")


def test_release_override_reaches_the_kernel_command_line(
    example_build: ExampleBuild, nix_build_example: NixBuild
) -> None:
    (web,) = nix_build_example(
        "web", args=["--arg", "overrides", '{ web.cmdline = "procurator.release=2"; }']
    )
    assert web != example_build.web
    cmdline = load(web / "vm-config.json")["payload"]["cmdline"]
    assert cmdline.endswith(f"procurator.bundle={web} procurator.release=2")


def evaluation_error(expr: str) -> str:
    done = subprocess.run(
        ["nix-instantiate", "--eval", "--expr", expr],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0, f"{expr} evaluated: {done.stdout}"
    return done.stderr


def test_missing_host_cache_says_to_run_setup() -> None:
    stderr = evaluation_error(f'(import {REPO}/nix/minimal {{ hostCache = "/nonexistent"; }}).kernel')
    assert "/nonexistent/kernel lacks vmlinuz" in stderr
    assert "scripts/setup.sh" in stderr


def test_deployment_rejects_a_bundle_under_another_name() -> None:
    cache = host_cache_args()[2] if host_cache_args() else "/var/cache/procurator"
    stderr = evaluation_error(
        f'let ex = import {REPO}/examples/minimal.nix {{ hostCache = "{cache}"; }}; in '
        f'(import {REPO}/nix/make-deployment.nix {{ host = "h1"; vms = {{ db = ex.web; }}; }}).drvPath'
    )
    assert "procurator deployment 'h1': vms.db is the bundle of VM 'web'" in stderr


def test_unknown_override_is_reported() -> None:
    stderr = evaluation_error(
        f"(import {REPO}/examples/minimal.nix {{ overrides = {{ db = {{ }}; }}; }}).web"
    )
    assert "overrides for unknown VM db" in stderr
