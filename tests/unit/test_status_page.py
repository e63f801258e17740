"""The status page's rendering (jinja2, autoescape on), its CSRF token, its log follower and routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from procurator.errors import UsageError
from procurator.reconcile import Action, ActionKind, ActionResult, ApplyResult, Outcome
from procurator.worker import status
from procurator.worker.api import _route

HOSTILE = "<script>window.pwned=1</script><img src=x onerror=alert(1)>"


def status_json(**vm: Any) -> dict[str, Any]:
    replaced = ActionResult(
        Action(
            ActionKind.REPLACE, "web", "/nix/store/a-old", "/nix/store/b-new", "changed", f"-x\n+{HOSTILE}\n"
        ),
        Outcome.OK,
        seconds=1.5,
    )
    result = ApplyResult(deployment="/nix/store/d-dep", actions=(replaced,), duration=2.0)
    row = {"name": "web", "state": "running", "generation": "b" * 32, "bundle": "/nix/store/b-new",
           "backend": "qemu", "ip": "10.0.0.2", "pid": 42, "uptime": 3725.0, "restarts": 1, **vm}  # fmt: skip
    return {
        "worker": {"pid": 1, "started_at": 0.0, "uptime": 90061.0, "state_dir": "/var/lib/procurator",
                   "api_socket": "/run/procurator/api.sock", "metrics_listen": None, "interval": 60.0,
                   "deployment": {"path": "/nix/store/d-dep", "generation": "d" * 32},
                   "last_apply": {"trigger": "api", "deployment": "/nix/store/d-dep", "generation": "d" * 32,
                                  "started_at": 12.5, "duration_seconds": 2.0, "success": True,
                                  "result": result.to_json(), "error": None},
                   "reconciles": 3, "restarts": 1},
        "vms": [row],
        "supervision": {},
        "details": {"web": {"last_exit": f"crashed: {HOSTILE}", "health": {"ok": False, "detail": HOSTILE,
                            "at": 1.0}, "cpu_seconds": 1.25, "memory_bytes": 52428800}},
    }  # fmt: skip


HISTORY = {
    "generations": [
        {"number": 1, "date": "2026-12-01", "deployment": "/nix/store/c-dep", "current": False},
        {"number": 2, "date": "2026-12-02", "deployment": "/nix/store/d-dep", "current": True},
    ]
}


def test_the_index_shows_every_field_and_escapes_what_vms_say() -> None:
    page = status.index(status_json(), HISTORY, actions=False, csrf="t")
    assert HOSTILE not in page  # the guest's words never become markup
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own
    for shown in ("10.0.0.2", "bbbbbbbbbbbb", "1h 2m", "1.2 s", "50 MiB", "failing: ", "generation 2",
                  "what changed in web", "replace", "1d 1h", "(1d 1h ago)"):  # fmt: skip
        assert shown in page, shown
    assert 'href="/vm/web#bundle" title="/nix/store/b-new"' in page
    assert 'name="csrf"' not in page  # no forms without statusActions


def test_forms_carry_the_token_only_with_actions() -> None:
    page = status.index(status_json(), HISTORY, actions=True, csrf="tok-123")
    assert page.count('name="csrf" value="tok-123"') == 3  # restart web, apply, roll back


def test_a_vm_name_is_escaped_in_links_and_text() -> None:
    page = status.index(status_json(name='we"b<'), {"generations": []}, actions=False, csrf="t")
    assert 'href="/vm/we%22b%3C"' in page
    assert 'data-vm="we&#34;b&lt;"' in page


def test_the_vm_page_escapes_the_serial_log() -> None:
    vm = status_json()["vms"][0]
    page = status.vm_page(vm, {}, [HOSTILE, "plain line"], 99, actions=False, csrf="t")
    assert HOSTILE not in page
    assert 'data-offset="99"' in page
    assert "plain line" in page
    assert "not checked" in page


def test_csrf_is_checked_in_constant_time_and_names_the_fix() -> None:
    csrf = status.Csrf()
    csrf.check({"csrf": [csrf.token]})
    for form in ({}, {"csrf": ["nope"]}, {"csrf": [""]}):
        with pytest.raises(UsageError, match="CSRF token is missing or stale; reload the page"):
            csrf.check(form)
    assert status.Csrf().token != csrf.token


def test_log_since_follows_appends_rotation_and_a_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    assert status.log_since(log, 0) == {"offset": 0, "text": "", "reset": False}
    log.write_text("one\n")
    got = status.log_since(log, 0)
    assert got == {"offset": 4, "text": "one\n", "reset": False}
    with log.open("a") as f:
        f.write("two\n")
    assert status.log_since(log, 4) == {"offset": 8, "text": "two\n", "reset": False}
    log.write_text("x\n")  # rotated: shorter than what the page has read
    assert status.log_since(log, 8) == {"offset": 2, "text": "x\n", "reset": True}


def test_log_since_sends_whole_lines_in_bounded_chunks(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    line = "é" * 99 + "\n"  # 199 bytes: two-byte characters, so a cut in the middle would split one
    log.write_text(line * 1000)
    got = status.log_since(log, 0)
    assert got["offset"] <= status.LOG_CHUNK
    assert got["text"].endswith("\n")
    assert "\ufffd" not in got["text"]
    rest = status.log_since(log, got["offset"])
    assert rest["offset"] > got["offset"]


@pytest.mark.parametrize(
    ("path", "route"),
    [("/", ("/", "")), ("/vm/web", ("/vm/*", "web")), ("/vm/we%20b/log", ("/vm/*/log", "we b")),
     ("/vm/", ("/vm/", "")), ("/vm/web/other", ("/vm/web/other", "")), ("/status", ("/status", ""))],
)  # fmt: skip
def test_routes(path: str, route: tuple[str, str]) -> None:
    assert _route(path) == route
