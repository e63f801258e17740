"""`procurator init`: its names checked as Nix checks them, nothing overwritten, and templates/default as
its output (one source for both)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from procurator import init as starter
from procurator.errors import ConflictError, UsageError
from tests.support.cli import PROCURATOR
from tests.support.host import REPO


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(PROCURATOR), "init", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_templates_default_is_what_init_writes() -> None:
    url = "git+file:///src/procurator"
    project = starter.project("nixos", "worker1", ("web", "files"), procurator_url=url, source=None)
    template = REPO / "templates" / "default"
    on_disk = {str(p.relative_to(template)): p.read_text() for p in template.rglob("*") if p.is_file()}
    assert on_disk == project.files(), (
        "regenerate it: procurator init templates/default --nixos --vm web,files --force"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--vm", "Web"), "--vm 'Web': a VM name is a DNS label of at most 20 characters"),
        (("--vm", "a" * 21), "a VM name is a DNS label of at most 20 characters"),
        (("--vm", "web,web"), "--vm web,web: a VM name is given twice"),
        (("--vm", ","), "--vm: give at least one VM name"),
        (("--name", "worker_1"), "--name 'worker_1': a host name is a DNS label"),
        (("--minimal", "--source", "/"), "--source /: not a Procurator checkout (no nix/minimal)"),
    ],
)
def test_bad_names_are_one_line_and_write_nothing(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    done = run(str(tmp_path / "p"), *args)
    assert done.returncode in (1, 2), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "p").exists()


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    assert run(str(tmp_path), "--minimal", "--vm", "web").returncode == 0
    mine = tmp_path / "vms" / "web.nix"
    mine.write_text("# my own\n")
    again = run(str(tmp_path), "--minimal", "--vm", "web,api")
    assert again.returncode == 1
    assert "already there; nothing written (--force overwrites)" in again.stderr
    assert mine.read_text() == "# my own\n"
    assert not (tmp_path / "vms" / "api.nix").exists()  # nothing written, not even the new file
    forced = run(str(tmp_path), "--minimal", "--vm", "web,api", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    names = ("README.md", "default.nix", "vms/api.nix", "vms/web.nix")
    assert json.loads(forced.stdout)["files"] == [str(tmp_path / f) for f in names]
    assert "# my own" not in mine.read_text()


def test_minimal_output_builds_offline(tmp_path: Path) -> None:
    assert run(str(tmp_path), "--minimal", "--vm", "web,api", "--name", "host1").returncode == 0
    readme = (tmp_path / "README.md").read_text()
    assert "procurator build ./default.nix#deployment" in readme
    argv = [str(PROCURATOR), "build", "./default.nix#deployment", "--json"]
    built = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    assert result["host"] == "host1"
    assert sorted(b["name"] for b in result["bundles"]) == ["api", "web"]


def test_nix_values_are_quoted() -> None:
    assert starter._nix_string('a${b}"c') == '"a\\${b}\\"c"'
    assert starter._nix_path("/srv/procurator") == "/srv/procurator"
    assert starter._nix_path("/srv/with space") == '(/. + "/srv/with space")'


def test_write_refuses_a_directory_where_a_file_goes(tmp_path: Path) -> None:
    (tmp_path / "README.md").mkdir()
    with pytest.raises(ConflictError, match="already there"):
        starter.write(tmp_path, {"README.md": "x"}, force=False)
    with pytest.raises(ConflictError, match="a directory"):
        starter.write(tmp_path, {"README.md": "x"}, force=True)
    with pytest.raises(UsageError, match="give --nixos or --minimal"):
        starter.project("arch", "h", ("web",), procurator_url=None, source=None)
