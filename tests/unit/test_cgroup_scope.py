"""VM groups are scoped by the state directory: two Procurator states on one host never share a group."""

from __future__ import annotations

from pathlib import Path

from procurator import cgroup


def test_the_default_state_has_plain_names_and_others_a_scope(tmp_path: Path) -> None:
    assert cgroup.scope_of(Path("/var/lib/procurator")) == ""
    one, two = cgroup.scope_of(tmp_path / "a"), cgroup.scope_of(tmp_path / "b")
    assert one != two
    assert len(one) == 10
    assert cgroup.scope_of(tmp_path / "a" / ".." / "a") == one  # the same directory, however named


def test_each_scope_lists_only_its_own_groups(tmp_path: Path) -> None:
    base = tmp_path / "procurator.slice"
    for entry in ("vm-web", "vm-api", "vm-web.aaaaaaaaaa", "vm-db.aaaaaaaaaa", "vm-web.bbbbbbbbbb", "other"):
        (base / entry).mkdir(parents=True)
    default = cgroup.V2(tmp_path, "procurator.slice")
    scoped = cgroup.V2(tmp_path, "procurator.slice", "aaaaaaaaaa")
    assert default.leftovers() == ["api", "web"]
    assert scoped.leftovers() == ["db", "web"]
    assert scoped.dirs("web") == (base / "vm-web.aaaaaaaaaa",)
    assert cgroup.V1({"memory": tmp_path / "memory"}, "bbbbbbbbbb").dirs("web") == (
        tmp_path / "memory" / "procurator" / "vm-web.bbbbbbbbbb",
    )
