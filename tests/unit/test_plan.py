"""The pure plan (every action kind, its reason, the bundle diff, determinism), the apply runner with the
lifecycle replaced by fakes (rollback, outcomes, no calls at all for unchanged VMs), the deployment
history's nix-env calls and generation choice."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from procurator import history, lifecycle, network, nix, process, reconcile
from procurator.config import WorkerConfig
from procurator.errors import (
    LockBusyError,
    NixError,
    NotFoundError,
    ProcessError,
    StateError,
    ValidationError,
    WaitTimeoutError,
)
from procurator.hypervisor.base import Hypervisor
from procurator.lifecycle import Host, Status, VmStatus, WaitFor
from procurator.models import Bundle, Deployment
from procurator.reconcile import Action, ActionKind, ActionResult, ApplyResult, Outcome, bundle_diff, plan
from procurator.state import Desired, StateDir, VmRecord, record_fix
from procurator.worker import RecordCache
from tests.support.bundles import meta, vm_config, write_bundle

HASHES = {
    "a": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "b": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "c": "cccccccccccccccccccccccccccccccc",
}


def store(gen: str, name: str) -> str:
    return f"/nix/store/{HASHES[gen]}-procurator-vm-{name}"


def observed(name: str, bundle: str, status: Status = Status.RUNNING, last_exit: str = "") -> VmStatus:
    record = VmRecord(
        name=name,
        bundle=bundle,
        generation=Path(bundle).name[:32],
        backend="qemu",
        pid=4242,
        start_time=1,
        api_socket=f"/state/vms/{name}/api.sock",
        vm_dir=f"/state/vms/{name}",
        desired=Desired.STOPPED if status is Status.STOPPED else Desired.RUNNING,
        last_exit=last_exit,
    )
    return VmStatus(record, status, 5.0 if status is Status.RUNNING else None)


# -- plan ------------------------------------------------------------------------------------------------


def test_every_kind_with_its_reason() -> None:
    desired = {
        "new": store("a", "new"),
        "same": store("a", "same"),
        "changed": store("b", "changed"),
        "crashed": store("a", "crashed"),
        "halted": store("a", "halted"),
    }
    seen = [
        observed("same", store("a", "same")),
        observed("changed", store("a", "changed")),
        observed("crashed", store("a", "crashed"), Status.EXITED, "killed by SIGKILL"),
        observed("halted", store("a", "halted"), Status.STOPPED, "stopped by user"),
        observed("gone", store("c", "gone")),
    ]
    result = plan(desired, seen)
    assert [a.line() for a in result.actions] == [
        "~ replace changed (aaaaaaaaaaaa -> bbbbbbbbbbbb: bundle hash changed)",
        "> start crashed (aaaaaaaaaaaa exited (killed by SIGKILL): start it)",
        "- remove gone (cccccccccccc not in the deployment; volumes and lease kept)",
        "> start halted (aaaaaaaaaaaa stopped (stopped by user): start it)",
        "+ create new (not on this host: aaaaaaaaaaaa)",
        "= keep same (aaaaaaaaaaaa running)",
    ]
    by_name = {a.name: a for a in result.actions}
    assert by_name["changed"] == Action(
        ActionKind.REPLACE,
        "changed",
        store("a", "changed"),
        store("b", "changed"),
        "aaaaaaaaaaaa -> bbbbbbbbbbbb: bundle hash changed",
    )
    assert (by_name["new"].old, by_name["new"].new) == (None, store("a", "new"))
    assert (by_name["gone"].old, by_name["gone"].new) == (store("c", "gone"), None)
    assert by_name["same"].old == by_name["same"].new == store("a", "same")
    assert result.changed
    assert result.summary() == "1 to create, 1 to replace, 2 to start, 1 to remove, 1 unchanged"


def test_a_vm_the_worker_gave_up_on_is_left_down() -> None:
    seen = observed("web", store("a", "web"), Status.FAILED, "exited 1 five times in 60s")
    result = plan({"web": store("a", "web")}, [seen])
    assert [a.line() for a in result.actions] == [
        "= keep web (aaaaaaaaaaaa failed (exited 1 five times in 60s): left down; "
        "`procurator start web` retries it)"
    ]
    assert not result.changed
    # A new generation may well fix the crash loop: it replaces the failed one.
    assert plan({"web": store("b", "web")}, [seen]).actions[0].kind is ActionKind.REPLACE


def test_replacing_a_vm_that_is_not_running_says_so() -> None:
    result = plan({"web": store("b", "web")}, [observed("web", store("a", "web"), Status.EXITED)])
    (action,) = result.actions
    assert action.kind is ActionKind.REPLACE
    assert action.reason == "aaaaaaaaaaaa -> bbbbbbbbbbbb: bundle hash changed; the old generation is exited"


def test_nothing_to_do() -> None:
    result = plan({"web": store("a", "web")}, [observed("web", store("a", "web"))])
    assert not result.changed
    assert [a.kind for a in result.actions] == [ActionKind.KEEP]
    assert plan({}, []).actions == ()


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    names = [f"vm{i:03d}" for i in range(60)]
    desired = {n: store("b" if i % 3 else "a", n) for i, n in enumerate(names) if i % 7}
    seen = [observed(n, store("a", n)) for i, n in enumerate(names) if i % 5]
    expected = plan(desired, seen)
    assert [a.name for a in expected.actions] == sorted(desired.keys() | {s.record.name for s in seen})
    items = list(desired.items())
    for k in (1, 17, 33):  # other orders: rotated and reversed
        assert plan(dict(items[k:] + items[:k]), seen[k:] + seen[:k]) == expected
        assert plan(dict(reversed(items)), list(reversed(seen))) == expected
    assert json.dumps(expected.to_json(), sort_keys=True) == json.dumps(
        plan(desired, list(reversed(seen))).to_json(), sort_keys=True
    )


def test_desired_may_be_a_deployment_bundles_or_paths(tmp_path: Path) -> None:
    web = Bundle.load(write_bundle(tmp_path, "web"))
    deployment = Deployment(tmp_path / "d", "local", {"web": web.path})
    seen = [observed("web", str(web.path))]
    assert plan(deployment, seen) == plan({"web": web}, seen) == plan({"web": str(web.path)}, seen)
    assert plan(deployment, seen).actions[0].kind is ActionKind.KEEP


def test_a_bundle_under_another_name_is_refused(tmp_path: Path) -> None:
    api = Bundle.load(write_bundle(tmp_path, "api"))
    with pytest.raises(ValidationError, match=r"vms\.web: is a bundle named 'api'"):
        plan({"web": api}, [])


def files_of(memory: int, release: str, *, health: bool = True) -> dict[str, Any]:
    config = vm_config("web")
    config["memory"]["size"] = memory
    config["payload"]["cmdline"] += f" procurator.release={release}"
    data = meta("web")
    if not health:
        data["health"] = []
    return {"vm-config.json": config, "procurator.json": data}


def test_replace_carries_a_diff_of_both_files() -> None:
    docs = {
        store("a", "web"): files_of(256 << 20, "1"),
        store("b", "web"): files_of(512 << 20, "2", health=False),
    }
    loads: list[str] = []

    def load(path: str) -> dict[str, Any]:
        loads.append(path)
        return docs[path]

    result = plan({"web": store("b", "web")}, [observed("web", store("a", "web"))], files=load)
    (action,) = result.actions
    assert sorted(loads) == [store("a", "web"), store("b", "web")]
    lines = action.diff.splitlines()
    assert lines[:2] == [f"--- {store('a', 'web')}/vm-config.json", f"+++ {store('b', 'web')}/vm-config.json"]
    assert '-    "size": 268435456' in lines
    assert '+    "size": 536870912' in lines
    assert any(line.startswith("-") and "procurator.release=1" in line for line in lines)
    assert any(line.startswith("+") and "procurator.release=2" in line for line in lines)
    assert f"--- {store('a', 'web')}/procurator.json" in lines
    assert '-      "path": "/health",' in lines
    # Only replacements are diffed, and keys are sorted: the same documents give the same text.
    assert action.diff == bundle_diff(store("a", "web"), store("b", "web"), *(docs[k] for k in sorted(docs)))


def test_identical_files_give_an_empty_diff_and_unreadable_ones_say_why() -> None:
    same = files_of(1, "1")
    assert bundle_diff("/old", "/new", same, json.loads(json.dumps(same))) == ""

    def gone(path: str) -> dict[str, Any]:
        raise NotFoundError(f"{path}/vm-config.json is not in the store any more")

    result = plan({"web": store("b", "web")}, [observed("web", store("a", "web"))], files=gone)
    assert (
        result.actions[0].diff
        == f"(no diff: {store('a', 'web')}/vm-config.json is not in the store any more)"
    )


def test_read_bundle_files(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, "web")
    docs = reconcile.read_bundle_files(str(path))
    assert docs["vm-config.json"] == vm_config("web")
    assert docs["procurator.json"]["name"] == "web"
    with pytest.raises(NotFoundError, match="not in the store any more"):
        reconcile.read_bundle_files(str(tmp_path / "nope"))


# -- apply with fake lifecycle steps ---------------------------------------------------------------------


def no_hypervisor(backend: str) -> Hypervisor:
    raise AssertionError(f"hypervisor {backend} asked for")


def forbid_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every subprocess, hypervisor and lifecycle change fail the test if it happens."""

    def forbidden(what: str) -> Callable[..., Any]:
        def fail(*args: object, **kwargs: object) -> Any:
            raise AssertionError(f"{what} called with {args}")

        return fail

    monkeypatch.setattr(process, "run", forbidden("process.run"))
    monkeypatch.setattr(process, "spawn", forbidden("process.spawn"))
    monkeypatch.setattr(network, "net_up", forbidden("network.net_up"))
    for name in ("up", "down", "start", "stop"):
        monkeypatch.setattr(lifecycle, name, forbidden(f"lifecycle.{name}"))


def own_record(name: str, bundle: str) -> VmRecord:
    """A record that counts as running: it names this very process."""
    pid = os.getpid()
    start = process.process_start_time(pid)
    assert start is not None
    return VmRecord(name, bundle, Path(bundle).name[:32], "qemu", pid, start, "/x/api.sock", "/x")


def any_hypervisor(_backend: str) -> Hypervisor:
    return cast(Hypervisor, object())


def make_host(tmp_path: Path, hypervisors: Callable[[str], Hypervisor] = no_hypervisor) -> Host:
    state = StateDir(tmp_path / "state")
    state.ensure()
    return Host(state=state, config=WorkerConfig(), hypervisors=hypervisors)


def test_unchanged_vms_cost_no_subprocess_and_no_hypervisor_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path)
    vms = {n: store("a", n) for n in ("api", "web")}
    for name, path in vms.items():
        host.state.save_record(own_record(name, path))
    # The profile already points at this deployment: recording it needs no nix-env either.
    deployment_path = Path("/nix/store/cccccccccccccccccccccccccccccccc-procurator-deployment-local")
    profiles = tmp_path / "state" / "profiles"
    profiles.mkdir()
    (profiles / "deployment-3-link").symlink_to(deployment_path)
    (profiles / "deployment").symlink_to("deployment-3-link")
    forbid_io(monkeypatch)

    result = reconcile.apply(host, Deployment(deployment_path, "local", {k: Path(v) for k, v in vms.items()}))
    assert [(r.action.kind, r.outcome) for r in result.actions] == [(ActionKind.KEEP, Outcome.OK)] * 2
    assert not result.changed
    assert not result.failed
    assert result.history == 3


def forbidden_net_up(*args: object) -> None:
    raise AssertionError("a unit test must not touch the host network")


class FakeLifecycle:
    """lifecycle.up/down/start recording their calls; `fail` decides which bundle paths fail to start."""

    def __init__(self, host: Host, fail: Callable[[str], Exception | None]) -> None:
        self.host = host
        self.fail = fail
        self.calls: list[tuple[str, ...]] = []

    def up(self, host: Host, bundle: Bundle, *, backend: str | None = None, wait: WaitFor = WaitFor.BOOTED,
           restarts: int = 0) -> VmRecord:  # fmt: skip
        self.calls.append(("up", bundle.name, bundle.path.name[:1], wait.value, str(backend), str(restarts)))
        problem = self.fail(str(bundle.path))
        if problem is not None:
            raise problem
        record = own_record(bundle.name, str(bundle.path))
        host.state.save_record(record)
        return record

    def down(self, host: Host, name: str, *, purge: bool = False) -> None:
        self.calls.append(("down", name, f"purge={purge}"))
        host.state.remove_vm_dir(name)

    @contextlib.contextmanager
    def network_once(self, _host: Host) -> Iterator[None]:
        self.calls.append(("network_once",))
        yield

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Replace the lifecycle; and the host network, which these unit tests never touch."""
        monkeypatch.setattr(lifecycle, "up", self.up)
        monkeypatch.setattr(lifecycle, "down", self.down)
        monkeypatch.setattr(lifecycle, "network_once", self.network_once)
        monkeypatch.setattr(network, "net_up", forbidden_net_up)


def two_generations(tmp_path: Path) -> tuple[Path, Path]:
    old = write_bundle(tmp_path / "store", "web", dirname=f"{HASHES['a']}-procurator-vm-web")
    new = write_bundle(tmp_path / "store", "web", dirname=f"{HASHES['b']}-procurator-vm-web")
    return old, new


def test_a_new_generation_failing_its_health_checks_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path, hypervisors=any_hypervisor)
    old, new = two_generations(tmp_path)
    host.state.save_record(own_record("web", str(old)))
    fake = FakeLifecycle(
        host,
        lambda p: (
            WaitTimeoutError("health checks of 10.0.0.2", 2.0, "tcp refused") if p == str(new) else None
        ),
    )
    fake.install(monkeypatch)

    result = reconcile.apply(host, Deployment(tmp_path / "d", "local", {"web": new}))
    (web,) = result.actions
    assert web.outcome is Outcome.ROLLED_BACK
    assert web.error == (
        "new generation bbbbbbbbbbbb failed: timed out after 2.0s waiting for health checks of 10.0.0.2 "
        "(last: tcp refused); old generation aaaaaaaaaaaa runs again"
    )
    # Stop the old, start the new gated on health, then the old again, not gated on health.
    # The old one comes back on its own backend with its restart count; no purge: volumes and lease stay.
    assert fake.calls == [
        ("network_once",),
        ("down", "web", "purge=False"),
        ("up", "web", "b", "healthy", "None", "0"),
        ("up", "web", "a", "booted", "qemu", "0"),
    ]
    record = host.state.load_record("web")
    assert record is not None
    assert record.bundle == str(old)
    assert result.failed
    assert result.changed
    assert result.history is None


def test_a_failed_rollback_is_reported_with_both_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path, hypervisors=any_hypervisor)
    old, new = two_generations(tmp_path)
    host.state.save_record(own_record("web", str(old)))
    FakeLifecycle(host, lambda p: ProcessError(f"boom {Path(p).name[:1]}")).install(monkeypatch)

    (web,) = reconcile.apply(host, Deployment(tmp_path / "d", "local", {"web": new})).actions
    assert web.outcome is Outcome.FAILED
    assert web.error == (
        "new generation bbbbbbbbbbbb failed: boom b; starting the old generation aaaaaaaaaaaa again "
        "failed too: boom a"
    )


def test_steps_are_idempotent_a_done_step_is_only_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path, hypervisors=any_hypervisor)
    _, new = two_generations(tmp_path)
    action = Action(ActionKind.CREATE, "web", None, str(new), "not on this host")
    step = reconcile._Boot(host, action, Bundle.load(new), WaitFor.BOOTED)
    fake = FakeLifecycle(host, lambda _path: None)
    fake.install(monkeypatch)
    assert reconcile._run_step(step).outcome is Outcome.OK
    assert reconcile._run_step(step).outcome is Outcome.OK  # measured: already running, nothing done
    assert fake.calls == [("up", "web", "b", "booted", "None", "0")]  # (a step alone: no network_once)


def test_a_bundle_missing_from_the_store_fails_before_any_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path)
    forbid_io(monkeypatch)
    missing = Path(store("b", "web"))
    deployment = Deployment(tmp_path / "d", "local", {"web": missing})
    with pytest.raises(NotFoundError) as caught:
        reconcile.apply(host, deployment)
    assert str(caught.value) == (
        f"VM 'web': bundle {missing} (named in {tmp_path}/d/deployment.json) is not in this host's Nix "
        f"store; copy the deployment's closure here first: nix copy --to ssh://<this host> {tmp_path}/d"
    )


def test_apply_result_json_and_flags() -> None:
    create = Action(ActionKind.CREATE, "web", None, store("a", "web"), "not on this host: aaaaaaaaaaaa")
    keep = Action(ActionKind.KEEP, "api", store("a", "api"), store("a", "api"), "aaaaaaaaaaaa running")
    ok = ApplyResult(
        "/nix/store/cccccccccccccccccccccccccccccccc-procurator-deployment-local",
        (ActionResult(keep, Outcome.OK), ActionResult(create, Outcome.OK, "", 1.23456)),
        2.5,
        history=4,
    )
    assert ok.changed
    assert not ok.failed
    assert ok.to_json() == {
        "schema": 1,
        "deployment": "/nix/store/cccccccccccccccccccccccccccccccc-procurator-deployment-local",
        "generation": HASHES["c"],
        "changed": True,
        "failed": False,
        "duration": 2.5,
        "history": 4,
        "error": None,
        "actions": [
            {**keep.to_json(), "outcome": "ok", "error": None, "seconds": 0.0, "switch": None},
            {**create.to_json(), "outcome": "ok", "error": None, "seconds": 1.235, "switch": None},
        ],
    }
    assert set(keep.to_json()) == {"kind", "name", "old", "new", "reason", "diff", "strategy"}
    failed = ApplyResult("/d", (ActionResult(create, Outcome.FAILED, "boom"),), 1.0)
    assert failed.failed
    assert failed.actions[0].line == "+ create web (not on this host: aaaaaaaaaaaa): failed in 0.0s: boom"
    assert ApplyResult("/d", (ActionResult(keep, Outcome.OK),), 0.1, error="not recorded").failed
    assert not ApplyResult("/d", (ActionResult(keep, Outcome.OK),), 0.1).changed


def test_the_wire_documents_read_back_what_was_written_and_refuse_the_rest() -> None:
    create = Action(ActionKind.CREATE, "web", None, store("a", "web"), "not on this host")
    result = ApplyResult("/d", (ActionResult(create, Outcome.FAILED, "boom", 1.5),), 2.0, history=None)
    assert ApplyResult.from_json(result.to_json()) == result
    report = reconcile.PlanReport("/d", "d", reconcile.Plan((create,)))
    assert reconcile.PlanReport.from_json(report.to_json()) == report
    older = {k: v for k, v in result.to_json().items() if k != "schema"}  # a release before schemas
    with pytest.raises(
        ValidationError,
        match=r"schema: expected a procurator document of schema 1, not null \(the other side runs another",
    ):
        ApplyResult.from_json(older, "apply --json on root@a")
    renamed = {**result.to_json(), "failed": "no"}
    with pytest.raises(ValidationError, match=r'failed: expected true or false, not "no"'):
        ApplyResult.from_json(renamed)
    lying = {**result.to_json(), "failed": False}  # says it succeeded while an action failed
    with pytest.raises(ValidationError, match="does not agree with the actions' outcomes"):
        ApplyResult.from_json(lying)
    bad_action = {**result.to_json(), "actions": [{**result.to_json()["actions"][0], "outcome": "maybe"}]}
    with pytest.raises(ValidationError, match=r"actions\[0\]\.outcome: 'maybe' is not one of ok, failed"):
        ApplyResult.from_json(bad_action)


def test_observe_reports_what_lifecycle_status_does(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    host.clock = lambda: 1000.0
    running = own_record("api", store("a", "api")).with_(started_at=900.0)
    host.state.save_record(running)
    host.state.save_record(running.with_(name="dead", start_time=running.start_time + 1))
    host.state.save_record(running.with_(name="halted", pid=0, start_time=0, desired="stopped"))
    host.state.save_record(running.with_(name="given-up", pid=0, start_time=0, desired="failed"))
    host.state.save_record(running.with_(name="gone", pid=2**22 + 1))
    (host.state.vms_dir / "empty").mkdir()  # a directory without a record is not a VM
    seen = reconcile.observe(host)
    assert seen == lifecycle.status(host)
    assert [(s.record.name, s.status) for s in seen] == [
        ("api", Status.RUNNING),
        ("dead", Status.EXITED),
        ("given-up", Status.FAILED),
        ("gone", Status.EXITED),
        ("halted", Status.STOPPED),
    ]
    assert seen[0].uptime == 100.0
    assert reconcile.observe(make_host(tmp_path / "new")) == []


def test_a_damaged_record_is_reported_by_the_state_module(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    host.state.save_record(own_record("web", store("a", "web")))
    path = host.state.record_path("web")
    path.write_text(path.read_text()[:40])
    with pytest.raises(StateError) as caught:
        reconcile.observe(host)
    assert str(caught.value).startswith(f"{path}: damaged state file: not JSON (")
    assert str(caught.value).endswith(record_fix("web"))


def test_observe_through_the_workers_record_cache_sees_what_a_fresh_read_sees(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    host.clock = lambda: 1000.0
    running = own_record("api", store("a", "api")).with_(started_at=900.0)
    for name in ("api", "db", "web"):
        host.state.save_record(running.with_(name=name))
    cache = RecordCache(host.state, log_damage=False)
    assert reconcile.observe(host, cache) == reconcile.observe(host)
    stopped = running.with_(name="db", bundle=store("b", "db"), pid=0, start_time=0, desired="stopped")
    host.state.save_record(stopped)  # a change
    host.state.remove_vm_dir("web")
    host.state.save_record(running.with_(name="new"))
    seen = reconcile.observe(host, cache)
    assert seen == reconcile.observe(host)
    assert [(s.record.name, s.record.bundle, s.status) for s in seen] == [
        ("api", store("a", "api"), Status.RUNNING),
        ("db", store("b", "db"), Status.STOPPED),
        ("new", store("a", "api"), Status.RUNNING),
    ]


def test_a_damaged_record_seen_through_the_cache_is_reported_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = make_host(tmp_path)
    host.state.save_record(own_record("web", store("a", "web")))
    cache = RecordCache(host.state, log_damage=False)
    path = host.state.record_path("web")
    whole = path.read_text()
    path.write_text(whole[:40])
    with pytest.raises(StateError, match=r"damaged state file: not JSON \("):
        reconcile.observe(host, cache)
    assert "web" in cache.damaged
    # mended between the cache's read and the state module's: the VM counts (a plan must not create it)
    real_load = StateDir.load_record

    def mended(state: StateDir, name: str) -> VmRecord | None:
        path.write_text(whole)
        return real_load(state, name)

    monkeypatch.setattr(StateDir, "load_record", mended)
    path.write_text(whole[:40])
    assert [s.record.name for s in reconcile.observe(host, cache)] == ["web"]


def test_a_busy_state_lock_fails_after_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = make_host(tmp_path)
    forbid_io(monkeypatch)
    other = StateDir(host.state.root)  # another holder: its own open file, as another process has
    with other.lock(), pytest.raises(LockBusyError, match="another procurator command holds the lock"):
        reconcile.apply(host, Deployment(tmp_path / "d", "local", {}), lock_timeout=0.2)


def test_parallel_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="parallel must be at least 1"):
        reconcile.apply(make_host(tmp_path), Deployment(tmp_path, "local", {}), parallel=0)


# -- history ---------------------------------------------------------------------------------------------


class FakeNixEnv:
    def __init__(self, stdout: str = "", fail: str = "") -> None:
        self.stdout = stdout
        self.fail = fail
        self.argv: list[Sequence[str]] = []

    def __call__(self, argv: Sequence[str], **_kwargs: Any) -> process.Completed:
        self.argv.append(list(argv))
        if self.fail:
            raise ProcessError("nix-env failed", argv=tuple(argv), returncode=1, stderr=self.fail)
        return process.Completed(tuple(argv), 0, self.stdout, "")


def test_profile_commands_argv_and_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = tmp_path / "deployment"
    profile.symlink_to("deployment-2-link")
    fake = FakeNixEnv("   1   2026-11-26 03:03:50   \n   2   2026-11-26 03:04:10   (current)\n")
    monkeypatch.setattr(process, "run", fake)
    assert nix.profile_generations(profile) == [
        nix.ProfileGeneration(1, "2026-11-26 03:03:50", current=False),
        nix.ProfileGeneration(2, "2026-11-26 03:04:10", current=True),
    ]
    nix.profile_set(profile, Path("/nix/store/x-d"))
    nix.profile_switch(profile, 1)
    assert fake.argv == [
        ["nix-env", "--profile", str(profile), "--list-generations"],
        ["nix-env", "--profile", str(profile), "--set", "/nix/store/x-d"],
        ["nix-env", "--profile", str(profile), "--switch-generation", "1"],
    ]
    assert nix.profile_generations(tmp_path / "none") == []  # no profile yet: nothing run
    assert len(fake.argv) == 3


def test_profile_command_failures_quote_nix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "run", FakeNixEnv(fail="error: generation 9 does not exist\n"))
    with pytest.raises(NixError) as caught:
        nix.profile_switch(tmp_path / "deployment", 9)
    assert str(caught.value) == (
        f"nix-env --switch-generation on profile {tmp_path}/deployment failed: generation 9 does not exist"
    )
    monkeypatch.setattr(process, "run", FakeNixEnv("garbage\n"))
    (tmp_path / "deployment").symlink_to("deployment-1-link")
    with pytest.raises(NixError, match="unexpected line: 'garbage'"):
        nix.profile_generations(tmp_path / "deployment")


def generation(number: int, current: bool = False) -> history.Generation:
    return history.Generation(number, "2026-11-26 03:00:00", f"/nix/store/{number}-d", current)


def test_rollback_target() -> None:
    gens = [generation(1), generation(2), generation(4, current=True), generation(5)]
    assert history.select(gens, None).number == 2
    assert history.select(gens, 5).number == 5
    with pytest.raises(NotFoundError, match=r"no deployment generation 3 \(there are: 1, 2, 4, 5\)"):
        history.select(gens, 3)
    with pytest.raises(NotFoundError, match="generation 1 is the oldest deployment"):
        history.select([generation(1, current=True), generation(2)], None)
    with pytest.raises(NotFoundError, match="no deployment history on this host yet"):
        history.select([], None)


def test_current_reads_links_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = StateDir(tmp_path)
    monkeypatch.setattr(process, "run", FakeNixEnv(fail="must not run"))
    assert history.current(state) is None
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "deployment-7-link").symlink_to("/nix/store/cccccccccccccccccccccccccccccccc-d")
    (profiles / "deployment").symlink_to("deployment-7-link")
    assert history.current(state) == (7, Path("/nix/store/cccccccccccccccccccccccccccccccc-d"))
    assert history.record(state, Path("/nix/store/cccccccccccccccccccccccccccccccc-d")) == 7
    assert history.is_recordable(Path("/nix/store/cccccccccccccccccccccccccccccccc-d"))
    assert not history.is_recordable(tmp_path / "d")


# -- replace strategies (docs/architecture.md, "Blue-green replace") ------------------------------------


def test_each_replace_shows_the_strategy_of_its_new_bundle(tmp_path: Path) -> None:
    green = Bundle.load(
        write_bundle(
            tmp_path,
            "web",
            meta_data=meta("web", volumes=[], replace={"strategy": "blue-green", "drainSeconds": 1}),
        )
    )
    plain = Bundle.load(write_bundle(tmp_path, "api", meta_data=meta("api")))
    desired = {"web": str(green.path), "api": str(plain.path), "new": store("a", "new")}
    seen = [observed("web", store("a", "web")), observed("api", store("a", "api"))]
    annotated = reconcile.with_strategies(plan(desired, seen), {"web": green, "api": plain})
    lines = [a.line() for a in annotated.actions]
    assert lines == [
        f"~ replace api (aaaaaaaaaaaa -> {plain.path.name[:12]}: bundle hash changed) [recreate]",
        f"+ create new (not on this host: {HASHES['a'][:12]})",
        f"~ replace web (aaaaaaaaaaaa -> {green.path.name[:12]}: bundle hash changed) [blue-green]",
    ]
    web = annotated.actions[2]
    assert web.to_json()["strategy"] == "blue-green"
    assert Action.from_json(web.to_json(), "test", "actions[2]") == web
    assert annotated.actions[1].to_json()["strategy"] is None


def test_a_blue_green_result_carries_both_generations_through_json() -> None:
    action = Action(
        ActionKind.REPLACE, "web", store("a", "web"), store("b", "web"), "x", strategy="blue-green"
    )
    switch = {
        "strategy": "blue-green",
        "service_ip": "10.100.0.2",
        "old": {
            "bundle": store("a", "web"),
            "generation": HASHES["a"],
            "pid": 10,
            "ip": "10.100.0.2",
            "taps": [],
        },
        "new": {
            "bundle": store("b", "web"),
            "generation": HASHES["b"],
            "pid": 11,
            "ip": "10.100.0.3",
            "taps": [],
        },
        "switched_at": 1.5,
        "drained_seconds": 1.0,
    }
    result = ActionResult(action, Outcome.OK, "", 2.0, switch)
    back = ActionResult.from_json(result.to_json(), "test", "actions[0]")
    assert back == result
    assert back.to_json()["switch"]["new"]["ip"] == "10.100.0.3"


def test_blue_green_with_volumes_is_refused_when_the_bundle_is_loaded(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, "web", meta_data=meta("web", replace={"strategy": "blue-green"}))
    with pytest.raises(ValidationError) as caught:
        Bundle.load(path)
    assert "replace.strategy" in str(caught.value)
    assert "writable volumes (data)" in str(caught.value)
