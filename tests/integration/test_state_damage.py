"""Damaged state files, through the CLI and the cloud-hypervisor double: every field of a VM record with a
wrong type, a torn, non-UTF-8, deeply nested or huge-number file, a directory in its place; a record that
names a dead pid while its VM runs; the lock path a directory; a deleted lease file.

Each damage is reported in one line naming the file and the fix, nothing is changed by a refused command,
`ps` still lists every VM (the damaged one as such), and the documented fix converges in one re-run."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from procurator.state import record_fix
from tests.integration.conftest import ExampleBuild
from tests.integration.test_worker import assert_converged, kill9
from tests.support.host import REPO, VmHost

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
CH = {"hypervisor": {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}}
BOOTED = ("--wait", "booted")

pytestmark = pytest.mark.parametrize("vm_host", [CH], indirect=True)

# A wrong value for each field of a VM record (state.VmRecord), and what must be named.
WRONG_FIELDS: dict[str, Any] = {
    "name": 5,
    "bundle": None,
    "generation": [],
    "backend": {},
    "pid": "12",
    "start_time": -1,
    "api_socket": 1.5,
    "vm_dir": True,
    "taps": "pc-web0",
    "ip": 10,
    "mac": ["02:00:00:00:00:01"],
    "netns": 3,
    "created_at": "yesterday",
    "started_at": float("inf"),
    "restarts": True,
    "shutdown_timeout": -5,
    "desired": "bogus",
    "last_exit": 0,
}


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    return lines[0]


def hypervisors(host: VmHost) -> list[str]:
    return sorted(p for p in host.processes() if "cloud-hypervisor" in p)


def leases(host: VmHost) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((host.state / "leases.json").read_text())["leases"]
    return data


def damages(good: dict[str, Any]) -> list[tuple[str, bytes | None, str]]:
    """(what, new bytes of record.json or None for a directory in its place, text the error must name)."""
    out: list[tuple[str, bytes | None, str]] = []
    for key, value in WRONG_FIELDS.items():
        out.append(
            (f"{key} wrong", json.dumps({**good, key: value}).encode(), f"damaged state file: {key}: ")
        )
    out += [
        (
            "name of another VM",
            json.dumps({**good, "name": "api"}).encode(),
            "is not the name of its directory",
        ),
        ("unknown field", json.dumps({**good, "colour": "red"}).encode(), "colour: unknown field"),
        ("pid missing", json.dumps({k: v for k, v in good.items() if k != "pid"}).encode(), "pid: missing"),
        (
            "schema 2",
            json.dumps({**good, "schema": 2}).encode(),
            "schema: unknown schema version 2; this procurator reads 1",
        ),
        ("a list", b"[1, 2]", "schema: expected a VM record"),
        ("torn", json.dumps(good).encode()[:50], "not JSON (Unterminated string"),
        ("empty", b"", "not JSON (Expecting value at line 1 column 1)"),
        ("not UTF-8", b'{"name": "\xff\xfe"}', "not UTF-8 (byte 10)"),
        ("nested deep", b"[" * 200_000 + b"]" * 200_000, "not JSON that can be read (RecursionError)"),
        ("huge number", b'{"pid": 1' + b"0" * 5000 + b"}", "not JSON that can be read (ValueError)"),
        ("a directory", None, "damaged state file: a directory, not a file"),
    ]
    return out


def test_every_damaged_record_is_one_line_and_changes_nothing(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("apply", str(example_build.deployment), *BOOTED)
    path = host.state / "vms" / "web" / "record.json"
    good = json.loads(path.read_text())
    before = (hypervisors(host), sorted(host.taps()), leases(host))
    assert len(before[0]) == 2
    for what, data, named in damages(good):
        path.unlink()
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)

        listed = host.run("ps", "--json")  # ps lists the damaged VM; it does not stop at it
        assert listed.returncode == 0, (what, listed.stderr)
        rows = {vm["name"]: vm for vm in json.loads(listed.stdout)}
        assert rows["api"]["state"] == "running", what
        assert rows["web"]["state"] == "damaged", what
        assert rows["web"]["problem"].startswith(f"{path}: damaged state file: "), what
        assert named in rows["web"]["problem"], (what, rows["web"]["problem"])
        assert listed.stderr.strip().splitlines() == [f"web: {rows['web']['problem']}"], what

        for argv in (
            ("apply", str(example_build.deployment), *BOOTED),
            ("plan", str(example_build.deployment)),
        ):
            line = one_line_error(host.run(*argv))
            assert line.startswith(f"error: {path}: damaged state file: "), (what, argv, line)
            assert named in line, (what, line)
            assert line.endswith(record_fix("web")), (what, line)
        assert host.run("logs", "web").returncode == 0, what  # the serial log stays readable
        assert (hypervisors(host), sorted(host.taps()), leases(host)) == before, what

        if data is None:
            path.rmdir()
        path.write_text(json.dumps(good))
    assert_converged(host, example_build.bundles)


def test_the_fix_stops_the_damaged_vm_and_one_apply_converges(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("apply", str(example_build.deployment), *BOOTED)
    web_ip = leases(host)["web"]
    path = host.state / "vms" / "web" / "record.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "taps": "pc-web0"}))  # damaged: a string

    done = host.run("down", "web")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "web: down (damaged record -> SIGKILL)"
    aside = list((host.state / "damaged").iterdir())
    assert [p.name.split(".")[0] for p in aside] == ["web"]
    assert json.loads(aside[0].read_text())["taps"] == "pc-web0"  # kept as it was, for reading
    assert len(hypervisors(host)) == 1
    assert set(host.ps()) == {"api"}

    host.ok("apply", str(example_build.deployment), *BOOTED)
    assert_converged(host, example_build.bundles)
    assert leases(host)["web"] == web_ip  # the lease was kept


def test_a_record_naming_a_dead_pid_does_not_double_the_vm_or_cut_it_off(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("apply", str(example_build.deployment), *BOOTED)
    path = host.state / "vms" / "web" / "record.json"
    record = json.loads(path.read_text())
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait(timeout=10)
    path.write_text(json.dumps({**record, "pid": dead.pid}))

    assert host.ps()["web"]["state"] == "exited"
    result = json.loads(host.ok("apply", str(example_build.deployment), *BOOTED, "--json"))
    actions = {a["name"]: (a["kind"], a["outcome"]) for a in result["actions"]}
    assert actions == {"web": ("start", "ok"), "api": ("keep", "ok")}
    assert_converged(host, example_build.bundles)  # one hypervisor each, each with its TAP
    assert host.ps()["web"]["pid"] not in (record["pid"], dead.pid)


def test_the_lock_path_a_directory_is_one_line(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("apply", str(example_build.deployment), *BOOTED)
    lock = host.state / "lock"
    lock.unlink()
    lock.mkdir()
    for argv in (("apply", str(example_build.deployment), *BOOTED), ("down", "web"), ("stop", "api")):
        line = one_line_error(host.run(*argv))
        assert line == f"error: {lock}: a directory, not the lock file; remove it (rmdir) and retry", argv
    assert set(host.ps()) == {"web", "api"}
    lock.rmdir()
    assert_converged(host, example_build.bundles)


def test_a_deleted_lease_file_is_rebuilt_before_a_new_lease(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("up", str(example_build.web))
    web = leases(host)["web"]
    (host.state / "leases.json").unlink()

    done = host.run("up", str(example_build.api))
    assert done.returncode == 0, done.stderr
    now = leases(host)
    assert now["web"] == web  # rebuilt from web's record
    assert now["api"]["ip"] != web["ip"]
    assert host.ps()["api"]["ip"] == now["api"]["ip"]


def test_a_damaged_lease_file_is_one_line(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web))
    path = host.state / "leases.json"
    path.write_text('{"schema": 1, "leases": {"web": {"ip": "10.124.0.2", "mac": 7}}}')
    line = one_line_error(host.run("up", str(example_build.api)))
    assert line.startswith(f"error: {path}: damaged state file: leases.web.mac: 7 is not a MAC")
    assert line.endswith("move it aside: it is rebuilt from the VM records at the next command")
    assert set(host.ps()) == {"web"}
    path.rename(path.with_suffix(".bad"))
    host.ok("up", str(example_build.api))
    assert set(leases(host)) == {"web", "api"}
    assert len(hypervisors(host)) == 2


def test_kill9_leaves_no_stray_after_the_fix(vm_host: VmHost, example_build: ExampleBuild) -> None:
    """A damaged record of a VM whose hypervisor was then killed: `down` finds nothing to stop."""
    host = vm_host
    host.ok("apply", str(example_build.deployment), *BOOTED)
    pid = host.ps()["web"]["pid"]
    path = host.state / "vms" / "web" / "record.json"
    path.write_text("{")
    kill9(pid)
    done = host.run("down", "web")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "web: down (was not running)"
    host.ok("apply", str(example_build.deployment), *BOOTED)
    assert_converged(host, example_build.bundles)


def test_doctor_names_a_damaged_state_file(vm_host: VmHost, example_build: ExampleBuild) -> None:
    host = vm_host
    host.ok("up", str(example_build.web))
    path = host.state / "vms" / "web" / "record.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "restarts": "3"}))
    done = host.run("doctor", "--json")
    assert done.returncode == 1
    state = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["state"]
    assert state["status"] == "fail"
    assert state["detail"] == f'{path}: restarts: expected a whole number from 0, not "3"'
    assert state["fix"] == record_fix("web")
    assert len(hypervisors(host)) == 1  # doctor changed nothing


def test_a_dangling_profile_link_is_reported_not_read_as_no_history(
    vm_host: VmHost, example_build: ExampleBuild
) -> None:
    host = vm_host
    host.ok("apply", str(example_build.deployment), *BOOTED)
    profiles = host.state / "profiles"
    assert (profiles / "deployment").readlink().name == "deployment-1-link"
    (profiles / "deployment-1-link").unlink()
    done = host.run("apply", str(example_build.deployment), *BOOTED)
    assert done.returncode == 1
    assert (
        f"{profiles / 'deployment'}: points at generation link 'deployment-1-link', which is missing; "
        "switch to a generation that exists" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert_converged(host, example_build.bundles)  # the VMs were already as desired: nothing changed
