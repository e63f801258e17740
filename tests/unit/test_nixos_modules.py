"""modules/guest and modules/worker evaluated with nixpkgs' real lib (`lib.evalModules`) and the
stand-ins of tests/nixos/stubs for the NixOS options they set: the units, file systems and assertions
the modules give NixOS, read from the evaluated configuration.

nixpkgs' lib is not part of this repository and not on a machine without network, so these tests
need PROCURATOR_NIXPKGS_LIB (a nixpkgs checkout's `lib` directory, or nixpkgs.lib's). `make test`
runs them when it is set and says that it did not otherwise; `make nixos-eval` runs them with the lib
of the pinned nixpkgs. Without the variable every test here fails: they are never silently skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from procurator.config import WorkerConfig

pytestmark = pytest.mark.nixpkgs_lib

REPO = Path(__file__).resolve().parents[2]
EVAL = REPO / "tests" / "nixos" / "eval.nix"
LIB_VARIABLE = "PROCURATOR_NIXPKGS_LIB"
DEPLOYMENT = "/nix/store/00000000000000000000000000000000-procurator-deployment-worker1"


def nixpkgs_lib() -> Path:
    value = os.environ.get(LIB_VARIABLE)
    if not value:
        pytest.fail(f"{LIB_VARIABLE} is not set: give the path of nixpkgs' lib, or run `make nixos-eval`")
    lib = Path(value)
    if not (lib / "default.nix").is_file():
        pytest.fail(f"{LIB_VARIABLE}={value} has no default.nix: it must be nixpkgs' lib directory")
    return lib


def run(
    module: str, modules: str, select: str, system: str = "x86_64-linux"
) -> subprocess.CompletedProcess[str]:
    expr = (
        f"let e = import {EVAL} {{ lib = {json.dumps(str(nixpkgs_lib()))}; module = {json.dumps(module)}; "
        f"system = {json.dumps(system)}; modules = {modules}; }}; in {select}"
    )
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def evaluate(module: str, modules: str, select: str, system: str = "x86_64-linux") -> Any:
    done = run(module, modules, select, system)
    assert done.returncode == 0, f"{module} {modules} -> {select}:\n{done.stderr}"
    return json.loads(done.stdout)


def guest(config: str = "{ }", select: str = "e", system: str = "x86_64-linux") -> Any:
    return evaluate("guest", f'[ {{ networking.hostName = "web"; }} ({config}) ]', select, system)


def guest_failures(config: str) -> list[str]:
    failures: list[str] = guest(config, "e.failedAssertions")
    return failures


def worker(config: str, select: str) -> Any:
    return evaluate(
        "worker",
        f'[ {{ networking.hostName = "worker1"; services.procurator.enable = true; }} ({config}) ]',
        select,
    )


def unit(kind: str, name: str, config: str = "{ }", module: str = "guest") -> dict[str, Any]:
    select = f'e.config.systemd.{kind}."{name}"'
    got: dict[str, Any] = guest(config, select) if module == "guest" else worker(config, select)
    return got


# --- The harness itself ---------------------------------------------------------------------------


def test_eval_takes_a_list_of_modules_and_lib_as_a_path() -> None:
    assert guest(select="e.config.procurator.vm.name") == "web"


def test_an_option_the_stubs_do_not_declare_is_an_error() -> None:
    done = run("guest", "[ { services.nginx.enable = true; } ]", "e.config.procurator.vm.name")
    assert done.returncode != 0
    assert "services.nginx" in done.stderr
    assert "does not exist" in done.stderr


# --- Guest ----------------------------------------------------------------------------------------


def test_guest_defaults_pass_every_assertion() -> None:
    assert guest_failures("{ }") == []


def test_guest_file_systems() -> None:
    fs = guest(select="e.config.fileSystems")
    assert fs["/"]["fsType"] == "tmpfs"
    assert fs["/nix/store"] == {
        "mountPoint": "/nix/store",
        "device": "/dev/disk/by-label/nix-store",
        "fsType": "erofs",
        "options": ["ro"],
        "neededForBoot": True,
        "noCheck": True,
    }


def volume_at(mount_point: str, name: str = "data") -> str:
    return f"{{ procurator.vm.volumes.{name} = {{ sizeMiB = 8; mountPoint = {json.dumps(mount_point)}; }}; }}"


def test_guest_volumes_are_mounted_by_label_without_blocking_boot() -> None:
    fs = guest(volume_at("/srv/data"), "e.config.fileSystems")
    assert fs["/srv/data"]["device"] == "/dev/disk/by-label/data"
    assert fs["/srv/data"]["neededForBoot"] is False
    # nofail: a missing disk does not stop the boot. But systemd-fstab-generator leaves a nofail
    # mount's Before=local-fs.target out, so services could start before it is mounted and write to
    # the tmpfs below; x-systemd.before= puts that order back, the device timeout bounds the wait.
    assert fs["/srv/data"]["options"] == [
        "nofail",
        "x-systemd.before=local-fs.target",
        "x-systemd.device-timeout=30s",
    ]


def test_guest_volume_below_a_stage_1_path_is_mounted_in_stage_2() -> None:
    # /var/lib/postgresql is below /var/lib but is not itself one of NixOS's pathsNeededForBoot: the
    # initrd leaves it alone and systemd mounts it, ordered before local-fs.target (so before
    # postgresql.service, whose unit also has RequiresMountsFor= its data directory).
    config = volume_at("/var/lib/postgresql", "pg")
    assert guest_failures(config) == []
    assert guest(config, "e.stage1") == ["/", "/nix/store"]
    options = guest(config, 'e.config.fileSystems."/var/lib/postgresql".options')
    assert "x-systemd.before=local-fs.target" in options


STAGE_1 = "/, /nix, /nix/store, /var, /var/log, /var/lib, /var/lib/nixos, /etc, /usr"


@pytest.mark.parametrize("mount_point", ["/var", "/var/lib", "/var/log", "/var/lib/nixos", "/etc", "/usr"])
def test_guest_volume_at_a_stage_1_path_is_refused(mount_point: str) -> None:
    # NixOS mounts these in the initrd whatever neededForBoot says (nixos/lib/utils.nix
    # pathsNeededForBoot), where a failed mount panics the VM (boot.panic_on_fail).
    failures = guest_failures(volume_at(mount_point))
    assert failures == [
        f"procurator VM 'web': volume \"data\": mountPoint {json.dumps(mount_point)} is one of the paths "
        "NixOS mounts in stage 1 (/var, /var/log, /var/lib, /var/lib/nixos, /etc, /usr), where a volume "
        "cannot be mounted safely: the initrd waits for its disk and a failed mount panics the VM, and "
        "stage 1 and the activation script write there before any later mount; mount it at a directory "
        'of its own below, e.g. mountPoint = "/var/lib/<service>" or "/srv/data"'
    ]


def test_guest_volume_in_the_guest_tree_is_refused_once() -> None:
    # /nix is a stage-1 path too, but the message is the one about the bundle's own tree.
    assert guest_failures(volume_at("/nix")) == [
        'procurator VM \'web\': volume "data": mountPoint "/nix" is part of the guest\'s own tree '
        "(/, /nix, /nix/store, /boot)"
    ]


def test_guest_volume_needed_for_boot_is_refused() -> None:
    config = (
        '{ procurator.vm.volumes.data = { sizeMiB = 8; mountPoint = "/srv/data"; }; '
        'fileSystems."/srv/data".neededForBoot = true; }'
    )
    assert guest_failures(config) == [
        'procurator VM \'web\': volume "data": fileSystems."/srv/data".neededForBoot is true, which '
        "mounts the volume in stage 1, where a failed mount panics the VM; remove it: volumes are mounted "
        "in stage 2, before local-fs.target"
    ]


def test_guest_store_disk_drivers_are_in_the_initrd() -> None:
    initrd = guest(select="e.config.boot.initrd")
    assert {"virtio_pci", "virtio_blk", "erofs"} <= set(initrd["kernelModules"])
    assert initrd["includeDefaultModules"] is False


def test_guest_command_line_has_init_then_boot_then_vm_parameters() -> None:
    cmdline = guest(
        '{ boot.kernelParams = [ "loglevel=7" ]; procurator.vm.kernelParams = [ "mitigations=off" ]; }',
        "e.config.procurator.vm.spec.cmdline",
    )
    words = cmdline.split()
    assert words[0].startswith("/nix/store/") is False
    assert words[0].startswith("init=/nix/store/")
    assert words[0].endswith("-nixos-system/init")
    assert words[1:] == ["boot.panic_on_fail", "loglevel=7", "mitigations=off"]


def test_guest_init_does_not_make_the_system_an_input_of_the_bundle() -> None:
    # The toplevel reaches the guest inside the store image; init= in vm-config.json is text. With the
    # toplevel's string context the bundle would name the system as an input of its own as well.
    # (eval.nix gives the placeholder toplevel a context, as a real derivation's outPath has.)
    bundle = "e.config.system.build.procuratorBundle"
    image_root = f"(builtins.head {bundle}.env.passthru.storeImage.env.closure.rootPaths).outPath"
    got = guest(
        select=f"{{ cmdline = builtins.hasContext e.config.procurator.vm.spec.cmdline; "
        f"vmConfig = builtins.hasContext {bundle}.env.vmConfig; "
        f"image = builtins.hasContext {image_root}; }}"
    )
    assert got == {"cmdline": False, "vmConfig": False, "image": True}


def test_guest_store_image_is_lz4hc_compressed() -> None:
    script = guest(select="e.config.system.build.procuratorBundle.env.passthru.storeImage.script")
    assert "mkfs.erofs --quiet --tar=f -zlz4hc " in script


def test_guest_store_image_refers_to_none_of_the_paths_it_holds() -> None:
    # Nix's scanner finds the hash of every path in the image's bytes (erofs directory entries are not
    # compressed), so without this the image refers to the whole system and the bundle's closure holds
    # the system twice: once as store paths, once inside the image. Honoured by Nix >= 2.18, the oldest
    # that evaluates nixpkgs; unsafeDiscardReferences is read only with structured attributes.
    image = guest(
        select="{ inherit (e.config.system.build.procuratorBundle.env.passthru.storeImage.env) "
        "__structuredAttrs unsafeDiscardReferences; }"
    )
    assert image == {"__structuredAttrs": True, "unsafeDiscardReferences": {"out": True}}


def test_guest_aarch64_console_is_the_pl011() -> None:
    params = guest(select="e.config.boot.kernelParams", system="aarch64-linux")
    assert params == ["boot.panic_on_fail", "console=ttyAMA0"]


def test_guest_network_unit() -> None:
    service = unit("services", "procurator-network")
    assert service["serviceConfig"]["Type"] == "oneshot"
    assert service["serviceConfig"]["ExecStart"].endswith("/bin/procurator-network resolvconf")
    assert service["before"] == ["network.target", "network-online.target"]
    assert "resolvconf.service" in service["after"]


def test_guest_hvc0_getty_is_a_drop_in_on_the_upstream_template() -> None:
    # A whole unit serial-getty@hvc0.service would hide systemd's serial-getty@.service: no Restart=always
    # (no new prompt after a logout), no BindsTo=dev-hvc0.device, none of its TTY settings. A drop-in
    # (<name>.d/overrides.conf) only adds the instance to getty.target; NixOS's own drop-in on the
    # template (agetty, services.getty.autologinUser) still applies.
    service = unit("services", "serial-getty@hvc0")
    assert service["overrideStrategy"] == "asDropin"
    assert service["enable"] is True
    assert service["wantedBy"] == ["getty.target"]
    assert service["serviceConfig"] == {}
    assert service["unitConfig"] == {}
    for dependencies in ("wants", "requires", "bindsTo", "after", "before", "partOf"):
        assert service[dependencies] == [], dependencies


def test_guest_vm_kernel_params_cannot_set_init() -> None:
    failures = guest_failures('{ procurator.vm.kernelParams = [ "init=/bin/sh" ]; }')
    assert failures == [
        "procurator VM 'web': procurator.vm.kernelParams must not set init=/bin/sh: Procurator sets init= "
        "and the procurator.* parameters itself"
    ]


def test_guest_boot_kernel_params_cannot_set_init_or_procurator_parameters() -> None:
    # boot.kernelParams reach the same command line as procurator.vm.kernelParams, after init=.
    failures = guest_failures(
        '{ boot.kernelParams = [ "init=/bin/sh" "quiet" "procurator.ip=10.0.0.9/24" ]; }'
    )
    assert failures == [
        "procurator VM 'web': boot.kernelParams must not set init=/bin/sh, procurator.ip=10.0.0.9/24: "
        "Procurator sets init= and the procurator.* parameters itself"
    ]


def test_guest_a_failed_assertion_stops_the_spec() -> None:
    config = '[ { networking.hostName = "web"; boot.kernelParams = [ "init=/bin/sh" ]; } ]'
    done = run("guest", config, "e.config.procurator.vm.spec")
    assert done.returncode != 0
    assert "boot.kernelParams must not set init=/bin/sh" in done.stderr


def vm_kernel_params(*params: str) -> str:
    """A configuration with these procurator.vm.kernelParams (JSON strings are Nix strings here)."""
    return f"{{ procurator.vm.kernelParams = [ {' '.join(json.dumps(p) for p in params)} ]; }}"


@pytest.mark.parametrize("param", ["two words", "tab\tseparated", "", 'a="unclosed', "trailing\n"])
def test_guest_vm_kernel_params_are_single_parameters(param: str) -> None:
    failures = guest_failures(vm_kernel_params("mitigations=off", param))
    assert failures == [
        f"procurator VM 'web': procurator.vm.kernelParams element {json.dumps(param)} is not one kernel "
        "parameter: it must be non-empty, with whitespace only inside double quotes "
        '(as in boot.kernelParams, e.g. dyndbg="file init.c +p")'
    ]


def test_guest_vm_kernel_params_may_quote_a_value_with_spaces() -> None:
    config = vm_kernel_params('dyndbg="file init.c +p"')
    assert guest_failures(config) == []
    assert guest(config, "e.config.procurator.vm.spec.cmdline").endswith(' dyndbg="file init.c +p"')


def test_guest_resources_reach_the_spec() -> None:
    config = (
        "{ procurator.vm = { memoryMiB = 256; resources = { memoryMaxMiB = 400; cpuAffinity = [ 1 ]; }; }; }"
    )
    resources = guest(config, "e.config.procurator.vm.spec.resources")
    assert resources == {
        "memoryMaxMiB": 400,
        "cpuQuotaPercent": None,
        "cpuWeight": 100,
        "ioWeight": 100,
        "cpuAffinity": [1],
    }


def test_guest_replace_strategy_reaches_the_spec() -> None:
    assert guest("{ }", "e.config.procurator.vm.spec.replace") == {"strategy": "recreate", "drainSeconds": 5}
    config = '{ procurator.vm.replace = { strategy = "blue-green"; drainSeconds = 2; }; }'
    assert guest_failures(config) == []
    assert guest(config, "e.config.procurator.vm.spec.replace") == {
        "strategy": "blue-green",
        "drainSeconds": 2,
    }


def test_guest_blue_green_with_volumes_is_refused() -> None:
    failures = guest_failures(
        '{ procurator.vm = { replace.strategy = "blue-green"; volumes.data = { sizeMiB = 8; }; }; }'
    )
    assert (
        "procurator VM 'web': procurator.vm.replace.strategy = \"blue-green\" cannot be used with writable "
        "volumes (data): a volume allows one writer, and blue-green runs the old and the new generation at "
        'once; use "recreate" or move the data off the VM'
    ) in failures, failures


def test_guest_memory_limit_below_guest_ram_is_refused() -> None:
    failures = guest_failures("{ procurator.vm = { memoryMiB = 512; resources.memoryMaxMiB = 256; }; }")
    assert any(
        f.startswith("procurator VM 'web': procurator.vm.resources.memoryMaxMiB (256) must be above")
        for f in failures
    ), failures


def test_guest_erofs_must_not_be_blacklisted() -> None:
    # nixpkgs' profiles/hardened.nix blacklists erofs, the file system of the guest's /nix/store.
    failures = guest_failures('{ boot.blacklistedKernelModules = [ "ax25" "erofs" ]; }')
    assert failures == [
        "procurator VM 'web': boot.blacklistedKernelModules contains \"erofs\" (nixpkgs' "
        "profiles/hardened.nix puts it there), but the guest's /nix/store is the bundle's erofs disk: "
        "with erofs blacklisted it may not mount and the VM not boot; set "
        'boot.blacklistedKernelModules = lib.mkForce [ ... ] to the list without "erofs"'
    ]


# --- Worker ---------------------------------------------------------------------------------------


def test_worker_defaults_pass_every_assertion() -> None:
    assert worker("{ }", "e.failedAssertions") == []
    assert worker("{ }", "e.warnings") == []


def test_worker_configuration_file() -> None:
    text = worker("{ }", 'e.config.environment.etc."procurator/worker.json".source.text')
    settings = json.loads(text)
    assert settings["schema"] == 1
    assert settings["stateDir"] == "/var/lib/procurator"
    assert settings["hypervisor"]["binary"].endswith("-cloud-hypervisor/bin/cloud-hypervisor")
    assert settings["network"]["bridge"] == "procurator0"
    assert settings["watchdog"] == {"enable": True, "interval": 10, "timeout": 3, "failures": 3}
    assert settings["serialLogMaxBytes"] == 8 << 20
    WorkerConfig.parse("worker.json", settings)  # what the module writes, the worker reads


def test_worker_status_page_settings() -> None:
    settings = json.loads(worker("{ }", 'e.config.environment.etc."procurator/worker.json".source.text'))
    assert (settings["statusListen"], settings["statusActions"]) == ("127.0.0.1:9478", False)
    config = '{ services.procurator.status = { listen = "[::1]:9500"; actions = true; }; }'
    settings = json.loads(worker(config, 'e.config.environment.etc."procurator/worker.json".source.text'))
    assert (settings["statusListen"], settings["statusActions"]) == ("[::1]:9500", True)
    off = json.loads(worker("{ services.procurator.status.listen = null; }",
                            'e.config.environment.etc."procurator/worker.json".source.text'))  # fmt: skip
    assert off["statusListen"] is None


def test_worker_status_listen_must_be_an_unprivileged_port_apart_from_metrics() -> None:
    assert worker('{ services.procurator.status.listen = "127.0.0.1:80"; }', "e.failedAssertions") == [
        'procurator worker: services.procurator.status.listen must be "host:port" or "[v6]:port" with a '
        'port from 1024 to 65535 (the worker cannot bind privileged ports), got "127.0.0.1:80"'
    ]
    both = (
        '{ services.procurator = { status.listen = "127.0.0.1:9500"; metrics.listen = "127.0.0.1:9500"; }; }'
    )
    assert worker(both, "e.failedAssertions") == [
        'procurator worker: services.procurator.status.listen and metrics.listen are both "127.0.0.1:9500"; '
        "give the status page another port"
    ]


def test_worker_daemon_unit() -> None:
    service = unit("services", "procurator-worker", module="worker")
    config = service["serviceConfig"]
    assert config["ExecStart"].endswith('/bin/procurator" "--config" "/etc/procurator/worker.json" "worker"')
    assert config["KillMode"] == "process"
    assert config["Restart"] == "always"
    assert config["StateDirectory"] == "procurator"
    assert "CAP_SYS_ADMIN" not in config["CapabilityBoundingSet"]
    assert service["wantedBy"] == ["multi-user.target"]
    # The VMs' cgroups live in the unit's delegated subtree, the daemon in its own leaf.
    assert config["Slice"] == "procurator.slice"
    assert config["Delegate"] == "yes"
    assert config["DelegateSubgroup"] == "supervisor"
    assert config["ProtectControlGroups"] is False
    assert "CAP_SYS_NICE" in config["CapabilityBoundingSet"]


def test_worker_slice_and_cgroup_setting() -> None:
    text = worker("{ }", 'e.config.environment.etc."procurator/worker.json".source.text')
    assert json.loads(text)["cgroups"] == {
        "mode": "required",
        "base": "procurator.slice/procurator-worker.service",
    }
    slice_unit = unit("slices", "procurator", module="worker")
    assert slice_unit["sliceConfig"] == {
        "MemoryAccounting": True,
        "CPUAccounting": True,
        "IOAccounting": True,
    }


def test_worker_pull_unit_applies_the_flake_attribute() -> None:
    config = '{ services.procurator.pull = { enable = true; flake = "github:o/fleet"; }; }'
    service = unit("services", "procurator-pull", config, module="worker")
    assert service["serviceConfig"]["ExecStart"].endswith('"apply" "github:o/fleet#deployments.worker1"')
    assert service["environment"]["NIX_CONFIG"] == "tarball-ttl = 0"


def test_worker_pull_timer_counts_the_interval_from_the_end_of_a_pull() -> None:
    # OnUnitInactiveSec counts from when procurator-pull.service last became inactive (or failed): a
    # pull that takes longer than the interval is not followed at once by the next one, as it is with
    # OnUnitActiveSec (counted from the start). The first pull comes OnBootSec after boot.
    config = '{ services.procurator.pull = { enable = true; flake = "github:o/fleet"; interval = "1h"; }; }'
    timer = unit("timers", "procurator-pull", config, module="worker")
    assert timer["timerConfig"] == {
        "OnBootSec": "2min",
        "OnUnitInactiveSec": "1h",
        "RandomizedDelaySec": "30s",
    }
    assert timer["wantedBy"] == ["timers.target"]
    assert "1h after" in timer["description"]


def test_worker_pull_and_deployment_exclude_each_other() -> None:
    failures = worker(
        '{ services.procurator.pull = { enable = true; flake = "github:o/fleet"; }; '
        f'services.procurator.deployment = "{DEPLOYMENT}"; }}',
        "e.failedAssertions",
    )
    assert failures == [
        "procurator worker: services.procurator.deployment and services.procurator.pull.enable both set "
        "this host's deployment; choose one"
    ]


def test_worker_vm_users_reach_the_configuration_file() -> None:
    config = "{ services.procurator.vmUsers = { first = 400000; count = 500; }; }"
    settings = json.loads(worker(config, 'e.config.environment.etc."procurator/worker.json".source.text'))
    assert settings["vmUsers"] == {"first": 400000, "count": 500, "extraGroups": ["kvm"]}
    assert settings["user"] is None  # vmUsers excludes the shared user
    parsed = WorkerConfig.parse("worker.json", settings)
    assert parsed.vm_users is not None
    assert (parsed.vm_users.first, parsed.vm_users.last) == (400000, 400499)
    assert worker(config, "e.failedAssertions") == []
    default = json.loads(worker("{ }", 'e.config.environment.etc."procurator/worker.json".source.text'))
    assert default["vmUsers"] is None


def test_worker_landlock_reaches_the_configuration_file() -> None:
    text = 'e.config.environment.etc."procurator/worker.json".source.text'
    default = json.loads(worker("{ }", text))
    assert default["hypervisor"]["landlock"] is True
    off = json.loads(worker("{ services.procurator.hypervisor.landlock = false; }", text))
    assert off["hypervisor"]["landlock"] is False
    assert WorkerConfig.parse("worker.json", off).hypervisor.landlock is False


def test_worker_vm_users_overlapping_a_user_are_refused() -> None:
    config = (
        "{ services.procurator.vmUsers = { first = 400000; count = 10; }; "
        "users.users.alice = { uid = 400005; }; }"
    )
    assert worker(config, "e.failedAssertions") == [
        "procurator worker: services.procurator.vmUsers 400000-400009 holds the uid 400005 of "
        "users.users.alice; move the range (vmUsers.first) or the user"
    ]
