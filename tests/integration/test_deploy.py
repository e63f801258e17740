"""`procurator deploy` end to end: real sshd per fake host (each in its own network namespace with its
own Nix store, tests/support/sshhost.py), real `nix copy` over SSH, the real `procurator apply` there.

VMs run on the cloud-hypervisor double (no guest, so the test deployments declare no health checks,
except where a failing one is the point); one host runs its VM under real QEMU, booted once and health
checked, in the first test only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from procurator import process
from procurator.deploy import Fleet, Remote
from tests.support.cli import PROCURATOR
from tests.support.sshhost import HOSTS_NIX, FakeFleet, HostDecl, fake_fleet

RELEASE2 = 'cmdline = "procurator.release=2";'
UNHEALTHY = 'health = [ { type = "tcp"; port = 9; retries = 2; intervalSeconds = 1; timeoutSeconds = 1; } ];'
BROKEN = (
    'builtins.derivation { name = "broken"; system = builtins.currentSystem; builder = "/bin/sh"; '
    'args = [ "-c" "exit 3" ]; }'
)


def bundles(deployment: str) -> dict[str, str]:
    """VM name -> bundle of a deployment in the deployer's store."""
    vms: dict[str, str] = json.loads((Path(deployment) / "deployment.json").read_text())["vms"]
    return vms


def parsed(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON a `deploy --json` printed (failing with its stderr if there is none)."""
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"deploy printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return result


def by_host(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in result["hosts"]}


def summary(result: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {h["name"]: (h["result"], h["created"], h["replaced"], h["removed"]) for h in result["hosts"]}


@pytest.fixture
def fleet_root(tmp_path: Path) -> Path:
    return tmp_path / "fleet"


def test_deploy_three_hosts_then_change_one(fleet_root: Path) -> None:
    with fake_fleet(fleet_root, {"q1": "qemu", "h2": "double", "h3": "double"}) as fleet:
        v1 = fleet.write_hosts(
            {
                "q1": HostDecl(FakeFleet.web_only("q1"), tags=["qemu"]),
                "h2": HostDecl(FakeFleet.example("h2"), tags=["double"]),
                "h3": HostDecl(FakeFleet.example("h3"), tags=["double"]),
            },
            "v1.nix",
        )
        first = fleet.deploy_json(str(v1))
        assert first["ok"] is True
        assert (first["dryRun"], first["interrupted"]) == (False, False)
        assert summary(first) == {
            "q1": ("deployed", 1, 0, 0),
            "h2": ("deployed", 2, 0, 0),
            "h3": ("deployed", 2, 0, 0),
        }
        hosts = by_host(first)
        for name, host in fleet.hosts.items():
            r = hosts[name]
            assert (r["target"], r["generation"]) == (host.target, 1)
            assert r["apply"]["deployment"] == r["deployment"]
            # The host runs exactly its deployment, from paths copied into its own store.
            want = bundles(r["deployment"])
            assert host.running() == want
            assert host.current() == r["deployment"]
            assert {r["deployment"], *want.values()} <= host.store_paths()
        for host in fleet.hosts.values():
            # One SSH connection per host, shared by the pre-flight, `nix copy` and the apply, and
            # closed at the end (sshd logs that a moment after the deploy returns).
            log = (host.root / "sshd.log").read_text()
            assert log.count("Accepted publickey for root") == 1
            assert log.count("Starting session: command") == 3
            deadline = time.monotonic() + 10
            while "Disconnected from user root" not in log:
                assert time.monotonic() < deadline, f"{host.name}: the shared connection stayed open"
                time.sleep(0.1)
                log = (host.root / "sshd.log").read_text()
        assert set(bundles(hosts["q1"]["deployment"])) == {"web"}
        assert hosts["h2"]["deployment"] not in fleet.hosts["h3"].store_paths()
        # q1 booted a real guest (QEMU) and passed its health check before the apply succeeded.
        q1 = fleet.hosts["q1"]
        web = q1.ps()["web"]
        assert web["backend"] == "qemu"
        health = q1.ns.exec("curl", "-fsS", "--max-time", "5", f"http://{web['ip']}/health", check=False)
        assert health.strip() != ""
        before = {name: host.pids() for name, host in fleet.hosts.items()}

        # Change one VM of one host: only that host changes.
        v2 = fleet.write_hosts(
            {
                "q1": HostDecl(FakeFleet.web_only("q1"), tags=["qemu"]),
                "h2": HostDecl(FakeFleet.example("h2", web=RELEASE2), tags=["double"]),
                "h3": HostDecl(FakeFleet.example("h3"), tags=["double"]),
            },
            "v2.nix",
        )
        done = fleet.deploy(str(v2))
        assert done.returncode == 0, done.stderr
        table = [line.split() for line in done.stdout.splitlines()]
        assert table[0] == ["HOST", "RESULT", "CREATED", "REPLACED", "REMOVED", "DURATION"]
        assert [row[:5] for row in table[1:]] == [  # hosts by name
            ["h2", "deployed", "0", "1", "0"],
            ["h3", "unchanged", "0", "0", "0"],
            ["q1", "unchanged", "0", "0", "0"],
        ]
        # Not a terminal: plain progress lines on stderr, one per change of phase.
        assert "h2: applying" in done.stderr.splitlines()
        assert any(line.startswith("h2: deployed in ") for line in done.stderr.splitlines())
        after = {name: host.pids() for name, host in fleet.hosts.items()}
        assert after["q1"] == before["q1"]
        assert after["h3"] == before["h3"]
        assert after["h2"]["api"] == before["h2"]["api"]
        assert after["h2"]["web"] != before["h2"]["web"]
        h2 = fleet.hosts["h2"]
        assert [g["number"] for g in h2.history()] == [1, 2]
        assert h2.running() == bundles(str(h2.current()))
        assert "procurator.release=2" in Path(h2.running()["web"], "vm-config.json").read_text()
        assert [g["number"] for g in fleet.hosts["h3"].history()] == [1]

        # Every host's deployment comes from one nix, one evaluation of the fleet, not one per host.
        again = fleet.deploy(str(v2), "--debug")
        assert again.returncode == 0, again.stderr
        builds = [line for line in again.stderr.splitlines() if "run: nix" in line and " build " in line]
        assert len(builds) == 1, builds
        assert all(f"hosts.{name}.deployment" in builds[0] for name in ("q1", "h2", "h3"))


def test_failing_host_is_rolled_back_while_the_others_deploy(fleet_root: Path) -> None:
    names = ("h1", "h2", "h3", "h4")
    with fake_fleet(fleet_root, dict.fromkeys(names, "double")) as fleet:
        v1 = fleet.write_hosts({n: HostDecl(FakeFleet.example(n)) for n in names}, "v1.nix")
        first = fleet.deploy_json(str(v1), "--on", "h1,h2,h3")
        assert [h["name"] for h in first["hosts"]] == ["h1", "h2", "h3"]
        old = {n: fleet.hosts[n].running() for n in ("h1", "h2", "h3")}

        # Every host gets a new api; h2 and h4 (which has no history yet) also a web that never passes
        # its health check.
        v2 = fleet.write_hosts(
            {
                "h1": HostDecl(FakeFleet.example("h1", api=RELEASE2)),
                "h2": HostDecl(FakeFleet.example("h2", api=RELEASE2, web=UNHEALTHY)),
                "h3": HostDecl(FakeFleet.example("h3", api=RELEASE2)),
                "h4": HostDecl(FakeFleet.example("h4", api=RELEASE2, web=UNHEALTHY)),
            },
            "v2.nix",
        )
        done = fleet.deploy(str(v2), "--json")
        assert done.returncode == 1, done.stderr
        result = parsed(done)
        assert result["ok"] is False
        hosts = by_host(result)
        assert {n: h["result"] for n, h in hosts.items()} == {
            "h1": "deployed",
            "h2": "rolled-back",
            "h3": "deployed",
            "h4": "rolled-back",
        }
        assert "error: deploy failed on 2 of 4 host(s): h2 (rolled-back), h4 (rolled-back)" in done.stderr

        # h2: the remote apply replaced api, failed web's health check and put web back; the deploy then
        # rolled the whole host back to generation 1: it runs exactly what it ran before.
        h2 = hosts["h2"]
        assert (h2["stage"], h2["generation"]) == ("apply", 1)
        assert "web rolled-back" in h2["error"]
        assert h2["error"].endswith("rolled back to generation 1")
        actions = {a["name"]: (a["kind"], a["outcome"]) for a in h2["apply"]["actions"]}
        assert actions == {"api": ("replace", "ok"), "web": ("replace", "rolled-back")}
        assert h2["rollback"]["history"] == 1
        assert fleet.hosts["h2"].running() == old["h2"]
        assert [(g["number"], g["current"]) for g in fleet.hosts["h2"].history()] == [(1, True)]

        # h4 had no earlier generation: the VMs the failed apply created were taken down again.
        h4 = hosts["h4"]
        assert h4["generation"] is None
        assert "took down the VMs it created (api)" in h4["error"]
        assert fleet.hosts["h4"].running() == {}
        assert fleet.hosts["h4"].history() == []

        # The healthy hosts run the new generation.
        for name in ("h1", "h3"):
            assert summary(result)[name] == ("deployed", 0, 1, 0)
            assert fleet.hosts[name].running() == bundles(hosts[name]["deployment"])
            assert fleet.hosts[name].running()["web"] == old[name]["web"]
            assert [g["number"] for g in fleet.hosts[name].history()] == [1, 2]


def test_dry_run_changes_nothing(fleet_root: Path) -> None:
    with fake_fleet(fleet_root, {"h1": "double", "h2": "double"}) as fleet:
        v1 = fleet.write_hosts({n: HostDecl(FakeFleet.example(n)) for n in fleet.hosts}, "v1.nix")
        # (-s: the hosts may substitute from their own caches; they have none, so everything is sent.)
        planned = fleet.deploy_json(str(v1), "--dry-run", "--substitute-on-destination")
        assert planned["dryRun"] is True
        assert summary(planned) == {"h1": ("planned", 2, 0, 0), "h2": ("planned", 2, 0, 0)}
        for name, host in fleet.hosts.items():
            assert host.running() == {}
            assert host.history() == []
            # The closure was copied (so the plan saw the real bundles); nothing else happened.
            assert by_host(planned)[name]["deployment"] in host.store_paths()

        fleet.deploy_json(str(v1))
        before = {name: host.pids() for name, host in fleet.hosts.items()}
        v2 = fleet.write_hosts(
            {"h1": HostDecl(FakeFleet.example("h1", web=RELEASE2)), "h2": HostDecl(FakeFleet.example("h2"))},
            "v2.nix",
        )
        done = fleet.deploy(str(v2), "--dry-run")
        assert done.returncode == 0, done.stderr
        out = done.stdout.splitlines()
        assert [line.split()[:5] for line in out[1:3]] == [
            ["h1", "planned", "0", "1", "0"],
            ["h2", "planned", "0", "0", "0"],
        ]
        h1 = out.index(f"h1 ({fleet.hosts['h1'].target}):")
        assert out[h1 + 1].startswith("  = keep api (")
        assert out[h1 + 2].startswith("  ~ replace web (")
        assert "bundle hash changed" in out[h1 + 2]
        assert any(line.startswith("      +") and "procurator.release=2" in line for line in out)
        h2 = out.index(f"h2 ({fleet.hosts['h2'].target}):")
        assert [line[:9] for line in out[h2 + 1 : h2 + 3]] == ["  = keep ", "  = keep "]
        for name, host in fleet.hosts.items():
            assert host.pids() == before[name]
            assert [g["number"] for g in host.history()] == [1]


def test_preflight_and_build_failures_stay_with_their_host(fleet_root: Path) -> None:
    backends = dict.fromkeys(("ok1", "ok2", "down", "badkey", "noproc", "broken"), "double")
    with fake_fleet(fleet_root, backends, stopped=["down"], unauthorized=["badkey"]) as fleet:
        hosts = fleet.write_hosts(
            {
                "ok1": HostDecl(FakeFleet.example("ok1"), tags=["blue"]),
                "ok2": HostDecl(FakeFleet.example("ok2"), tags=["green", "blue"]),
                "down": HostDecl(FakeFleet.example("down")),
                "badkey": HostDecl(FakeFleet.example("badkey")),
                "noproc": HostDecl(FakeFleet.example("noproc"), procurator="/nonexistent/procurator"),
                "broken": HostDecl(BROKEN, tags=["green"]),
            }
        )
        # Selection by tag: only ok2 and broken are touched.
        green = fleet.deploy_json(str(hosts), "--on", "@green", code=1)
        assert summary(green) == {"ok2": ("deployed", 2, 0, 0), "broken": ("failed", None, None, None)}
        assert fleet.hosts["ok1"].running() == {}

        # Every host: the failures stay with their host; ok1 deploys, ok2 is unchanged.
        done = fleet.deploy(str(hosts), "--json")
        assert done.returncode == 1
        result = by_host(parsed(done))
        assert {n: (r["result"], r["stage"]) for n, r in result.items()} == {
            "ok1": ("deployed", None),
            "ok2": ("unchanged", None),
            "down": ("unreachable", "preflight"),
            "badkey": ("unreachable", "preflight"),
            "noproc": ("failed", "apply"),
            "broken": ("failed", "build"),
        }
        assert "Connection refused" in result["down"]["error"]
        assert "Permission denied" in result["badkey"]["error"]
        assert "`/nonexistent/procurator` not found" in result["noproc"]["error"]
        assert "broken" in result["broken"]["error"]
        assert result["noproc"]["error"].endswith("nothing changed")
        # Pre-flight failures come before any build: those hosts have no deployment.
        assert [result[n]["deployment"] for n in ("down", "badkey")] == [None] * 2
        for name in ("badkey", "noproc", "broken"):
            assert fleet.hosts[name].running() == {}
        for name in ("badkey", "broken"):
            assert fleet.hosts[name].store_paths() == set()
        assert fleet.hosts["ok1"].running() == bundles(result["ok1"]["deployment"])
        assert "deploy failed on 4 of 6 host(s)" in done.stderr

        # Usage errors name what is known, and touch nothing.
        unknown = fleet.deploy(str(hosts), "--on", "ok1,nosuch")
        assert unknown.returncode == 2
        assert "no host 'nosuch'" in unknown.stderr
        assert "ok1" in unknown.stderr
        untagged = fleet.deploy(str(hosts), "--on", "@red")
        assert untagged.returncode == 2
        assert "no host has tag 'red' (tags: blue, green)" in untagged.stderr


def test_interrupt_lets_the_apply_in_flight_finish_and_skips_the_rest(fleet_root: Path) -> None:
    names = ("h1", "h2", "h3")
    with fake_fleet(fleet_root, dict.fromkeys(names, "double")) as fleet:
        fleet.hosts["h1"].set_env(CHDOUBLE_BOOT_DELAY="3")
        hosts = fleet.write_hosts({n: HostDecl(FakeFleet.example(n)) for n in names})
        proc = subprocess.Popen(
            fleet.deploy_argv(str(hosts), "--parallel", "1", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stderr is not None
            seen = []
            deadline = time.monotonic() + 120
            for line in proc.stderr:
                seen.append(line)
                if line.strip() == "h1: applying":
                    break
                assert time.monotonic() < deadline, "no `h1: applying` within 120 s"
            else:
                pytest.fail(f"the deploy ended before h1 applied: {''.join(seen)}")
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 130, err
        result = json.loads(out)
        assert result["interrupted"] is True
        assert {h["name"]: h["result"] for h in result["hosts"]} == {
            "h1": "deployed",
            "h2": "skipped",
            "h3": "skipped",
        }
        assert "error: interrupted: h1 (deployed), h2 (skipped), h3 (skipped)" in err
        assert fleet.hosts["h1"].running() == bundles(by_host(result)["h1"]["deployment"])
        for name in ("h2", "h3"):
            assert fleet.hosts[name].running() == {}
            assert fleet.hosts[name].history() == []


def test_remote_arguments_reach_the_host_intact(fleet_root: Path) -> None:
    """`process.run(argv, remote=...)` through a real sshd: the host's shell gets back each argument as
    it was given, none split, expanded, substituted or run."""
    tricky = ["a b", "it's", '"quoted"', "$HOME", "`id`", "$(echo x)", "; echo injected", "*", "\\", ""]
    with fake_fleet(fleet_root, {"h1": "double"}) as fleet:
        hosts = fleet.write_hosts({"h1": HostDecl(FakeFleet.example("h1"))})
        remote = Remote(Fleet.load(str(hosts)).hosts["h1"]).ssh()
        argv = ["printf", "<%s>\\n", *tricky]
        done = fleet.deployer._in_netns(lambda: process.run(argv, remote=remote, check=False, timeout=30))
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout.splitlines() == [f"<{a}>" for a in tricky]
        # And that went over ssh to the host, as the host's sshd logs.
        assert "Accepted publickey for root" in (fleet.hosts["h1"].root / "sshd.log").read_text()


def test_fleet_mistakes_are_refused_before_any_host_is_contacted(tmp_path: Path) -> None:
    def deploy(text: str, *args: str) -> subprocess.CompletedProcess[str]:
        hosts = tmp_path / "hosts.nix"
        hosts.write_text(text)
        return subprocess.run(
            [str(PROCURATOR), "deploy", str(hosts), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    bad = deploy(
        f'import {HOSTS_NIX} {{ defaults.target = "x"; hosts.w1 = {{ target = "-oProxyCommand=x"; '
        'port = 0; tags = [ "Web" ]; typo = 1; }; }'
    )
    assert bad.returncode == 1
    (line,) = bad.stderr.splitlines()
    assert line.startswith("error: nix eval failed: 6 problems: defaults.target: unknown setting")
    for problem in (
        "procurator host 'w1': unknown setting 'typo' (known: target, port,",
        "procurator host 'w1': target must be [user@]host without spaces",
        "procurator host 'w1': port must be a TCP port (1-65535), got 0",
        "procurator host 'w1': tags must be a list of DNS labels",
        "procurator host 'w1': give exactly one of deployment (a lib.mkDeployment) and vms",
    ):
        assert problem in line
    assert bad.stdout == ""

    fine = f'import {HOSTS_NIX} {{ hosts.w1 = {{ target = "root@192.0.2.1"; vms = {{ }}; }}; }}'
    unknown = deploy(fine, "--on", "w2")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"error: --on: no host 'w2' in {tmp_path / 'hosts.nix'} (hosts: w1)"
    missing = subprocess.run(
        [str(PROCURATOR), "deploy", str(tmp_path / "nothing.nix")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (missing.returncode, missing.stderr.strip()) == (
        2,
        f"error: {tmp_path}/nothing.nix: no such Nix file",
    )
