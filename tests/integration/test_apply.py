"""`procurator plan/apply/history/rollback` through the real CLI, the cloud-hypervisor double and real
Nix builds of examples/minimal.nix (variants through its `overrides`), in a throwaway network namespace.

The double runs no guest, so applies here wait for `booted` (the health-gated path is covered with a
health check nothing can pass, and with real guests in tests/e2e/test_apply_qemu.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from procurator import process
from procurator.state import record_fix
from tests.integration.conftest import ExampleBuild, NixBuild
from tests.support.bundles import write_deployment
from tests.support.cli import PROCURATOR
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
BOOTED = ("--wait", "booted")
EXIT_CHANGED = 4

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)


def overrides(web: str) -> list[str]:
    return ["--arg", "overrides", f"{{ web = {{ {web} }}; }}"]


@pytest.fixture(scope="module")
def release2(nix_build_example: NixBuild) -> ExampleBuild:
    """The example with web changed (a new kernel parameter): a new web bundle, the same api bundle."""
    web, api, deployment = nix_build_example(
        "web", "api", "deployment", args=overrides('cmdline = "procurator.release=2";')
    )
    return ExampleBuild(web=web, api=api, deployment=deployment)


@pytest.fixture(scope="module")
def broken(nix_build_example: NixBuild) -> Path:
    """A deployment whose new web generation cannot boot: its kernel is not in the store."""
    (deployment,) = nix_build_example(
        "deployment",
        args=overrides(
            'kernel = "/nix/store/00000000000000000000000000000000-missing-vmlinuz"; '
            'cmdline = "procurator.release=broken";'
        ),
    )
    return deployment


@pytest.fixture(scope="module")
def unhealthy(nix_build_example: NixBuild) -> Path:
    """A deployment whose new web generation never passes its health check (nothing listens on port 9)."""
    (deployment,) = nix_build_example(
        "deployment",
        args=overrides(
            'health = [ { type = "tcp"; port = 9; retries = 2; intervalSeconds = 1; timeoutSeconds = 1; } ];'
        ),
    )
    return deployment


def apply_json(host: VmHost, deployment: Path, *args: str, code: int = 0) -> dict[str, Any]:
    done = host.run("apply", str(deployment), *BOOTED, "--json", *args)
    assert done.returncode == code, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def outcomes(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {a["name"]: (a["kind"], a["outcome"]) for a in result["actions"]}


def history(host: VmHost) -> list[dict[str, Any]]:
    result: dict[str, Any] = json.loads(host.ok("history", "--json"))
    assert result["schema"] == 1
    generations: list[dict[str, Any]] = result["generations"]
    return generations


def pids(host: VmHost) -> dict[str, int]:
    return {name: vm["pid"] for name, vm in host.ps().items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent(host: VmHost, bundles: dict[str, Path]) -> None:
    """Exactly these VMs run these bundles: one live hypervisor and one TAP each, records agreeing."""
    vms = host.ps()
    assert {n: (v["state"], v["bundle"]) for n, v in vms.items()} == {
        n: ("running", str(p)) for n, p in bundles.items()
    }
    assert len(host.processes()) == len(bundles), host.processes()
    assert len(host.taps()) == len(bundles)
    for name, vm in vms.items():
        record = json.loads((host.state / "vms" / name / "record.json").read_text())
        assert process.alive(record["pid"], record["start_time"])
        assert record["taps"] == [t for t in host.taps() if f"-{name}-" in t or t.startswith(f"pc-{name}")]
        assert vm["pid"] == record["pid"]


def test_apply_change_one_vm_history_and_rollback(
    vm_host: VmHost, example_build: ExampleBuild, release2: ExampleBuild
) -> None:
    host = vm_host
    first = apply_json(host, example_build.deployment)
    assert outcomes(first) == {"api": ("create", "ok"), "web": ("create", "ok")}
    assert (first["changed"], first["failed"], first["history"]) == (True, False, 1)
    assert_consistent(host, example_build.bundles)
    before = host.ps()

    # Applying it again changes nothing (and says so with --exit-code's 0).
    again = host.run("apply", str(example_build.deployment), *BOOTED, "--exit-code")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"= keep api ({example_build.api.name[:12]} running)",
        f"= keep web ({example_build.web.name[:12]} running)",
    ]
    assert "apply: no change" in again.stderr

    # The plan of the changed deployment: exactly one replace, with its reason and the bundle diff.
    shown = host.run("plan", str(release2.deployment), "--exit-code")
    assert shown.returncode == EXIT_CHANGED, shown.stderr
    lines = shown.stdout.splitlines()
    old, new = example_build.web.name[:12], release2.web.name[:12]
    assert [line for line in lines if not line.startswith("    ")] == [
        f"= keep api ({example_build.api.name[:12]} running)",
        f"~ replace web ({old} -> {new}: bundle hash changed) [recreate]",
    ]
    assert f"    --- {example_build.web}/vm-config.json" in lines
    assert f"    +++ {release2.web}/vm-config.json" in lines
    assert any(line.startswith("    +") and "procurator.release=2" in line for line in lines)
    assert "plan: 0 to create, 1 to replace, 0 to start, 0 to remove, 1 unchanged" in shown.stderr
    planned = json.loads(host.ok("plan", str(release2.deployment), "--json"))
    assert [(a["kind"], a["name"]) for a in planned["actions"]] == [("keep", "api"), ("replace", "web")]
    assert planned["actions"][1]["old"] == str(example_build.web)
    assert planned["actions"][1]["new"] == str(release2.web)
    assert planned["changed"] is True

    # Apply replaces web on the same lease and volume; api is not touched.
    volume = host.state / "volumes" / "web" / "data.img"
    image = sha256(volume)
    replaced = apply_json(host, release2.deployment, "--exit-code", code=EXIT_CHANGED)
    assert outcomes(replaced) == {"api": ("keep", "ok"), "web": ("replace", "ok")}
    assert replaced["history"] == 2
    assert_consistent(host, release2.bundles)
    after = host.ps()
    assert after["api"]["pid"] == before["api"]["pid"]
    assert after["web"]["pid"] != before["web"]["pid"]
    assert after["web"]["ip"] == before["web"]["ip"]
    assert sha256(volume) == image

    gens = history(host)
    assert [(g["number"], g["deployment"], g["current"]) for g in gens] == [
        (1, str(example_build.deployment), False),
        (2, str(release2.deployment), True),
    ]
    table = host.ok("history").splitlines()
    assert table[0].split() == ["GENERATION", "DATE", "DEPLOYMENT", "CURRENT"]
    assert table[2].split()[-2:] == [str(release2.deployment), "*"]

    # Rollback (default: the previous generation) applies it again and makes it current.
    back = host.run("rollback", *BOOTED)
    assert back.returncode == 0, back.stderr
    assert back.stdout.splitlines()[1].startswith(
        f"~ replace web ({new} -> {old}: bundle hash changed) [recreate]: ok"
    )
    assert "deployment history generation 1" in back.stderr
    assert_consistent(host, example_build.bundles)
    assert host.ps()["api"]["pid"] == before["api"]["pid"]
    assert [g["current"] for g in history(host)] == [True, False]

    forward = json.loads(host.ok("rollback", "--to", "2", *BOOTED, "--json"))
    assert outcomes(forward) == {"api": ("keep", "ok"), "web": ("replace", "ok")}
    assert forward["history"] == 2
    assert_consistent(host, release2.bundles)
    assert len(history(host)) == 2  # switching generations makes no new one


def test_failed_start_of_the_new_generation_rolls_back(
    vm_host: VmHost, example_build: ExampleBuild, broken: Path
) -> None:
    host = vm_host
    apply_json(host, example_build.deployment)
    before = pids(host)

    done = host.run("apply", str(broken), *BOOTED, "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert outcomes(result) == {"api": ("keep", "ok"), "web": ("replace", "rolled-back")}
    web = next(a for a in result["actions"] if a["name"] == "web")
    assert "Cannot open kernel file" in web["error"]
    assert web["error"].endswith(f"old generation {example_build.web.name[:12]} runs again")
    assert (result["failed"], result["history"]) == (True, None)
    assert done.stderr.strip() == "error: apply failed: web rolled-back"

    assert_consistent(host, example_build.bundles)
    assert pids(host)["api"] == before["api"]
    assert [g["deployment"] for g in history(host)] == [str(example_build.deployment)]


def test_failing_health_checks_roll_back(
    vm_host: VmHost, example_build: ExampleBuild, unhealthy: Path
) -> None:
    host = vm_host
    apply_json(host, example_build.deployment)
    done = host.run("apply", str(unhealthy), "--wait", "healthy")
    assert done.returncode == 1
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("~")]
    assert ": rolled-back in " in line
    assert "health checks of 10.124.0." in line
    assert_consistent(host, example_build.bundles)
    assert len(history(host)) == 1


def test_ten_concurrent_applies_end_consistent(
    vm_host: VmHost, example_build: ExampleBuild, release2: ExampleBuild
) -> None:
    host = vm_host
    deployments = [example_build.deployment, release2.deployment] * 5
    procs = [
        subprocess.Popen(
            [str(PROCURATOR), "apply", str(d), *BOOTED, "--json"],
            env=host.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in deployments
    ]
    results = [(p.wait(timeout=150), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 10, [err for _, _, err in results]
    # Each apply ran alone under the lock: together they created each VM once, and every later one found
    # the other deployment's web (replace) or its own (keep).
    kinds = [outcomes(json.loads(out)) for _, out, _ in results]
    assert sum(k["api"] == ("create", "ok") for k in kinds) == 1
    assert all(k["api"][0] in ("create", "keep") for k in kinds)
    # The host runs the deployment that was applied last, which is the current generation.
    current = next(g for g in history(host) if g["current"])
    last = example_build if current["deployment"] == str(example_build.deployment) else release2
    assert current["deployment"] == str(last.deployment)
    assert_consistent(host, last.bundles)


def test_a_killed_hypervisor_is_started_again(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    apply_json(host, example_build.deployment)
    vms = host.ps()
    os.kill(vms["web"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while host.ps()["web"]["state"] != "exited":
        assert time.monotonic() < deadline, "web's hypervisor did not go away after SIGKILL"
        time.sleep(0.1)

    shown = host.ok("plan", str(example_build.deployment))
    assert f"> start web ({example_build.web.name[:12]} exited (exited): start it)" in shown.splitlines()
    result = apply_json(host, example_build.deployment)
    assert outcomes(result) == {"api": ("keep", "ok"), "web": ("start", "ok")}
    assert_consistent(host, example_build.bundles)
    after = host.ps()
    assert after["api"]["pid"] == vms["api"]["pid"]
    assert after["web"]["ip"] == vms["web"]["ip"]


def test_remove_keeps_volumes_and_lease(vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path) -> None:
    host = vm_host
    apply_json(host, example_build.deployment)
    ip = host.ps()["web"]["ip"]
    only_api = write_deployment(tmp_path / "d", "local", {"api": example_build.api})

    done = host.run("apply", str(only_api), *BOOTED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith(
        f"- remove web ({example_build.web.name[:12]} not in the deployment; volumes and lease kept): ok"
    )
    assert_consistent(host, {"api": example_build.api})
    assert (host.state / "volumes" / "web" / "data.img").exists()
    assert json.loads((host.state / "leases.json").read_text())["leases"]["web"]["ip"] == ip
    # A deployment outside the Nix store is applied but cannot become a generation of the profile.
    assert "not recorded in the deployment history (only deployments in the Nix store are)" in done.stderr
    assert len(history(host)) == 1

    # Back in the deployment, it comes back on its address with its volume.
    apply_json(host, example_build.deployment)
    assert host.ps()["web"]["ip"] == ip


def test_bad_deployments_are_refused_before_any_change(
    vm_host: VmHost, example_build: ExampleBuild, tmp_path: Path
) -> None:
    host = vm_host
    bundle = host.run("apply", str(example_build.web))
    assert bundle.returncode == 2
    assert bundle.stderr.strip() == (
        f"error: {example_build.web} is the bundle of VM 'web', not a deployment; boot a single bundle with "
        f"`procurator up {example_build.web}`, or list it in a deployment (lib.mkDeployment) and apply that"
    )

    missing = Path("/nix/store/00000000000000000000000000000000-procurator-vm-web")
    not_copied = write_deployment(tmp_path / "a", "local", {"api": example_build.api, "web": missing})
    for command in ("plan", "apply"):
        done = host.run(command, str(not_copied))
        assert done.returncode == 1
        assert done.stderr.strip() == (
            f"error: VM 'web': bundle {missing} (named in {not_copied}/deployment.json) is not in this "
            "host's Nix store; copy the deployment's closure here first: "
            f"nix copy --to ssh://<this host> {not_copied}"
        )

    swapped = write_deployment(tmp_path / "b", "local", {"web": example_build.api})
    done = host.run("apply", str(swapped))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: {swapped}/deployment.json: vms.web: points at a bundle named 'api'; rename one of them"
    )
    assert host.ps() == {}
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}

    no_history = host.run("rollback")
    assert no_history.returncode == 1
    assert "no deployment history on this host yet" in no_history.stderr


def test_a_damaged_record_is_named_and_nothing_changes(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    apply_json(host, example_build.deployment)
    processes = sorted(host.processes())
    record = host.state / "vms" / "web" / "record.json"
    text = record.read_text()
    record.write_text(text[: len(text) // 2])
    done = host.run("apply", str(example_build.deployment))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {record}: damaged state file: not JSON (")
    assert done.stderr.strip().endswith(record_fix("web"))
    assert sorted(host.processes()) == processes
    record.write_text(text)  # repaired: the fixture's teardown stops both VMs
