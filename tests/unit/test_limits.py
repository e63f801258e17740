"""One table of name and size limits (nix/lib/limits.json, its copy procurator/limits.json) that Nix and
Python both read: real Nix (`nix-instantiate`, nix/lib's mkSpec) and Python's bundle reader accept a name
at the limit and refuse the same name one character longer, each message naming the VM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from procurator import limits
from procurator.errors import ValidationError
from procurator.models import Bundle
from tests.support.bundles import vm_config, write_bundle

LIB = Path(__file__).resolve().parents[2] / "nix" / "lib"
KERNEL = "/nix/store/00000000000000000000000000000000-kernel"


def nix(expr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", f"let lib = import {LIB}; in {expr}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def procurator_json(attrs: str) -> Any:
    """lib.procuratorJson of a VM: what a bundle's procurator.json holds (Nix refusing it fails the test)."""
    done = nix(f'lib.procuratorJson {{ kernel = "{KERNEL}"; {attrs} }}')
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def nix_refusal(attrs: str) -> str:
    done = nix(f'lib.procuratorJson {{ kernel = "{KERNEL}"; {attrs} }}')
    assert done.returncode != 0, f"Nix accepted {attrs}: {done.stdout}"
    text = done.stderr.split("error: ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines())


def python_refusal(tmp_path: Path, data: Any) -> ValidationError:
    with pytest.raises(ValidationError) as refused:
        Bundle.load(write_bundle(tmp_path, data["name"], config=vm_config(data["name"]), meta_data=data))
    return refused.value


def test_the_python_package_ships_the_table_nix_reads() -> None:
    table = LIB / "limits.json"
    shipped = Path(limits.__file__).with_name("limits.json")
    assert shipped.read_bytes() == table.read_bytes(), (
        f"copy {table} to {shipped} (cp nix/lib/limits.json procurator/)"
    )


def test_nix_reads_the_table_python_reads() -> None:
    done = nix("lib.limits")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == limits.table()


@pytest.mark.parametrize(
    ("fs_type", "longest"), [("ext4", limits.VOLUME_NAME_MAX), ("xfs", limits.XFS_VOLUME_NAME_MAX)]
)
def test_a_volume_name_one_past_its_label_length_is_refused_by_both(
    tmp_path: Path, fs_type: str, longest: int
) -> None:
    volume = f'{{ name = "{"v" * longest}"; sizeMiB = 1; fsType = "{fs_type}"; }}'
    built = procurator_json(f'name = "web"; volumes = [ {volume} ];')
    assert (
        Bundle.load(write_bundle(tmp_path / "ok", "web", meta_data=built)).meta.volumes[0].name
        == "v" * longest
    )

    too_long = "v" * (longest + 1)
    refused = nix_refusal(f'name = "web"; volumes = [ {volume.replace("v" * longest, too_long)} ];')
    assert refused.startswith(
        f"procurator VM 'web': volumes[0].name must be a DNS label of at most {longest} characters"
    ), refused
    built["volumes"][0]["name"] = too_long
    error = python_refusal(tmp_path / "bad", built)
    assert error.field == "volumes[0].name"
    assert error.problem == (
        f"{too_long!r} is not a DNS label of at most {longest} characters "
        f"(it is the {fs_type} label VM 'web' mounts it by); rename the volume"
    )


def test_a_vm_name_one_past_the_limit_is_refused_by_both(tmp_path: Path) -> None:
    longest = "w" * limits.VM_NAME_MAX
    built = procurator_json(f'name = "{longest}";')
    assert Bundle.load(write_bundle(tmp_path / "ok", longest, meta_data=built)).name == longest

    too_long = longest + "w"
    refused = nix_refusal(f'name = "{too_long}";')
    assert refused.startswith(
        f"procurator VM '{too_long}': name must be a DNS label of at most {limits.VM_NAME_MAX} characters"
    ), refused
    built["name"] = too_long
    error = python_refusal(tmp_path / "bad", built)
    assert (error.field, error.problem) == (
        "name",
        f"{too_long!r} is not a DNS label of at most {limits.VM_NAME_MAX} characters (a-z, 0-9, '-')",
    )
