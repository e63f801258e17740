"""procurator.deploy without hosts: the fleet's parsing and selection, the exact ssh and nix commands
(the process chokepoint patched), rollback decisions, and the live status lines."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from procurator import deploy, nix, process
from procurator.cli.deploy import LiveStatus, render
from procurator.deploy import Event, Fleet, FleetRef, HostResult, HostSpec, Options, Phase, Result
from procurator.errors import NixError, UsageError, ValidationError
from procurator.history import Generation, History
from procurator.reconcile import Action, ActionKind, ActionResult, ApplyResult, Outcome
from procurator.resolve import RefKind, parse_ref


def inventory(**hosts: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 1, "hosts": {n: {"target": f"root@{n}", **h} for n, h in hosts.items()}}


def fleet_of(tmp_path: Path, **hosts: dict[str, Any]) -> Fleet:
    (tmp_path / "hosts.nix").write_text("{ }")
    return Fleet.parse(FleetRef.parse(str(tmp_path / "hosts.nix")), inventory(**hosts))


def test_host_settings_are_parsed_and_checked() -> None:
    spec = HostSpec.parse(
        "x",
        "w1",
        {
            "target": "root@10.0.0.2",
            "port": 2222,
            "identityFile": "/k",
            "sshOptions": ["-o", "A=b"],
            "tags": ["web"],
            "procurator": "sudo procurator",
        },
    )
    assert spec.store == "ssh://root@10.0.0.2"
    assert spec.ssh_options_for(5) == [
        "-o",
        "A=b",
        "-p",
        "2222",
        "-i",
        "/k",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "ServerAliveInterval=10",
        "-o",
        "ServerAliveCountMax=3",
    ]
    shared = spec.ssh_options_for(5, Path("/run/x"))
    assert shared[-6:] == [
        "-o",
        "ControlMaster=auto",
        "-o",
        "ControlPath=/run/x/%C",
        "-o",
        "ControlPersist=60",
    ]
    bad = [
        ("W1", {"target": "x"}, "not a DNS label"),
        ("w1", {"target": "-oProxyCommand=x"}, "hosts.w1.target"),
        ("w1", {"target": "a b"}, "hosts.w1.target"),
        ("w1", {"target": "x", "port": 70000}, "hosts.w1.port"),
        ("w1", {"target": "x", "port": True}, "hosts.w1.port"),
        ("w1", {"target": "x", "tags": ["Web"]}, "hosts.w1.tags"),
        ("w1", {"target": "x", "sshOptions": ["-o A=b"]}, "hosts.w1.sshOptions"),
        ("w1", {"target": "x", "procurator": " "}, "hosts.w1.procurator"),
        ("w1", {"target": "x", "procurator": "sudo 'procurator"}, "hosts.w1.procurator"),
    ]
    for name, data, where in bad:
        with pytest.raises(ValidationError, match=where):
            HostSpec.parse("x", name, data)


def test_refs_and_selection(tmp_path: Path) -> None:
    (tmp_path / "hosts.nix").write_text("{ }")
    file_ref = FleetRef.parse(f"{tmp_path}/hosts.nix#fleet")
    assert (file_ref.is_file, file_ref.attr) == (True, "fleet")
    assert file_ref.deployment_attr("w1") == f"{tmp_path}/hosts.nix fleet.hosts.w1.deployment"
    flake = FleetRef.parse(str(tmp_path))
    assert (flake.is_file, flake.attr) == (False, deploy.DEFAULT_ATTR)
    assert flake.deployment_attr("w1") == f"{tmp_path}#procuratorHosts.hosts.w1.deployment"
    for ref in ("", f"{tmp_path}/missing.nix", f"{tmp_path}/nothing-here", f"{tmp_path}#"):
        with pytest.raises(UsageError):
            FleetRef.parse(ref)
    with pytest.raises(ValidationError, match="schema"):
        Fleet.parse(file_ref, {"schema": 2, "hosts": {}})

    fleet = fleet_of(tmp_path, a={"tags": ["x"]}, b={"tags": ["x", "y"]}, c={})
    assert [h.name for h in fleet.select(None)] == ["a", "b", "c"]
    assert [h.name for h in fleet.select("@y, c")] == ["b", "c"]
    assert [h.name for h in fleet.select("@x,a")] == ["a", "b"]
    with pytest.raises(UsageError, match=r"no host 'd' .* \(hosts: a, b, c\)"):
        fleet.select("a,d")
    with pytest.raises(UsageError, match=r"no host has tag 'z' \(tags: x, y\)"):
        fleet.select("@z")
    with pytest.raises(UsageError, match="empty item"):
        fleet.select("a,,b")


# Arguments a shell would otherwise split, expand, substitute or run.
TRICKY = ("a b", "it's", '"quoted"', "$HOME", "${PATH}", "`id`", "$(id)", "; echo injected", "*", "\\n", "")


def test_a_remote_command_is_one_quoted_line_that_a_shell_splits_back_into_its_arguments() -> None:
    spec = HostSpec.parse("x", "w1", {"target": "root@w1", "procurator": "sudo -n procurator", "port": 2222})
    assert spec.command == ["sudo", "-n", "procurator"]
    remote = deploy.Remote(spec, 5)
    argv = remote.ssh().argv(["printf", "<%s>\\n", *TRICKY])
    opts = spec.ssh_options_for(5)
    assert argv == ("ssh", "-n", *opts, "--", "root@w1", argv[-1])
    assert argv[-1].startswith("printf '<%s>\\n' 'a b' 'it'\"'\"'s' ")
    # What sshd does with it: the login shell runs the line (`sh -c LINE`).
    done = process.run(["sh", "-c", argv[-1]])
    assert done.stdout.splitlines() == [f"<{a}>" for a in TRICKY]
    assert remote.ssh(own_session=True).argv(["true"]) == ("setsid", "--wait", *argv[:-1], "true")
    assert remote.ssh().control_argv("exit") == ("ssh", *opts, "-O", "exit", "--", "root@w1")


def test_the_fleet_reads_its_ref_with_the_one_parser_of_refs(tmp_path: Path) -> None:
    """resolve.parse_ref serves both: a bundle REF may be a store path, a fleet REF may not; a flake
    fleet may go without its attribute; the same error lines."""
    (tmp_path / "hosts").write_text("{ }")  # a Nix file without .nix
    file_ref = parse_ref(f"{tmp_path}/hosts#fleet", hint="x")
    assert (file_ref.kind, file_ref.attr) == (RefKind.FILE, "fleet")
    assert (FleetRef.parse(file_ref.text).is_file, FleetRef.parse(file_ref.text).attr) == (True, "fleet")
    assert parse_ref(str(tmp_path), hint="x").kind is RefKind.PATH
    assert FleetRef.parse(str(tmp_path)).attr == deploy.DEFAULT_ATTR
    for ref in (f"{tmp_path}#", f"{tmp_path}/a.nix#"):
        with pytest.raises(UsageError, match="empty attribute after '#'"):
            parse_ref(ref, hint="x")
        with pytest.raises(UsageError, match="empty attribute after '#'"):
            FleetRef.parse(ref)
    with pytest.raises(UsageError, match=r"^empty REF; give a flake \(`\.`, `\.#fleet`\) or a Nix file"):
        FleetRef.parse("")
    with pytest.raises(UsageError, match="is neither a flake directory, a flake URL nor a Nix file"):
        FleetRef.parse(f"{tmp_path}/nothing-here")
    with pytest.raises(UsageError, match="no such path"):
        parse_ref(f"{tmp_path}/nothing-here", hint="x")


class FakeHosts:
    """Stands in for ssh (the process chokepoint's subprocess.run): answers `procurator ...` per host,
    records every argv."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, Any, str]]) -> None:
        self.answers = answers  # (target, subcommand) -> (exit status, JSON or None, stderr)
        self.calls: list[tuple[str, ...]] = []
        self.lock = threading.Lock()

    def run(self, argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        args = tuple(argv)
        with self.lock:
            self.calls.append(args)
        ssh = args[args.index("ssh") :]
        target, command = ssh[ssh.index("--") + 1], ssh[-1]
        sub = command.split()[1] if " " in command else command
        code, doc, err = self.answers.get((target, sub), (0, None, ""))
        return subprocess.CompletedProcess(args, code, json.dumps(doc) if doc is not None else "", err)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(subprocess, "run", self.run)  # the one process.run calls


def apply_doc(*, failed: bool, history: int | None) -> dict[str, Any]:
    """What a remote `procurator apply --json` prints: reconcile's own ApplyResult, serialised."""
    replace = Action(ActionKind.REPLACE, "web", "/nix/store/a-web", "/nix/store/b-web", "bundle changed")
    create = Action(ActionKind.CREATE, "db", None, "/nix/store/c-db", "not on this host")
    result = ApplyResult(
        "/nix/store/d-deployment",
        (
            ActionResult(replace, Outcome.ROLLED_BACK if failed else Outcome.OK, "unhealthy", 1.0),
            ActionResult(create, Outcome.OK, "", 1.0),
        ),
        2.0,
        history=history,
    )
    return result.to_json()


def history_doc(*generations: Generation) -> dict[str, Any]:
    return History("/var/lib/procurator/profiles/deployment", generations).to_json()


def test_a_failed_apply_rolls_that_host_back_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = fleet_of(tmp_path, a={}, b={"procurator": "/opt/procurator"}, c={}, d={})
    hist = history_doc(Generation(3, "2026-12-01 10:00:00", "/nix/store/x", True))
    rolled_back = ApplyResult("/nix/store/x", (), 1.0, history=3).to_json()
    fake = FakeHosts(
        {
            ("root@a", "apply"): (0, apply_doc(failed=False, history=4), ""),
            ("root@b", "apply"): (1, apply_doc(failed=True, history=None), "error: apply failed"),
            ("root@b", "history"): (0, hist, ""),
            ("root@b", "rollback"): (0, rolled_back, ""),
            ("root@c", "true"): (255, None, "ssh: connect to host c port 22: Connection refused"),
            ("root@d", "history"): (0, history_doc(), ""),
            ("root@d", "apply"): (1, apply_doc(failed=True, history=None), "error: apply failed"),
        }
    )
    fake.install(monkeypatch)
    built: list[str] = []
    copied: list[tuple[str, tuple[str, ...]]] = []

    batches: list[list[str]] = []

    def build_file_attrs(file: Path, attrs: Sequence[str]) -> list[Path]:
        batches.append(list(attrs))
        outs = []
        for attr in reversed(attrs):  # matched by the host each names, not by order
            host = attr.split(".")[1]
            built.append(attr)
            out = tmp_path / f"deployment-{host}"
            out.mkdir(exist_ok=True)
            (out / "deployment.json").write_text(json.dumps({"schema": 1, "host": host, "vms": {}}))
            outs.append(out)
        return outs

    def copy_to(paths: Sequence[Path], store: str, *, ssh_options: Sequence[str] = (), **_kw: Any) -> None:
        copied.append((store, tuple(ssh_options)))

    monkeypatch.setattr(nix, "build_file_attrs", build_file_attrs)
    monkeypatch.setattr(nix, "copy_to", copy_to)
    events: list[Event] = []
    options = Options(parallel=2, share_connections=False)
    result = deploy.deploy(fleet, fleet.select(None), options, progress=events.append)

    assert {h.name: h.result for h in result.hosts} == {
        "a": Result.DEPLOYED,
        "b": Result.ROLLED_BACK,
        "c": Result.UNREACHABLE,
        "d": Result.ROLLED_BACK,
    }
    assert sorted(built) == ["hosts.a.deployment", "hosts.b.deployment", "hosts.d.deployment"]
    assert len(batches) == 1  # one nix for every reachable host: the fleet is evaluated once
    assert sorted(s for s, _ in copied) == ["ssh://root@a", "ssh://root@b", "ssh://root@d"]
    a, b, c, d = result.hosts
    assert a.counts == {"create": 1, "replace": 1, "start": 0, "remove": 0}
    assert a.generation == 4
    assert (b.stage, b.generation) == (deploy.Stage.APPLY, 3)
    assert b.error == "apply failed: web rolled-back: unhealthy; rolled back to generation 3"
    assert c.error == "ssh: connect to host c port 22: Connection refused"
    assert "no earlier generation: took down the VMs it created (db)" in d.error
    assert not result.ok

    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10"]
    opts += ["-o", "ServerAliveCountMax=3"]
    b_calls = [c for c in fake.calls if "root@b" in c]
    path = str(tmp_path / "deployment-b")
    ssh = ("ssh", "-n", *opts, "--", "root@b")
    assert b_calls == [
        (*ssh, "true"),
        ("setsid", "--wait", *ssh, f"/opt/procurator apply {path} --json --wait healthy"),
        (*ssh, "/opt/procurator history --json"),
        ("setsid", "--wait", *ssh, "/opt/procurator rollback --to 3 --json --wait booted"),
    ]
    d_calls = [c[-1] for c in fake.calls if "root@d" in c]
    assert d_calls[-1] == "procurator down db"
    # Every host went through its phases in order and ended with exactly one result.
    phases = [e.phase for e in events if e.host == "b"]
    assert phases == [
        Phase.QUEUED,
        Phase.CHECKING,
        Phase.WAITING,
        Phase.BUILDING,
        Phase.WAITING,  # built with the others, until its turn
        Phase.COPYING,
        Phase.APPLYING,
        Phase.ROLLING_BACK,
        Phase.DONE,
    ]
    assert [e.phase for e in events if e.host == "c"] == [Phase.QUEUED, Phase.CHECKING, Phase.DONE]


def test_an_apply_that_refuses_before_acting_is_not_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = fleet_of(tmp_path, a={})
    fake = FakeHosts(
        {
            ("root@a", "apply"): (1, None, "error: another command holds the state lock"),
        }
    )
    fake.install(monkeypatch)
    monkeypatch.setattr(nix, "build_file", lambda _file, _attr: [tmp_path / "d"])
    monkeypatch.setattr(nix, "copy_to", lambda *_a, **_k: None)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "deployment.json").write_text('{"schema": 1, "host": "a", "vms": {}}')
    (a,) = deploy.deploy(fleet, fleet.select(None), Options(share_connections=False)).hosts
    assert (a.result, a.stage) == (Result.FAILED, deploy.Stage.APPLY)
    assert a.error == "apply on root@a failed: another command holds the state lock; nothing changed"
    assert [c[-1].split()[:2] for c in fake.calls] == [["true"], ["procurator", "apply"]]


def result(name: str, res: Result, **kw: Any) -> HostResult:
    return HostResult(name, f"root@{name}", res, duration=1.25, **kw)


def test_live_status_on_a_terminal_redraws_in_place_and_erases_itself() -> None:
    hosts = [HostSpec("a", "root@a"), HostSpec("bb", "root@bb")]
    out = io.StringIO()
    with LiveStatus(hosts, out, tty=True) as live:
        live.event(Event("a", Phase.APPLYING))
        counts = {"create": 2, "replace": 0, "start": 0, "remove": 1}
        live.event(Event("a", Phase.DONE, "", result("a", Result.DEPLOYED, counts=counts)))
        assert live.line("a", 0.0) == "a   deployed           1.2s  2 created, 0 replaced, 1 removed"
        assert live.line("bb", 0.0).split() == ["bb", "queued", "0.0s"]
    text = out.getvalue()
    assert "\x1b[2A" in text  # back up over the two lines to redraw them
    assert "\r\x1b[2K" in text
    assert "\x1b[32ma   deployed" in text  # green
    assert text.endswith("\x1b[2A\x1b[J")  # erased on close: the table takes its place


def test_live_status_elsewhere_is_one_plain_line_per_change() -> None:
    out = io.StringIO()
    with LiveStatus([HostSpec("a", "root@a")], out, tty=False) as live:
        live.event(Event("a", Phase.QUEUED))
        live.event(Event("a", Phase.CHECKING, "root@a"))
        live.event(Event("a", Phase.DONE, "", result("a", Result.UNREACHABLE, error="ssh: refused")))
    assert out.getvalue().splitlines() == ["a: checking (root@a)", "a: unreachable in 1.2s: ssh: refused"]
    assert "\x1b" not in out.getvalue()


def test_the_final_table(capsys: pytest.CaptureFixture[str]) -> None:
    res = deploy.DeployResult(
        "hosts.nix",
        False,
        (
            result("a", Result.DEPLOYED, counts={"create": 1, "replace": 2, "start": 0, "remove": 0}),
            result("b", Result.ROLLED_BACK, stage=deploy.Stage.APPLY, error="apply failed: x"),
        ),
        3.0,
    )
    render(res)
    out, err = capsys.readouterr()
    assert [line.split() for line in out.splitlines()] == [
        ["HOST", "RESULT", "CREATED", "REPLACED", "REMOVED", "DURATION"],
        ["a", "deployed", "1", "2", "0", "1.2s"],
        ["b", "rolled-back", "-", "-", "-", "1.2s"],
    ]
    assert err == "b: rolled-back at apply: apply failed: x\n"


def test_when_the_build_together_fails_each_host_builds_its_own_and_keeps_its_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = fleet_of(tmp_path, a={}, b={})
    FakeHosts({("root@a", "apply"): (0, apply_doc(failed=False, history=1), "")}).install(monkeypatch)

    def together(_file: Path, attrs: Sequence[str]) -> list[Path]:
        raise NixError(f"error: attribute 'deployment' missing in {attrs[1]}")

    def alone(_file: Path, attr: str | None) -> list[Path]:
        host = str(attr).split(".")[1]
        if host == "b":
            raise NixError("error: attribute 'deployment' missing")
        out = tmp_path / f"deployment-{host}"
        out.mkdir(exist_ok=True)
        (out / "deployment.json").write_text(json.dumps({"schema": 1, "host": host, "vms": {}}))
        return [out]

    monkeypatch.setattr(nix, "build_file_attrs", together)
    monkeypatch.setattr(nix, "build_file", alone)
    monkeypatch.setattr(nix, "copy_to", lambda *_a, **_k: None)
    a, b = deploy.deploy(fleet, fleet.select(None), Options(share_connections=False)).hosts
    assert a.result is Result.DEPLOYED
    assert (b.result, b.stage) == (Result.FAILED, deploy.Stage.BUILD)
    assert "attribute 'deployment' missing" in str(b.error)


def test_a_ctrl_c_while_building_together_leaves_every_host_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = fleet_of(tmp_path, a={}, b={})
    fake = FakeHosts({})
    fake.install(monkeypatch)

    def together(_file: Path, _attrs: Sequence[str]) -> list[Path]:
        time.sleep(0.3)  # a person presses Ctrl-C while nix builds
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's: it reaches us and nix alike
        time.sleep(0.3)
        raise NixError("error: interrupted by the user")

    def alone(_file: Path, _attr: str | None) -> list[Path]:
        raise AssertionError("no host builds after the interrupt")

    monkeypatch.setattr(nix, "build_file_attrs", together)
    monkeypatch.setattr(nix, "build_file", alone)
    result = deploy.deploy(fleet, fleet.select(None), Options(share_connections=False))
    assert result.interrupted
    assert [(h.result, h.stage, h.error) for h in result.hosts] == [
        (Result.INTERRUPTED, deploy.Stage.BUILD, "interrupted while building; host unchanged")
    ] * 2
    assert all(c[-1] == "true" for c in fake.calls)  # the pre-flight, and nothing after it
