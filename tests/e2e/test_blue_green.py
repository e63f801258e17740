"""Blue-green replace of a real guest (QEMU) while a client polls its address every 50 ms from inside the
namespace: the new generation boots beside the old one on its own TAP and lease, passes its health check,
and the service address moves to it in one nftables change, with zero failed requests; a new generation
whose health check cannot pass is removed while the old one serves on, again with zero failed requests.

Boots: web release 1 and api, web release 2 beside it, and the unhealthy release 3 (killed once its
health budget runs out)."""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import NixBuild
from tests.support.host import REPO, VmHost
from tests.support.poller import Poll, max_gap, parse

pytestmark = pytest.mark.e2e

DRAIN = 1  # seconds the old generation serves on after the switch
BLUE_GREEN = f'volumes = [ ]; replace = {{ strategy = "blue-green"; drainSeconds = {DRAIN}; }};'


def web(extra: str) -> list[str]:
    return ["--arg", "overrides", f"{{ web = {{ {BLUE_GREEN} {extra} }}; }}"]


def apply(host: VmHost, deployment: object, code: int = 0) -> dict[str, Any]:
    done = host.run("apply", str(deployment), "--json", timeout=400)
    assert done.returncode == code, done.stderr + done.stdout
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextlib.contextmanager
def polling(host: VmHost, address: str, into: list[Poll]) -> Iterator[None]:
    """A client in the namespace polling `address` every 50 ms while the block runs; its polls in `into`."""
    client = subprocess.Popen(
        ["ip", "netns", "exec", host.ns.name, sys.executable, "-m", "tests.support.poller", address],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield
    finally:
        out, _ = client.communicate("", timeout=30)
        into.extend(parse(out))


def _around(polls: list[Poll], failed: Poll) -> str:
    """Where a failed poll sits: the releases answered just before and after it, and when it began."""
    i = polls.index(failed)
    before = next((p.release for p in reversed(polls[:i]) if p.ok), None)
    after = next((p.release for p in polls[i + 1 :] if p.ok), None)
    took = (polls[i + 1].t - failed.t) if i + 1 < len(polls) else None
    return f"{failed.error} (release {before} before, {after} after; next poll {took}s later)"


def test_blue_green_replace_moves_the_address_without_a_failed_request(
    vm_host: VmHost, nix_build_example: NixBuild
) -> None:
    host = vm_host
    (first,) = nix_build_example("deployment", args=web('cmdline = "procurator.release=1";'))
    web2, second = nix_build_example("web", "deployment", args=web('cmdline = "procurator.release=2";'))
    (unhealthy,) = nix_build_example(
        "deployment",
        args=web(
            'cmdline = "procurator.release=3"; '
            'health = [ { type = "tcp"; port = 9; retries = 2; intervalSeconds = 1; timeoutSeconds = 1; } ];'
        ),
    )
    apply(host, first)
    before = host.ps()["web"]
    service = before["ip"]
    assert before["service_ip"] == service

    plan = host.ok("plan", str(second))
    assert f"~ replace web ({before['bundle'].split('/')[-1][:12]} -> {web2.name[:12]}: bundle hash " in plan
    assert "[blue-green]" in plan

    polls: list[Poll] = []
    with polling(host, service, polls):
        result = apply(host, second)
    replaced = next(a for a in result["actions"] if a["name"] == "web")
    assert (replaced["kind"], replaced["outcome"], replaced["strategy"]) == ("replace", "ok", "blue-green")
    switch = replaced["switch"]
    assert switch["service_ip"] == service
    assert switch["old"]["pid"] == before["pid"]
    assert switch["old"]["ip"] == service
    assert switch["new"]["bundle"] == str(web2)
    assert switch["new"]["ip"] != service
    assert switch["drained_seconds"] >= DRAIN

    failed = [p for p in polls if not p.ok]
    assert failed == [], [_around(polls, p) for p in failed[:5]]
    releases = [p.release for p in polls]
    assert releases[0] == "1", sorted(set(map(str, releases)))
    assert releases[-1] == "2", sorted(set(map(str, releases)))
    first_two = releases.index("2")
    assert set(releases[first_two:]) == {"2"}  # once moved, every request reaches the new generation
    assert max_gap(polls) < 1.0

    # ps: exactly the desired VMs, web with one hypervisor, its own TAP and both its leases
    after = host.ps()
    assert sorted(after) == ["api", "web"]
    assert (after["web"]["ip"], after["web"]["service_ip"]) == (switch["new"]["ip"], service)
    assert after["web"]["taps"] == switch["new"]["taps"]
    assert len(host.taps()) == 2
    assert len([p for p in host.processes() if "/vms/web" in p]) == 1
    leases = json.loads((host.state / "leases.json").read_text())["leases"]
    assert sorted(leases) == ["api", "web", "web@b"]
    assert leases["web"]["ip"] == service

    # 2. a new generation that cannot pass its check: removed, the old one served throughout
    polls = []
    with polling(host, service, polls):
        third = apply(host, unhealthy, code=1)
    bad = next(a for a in third["actions"] if a["name"] == "web")
    assert (bad["kind"], bad["outcome"]) == ("replace", "rolled-back")
    assert bad["error"].endswith(f"old generation {web2.name[:12]} served throughout")
    assert [p for p in polls if not p.ok] == []
    assert {p.release for p in polls} == {"2"}
    kept = host.ps()["web"]
    assert (kept["pid"], kept["bundle"], kept["ip"]) == (after["web"]["pid"], str(web2), after["web"]["ip"])
    assert len(host.taps()) == 2
    leases = json.loads((host.state / "leases.json").read_text())["leases"]
    assert sorted(leases) == ["api", "web", "web@b"]

    # 3. a plain down of the VM takes its DNAT and its generation's lease with it
    host.ok("down", "web", timeout=120)
    leases = json.loads((host.state / "leases.json").read_text())["leases"]
    assert sorted(leases) == ["api", "web"]
    assert "dnat" not in host.ns.exec("nft", "list", "ruleset")
    host.ok("down", "api", timeout=120)
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}


KILLED_APPLY = """
import sys, time
from procurator.net import netlink
from procurator.cli import main

stop_at, deployment = sys.argv[1:3]

def hook(step):
    if step == stop_at:
        print("at", step, flush=True)
        time.sleep(120)

netlink.STEP_HOOK = hook
sys.argv = ["procurator", "apply", deployment]
main()
"""


def kill_apply_at(host: VmHost, deployment: object, step: str) -> None:
    """Run `procurator apply` until it reaches `step` (bounded), then SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_APPLY, step, str(deployment)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=host.env(PYTHONPATH=str(REPO)),
    )
    assert child.stdout is not None
    try:
        line = ""
        with selectors.DefaultSelector() as sel:
            sel.register(child.stdout, selectors.EVENT_READ)
            if sel.select(timeout=300):
                line = child.stdout.readline()
        assert line.strip() == f"at {step}", f"apply did not reach {step} (rc {child.poll()})"
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()


@pytest.mark.parametrize("step", ["tap-persistent", "blue-green-recorded", "blue-green-drained"])
def test_a_blue_green_replace_killed_at_each_step_converges_on_a_rerun(
    vm_host: VmHost, nix_build_example: NixBuild, step: str
) -> None:
    host = vm_host
    (first,) = nix_build_example("deployment", args=web('cmdline = "procurator.release=1";'))
    web2, second = nix_build_example("web", "deployment", args=web('cmdline = "procurator.release=2";'))
    apply(host, first)
    service = host.ps()["web"]["ip"]

    kill_apply_at(host, second, step)
    again = apply(host, second)
    assert again["failed"] is False

    vms = host.ps()
    assert sorted(vms) == ["api", "web"]
    assert (vms["web"]["state"], vms["web"]["bundle"], vms["web"]["service_ip"]) == (
        "running",
        str(web2),
        service,
    )
    new_ip = vms["web"]["ip"]
    assert new_ip != service
    assert len([p for p in host.processes() if "/vms/web" in p]) == 1  # one hypervisor: the old one is gone
    assert len(host.taps()) == 2
    assert sorted(p.name for p in (host.state / "vms").iterdir()) == ["api", "web", "web@b"]
    leases = json.loads((host.state / "leases.json").read_text())["leases"]
    assert sorted(leases) == ["api", "web", "web@b"]
    assert leases["web@b"]["ip"] == new_ip
    ruleset = host.ns.exec("nft", "list", "ruleset")
    assert ruleset.count(f"ip daddr {service} dnat ip to {new_ip}") == 2, ruleset
    ok, release, error = get_in(host, service)
    assert (ok, release) == (True, "2"), error

    host.ok("down", "web", "api", timeout=120)
    assert host.leftovers() == {"processes": [], "taps": [], "vms": [], "sockets": []}
    assert "dnat" not in host.ns.exec("nft", "list", "ruleset")


def get_in(host: VmHost, address: str) -> tuple[bool, str | None, str]:
    """One poll of `address` from inside the namespace."""
    code = f"from tests.support.poller import get; import json; print(json.dumps(get({address!r}, 5)))"
    ok, release, error = json.loads(host.ns.exec(sys.executable, "-c", code))
    return bool(ok), release, str(error)
