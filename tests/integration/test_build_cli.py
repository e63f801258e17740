"""`procurator build REF` on every kind of REF and on bad input: real nix, the real CLI entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import EXAMPLE, REPO, ExampleBuild
from tests.support.bundles import meta, write_bundle
from tests.support.cli import PROCURATOR


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROCURATOR), *args], capture_output=True, text=True, timeout=300, check=False, cwd=cwd
    )


def build_json(ref: str, cwd: Path | None = None) -> dict[str, object]:
    done = run("build", "--json", ref, cwd=cwd)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_store_path(example_build: ExampleBuild) -> None:
    out = build_json(str(example_build.web))
    assert out == {
        "kind": "bundle",
        "name": "web",
        "path": str(example_build.web),
        "generation": example_build.web.name.split("-")[0],
    }


def test_result_symlink(example_build: ExampleBuild, tmp_path: Path) -> None:
    (tmp_path / "result").symlink_to(example_build.api)
    out = build_json("./result", cwd=tmp_path)
    assert out["name"] == "api"
    assert out["path"] == str(example_build.api)


def test_nix_file_with_attribute(example_build: ExampleBuild) -> None:
    assert build_json(f"{EXAMPLE}#web")["path"] == str(example_build.web)


def test_deployment_lists_its_bundles(example_build: ExampleBuild) -> None:
    out = build_json(f"{EXAMPLE}#deployment")
    assert out["kind"] == "deployment"
    assert out["host"] == "local"
    assert out["vms"] == {"api": str(example_build.api), "web": str(example_build.web)}


def test_human_output_is_a_table(example_build: ExampleBuild) -> None:
    done = run("build", str(example_build.web))
    assert done.returncode == 0
    header, row = done.stdout.splitlines()
    assert header.split() == ["KIND", "NAME", "GENERATION", "STORE", "PATH"]
    assert row.split() == ["bundle", "web", example_build.web.name.split("-")[0], str(example_build.web)]


FLAKE = """
{
  outputs = { self }:
    let
      lib = import ./lib;
      spec = lib.mkSpec { name = "flakevm"; kernel = "${./kernel}"; vcpus = 1; memoryMiB = 128; };
      system = "x86_64-linux";
    in {
      packages.${system}.flakevm = derivation {
        name = "procurator-vm-flakevm";
        inherit system;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        vmConfig = builtins.toJSON (lib.vmConfig spec (builtins.placeholder "out"));
        meta = builtins.toJSON (lib.procuratorJson spec);
        args = [ "-c" ''
          mkdir $out
          printf %s "$vmConfig" > $out/vm-config.json
          printf %s "$meta" > $out/procurator.json
          ln -s ${spec.kernel} $out/kernel
        '' ];
      };
    };
}
"""


def test_flake_reference(tmp_path: Path) -> None:
    flake = tmp_path / "flake"
    flake.mkdir()
    shutil.copytree(REPO / "nix" / "lib", flake / "lib")
    (flake / "kernel").write_text("not really a kernel\n")
    (flake / "flake.nix").write_text(FLAKE)
    out = build_json(f"path:{flake}#flakevm")
    assert out["name"] == "flakevm"
    assert str(out["path"]).endswith("-procurator-vm-flakevm")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["/nix/store/00000000000000000000000000000000-nope"], 2, "not in the Nix store"),
        (["./does-not-exist"], 2, "no such path"),
        (["missing.nix#web"], 2, "missing.nix: no such Nix file"),
        ([f"{EXAMPLE}#nosuchattr"], 1, "attribute 'nosuchattr'"),
        (["nosuchdir#x"], 2, "neither a flake directory nor a flake URL"),
        ([], 2, "Missing argument 'REF'"),
    ],
)
def test_bad_refs_fail_with_one_line(args: list[str], code: int, message: str, tmp_path: Path) -> None:
    done = run("build", *args, cwd=tmp_path)
    assert done.returncode == code
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Not_A_Label"}, "procurator.json: name: 'Not_A_Label' is not a DNS label"),
        ({"schema": 2}, "procurator.json: schema: unknown schema version 2"),
    ],
)
def test_invalid_bundles_fail_naming_file_and_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    data = meta()
    data.update(change)
    path = write_bundle(tmp_path, meta_data=data)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    done = run("build", str(path))
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"error: {path}/{message}")
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_malformed_json_and_not_a_bundle(tmp_path: Path) -> None:
    path = write_bundle(tmp_path)
    (path / "procurator.json").write_text("{not json")
    done = run("build", str(path))
    assert done.returncode == 1
    assert (
        "procurator.json: not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"
        in done.stderr
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run("build", str(empty))
    assert done.returncode == 1
    assert "not a Procurator bundle" in done.stderr


NIX_ERRORS = {
    "syntax": (
        "let x = 1;\nin { a = x + ; }\n",
        "error: nix build failed: syntax error, unexpected ';' (at {file}:2:14)",
    ),
    "undefined": (
        "let a = 1; in a + y\n",
        "error: nix build failed: undefined variable 'y' (at {file}:1:19)",
    ),
    "every problem": (
        f"(import {REPO}/nix/lib).mkSpec "
        '{ name = "Web_1"; kernel = "/nix/store/0-k"; vcpus = 0; memoryMiB = "x"; }',
        "error: nix build failed: procurator VM 'Web_1': 3 problems: name must be a DNS label",
    ),
    "failed assertions": (
        "throw \"\\nFailed assertions:\\n- procurator VM 'web': one\\n- procurator VM 'web': two\\n\"",
        "error: nix build failed: Failed assertions: procurator VM 'web': one; procurator VM 'web': two",
    ),
}


@pytest.mark.parametrize("case", sorted(NIX_ERRORS))
def test_nix_errors_keep_every_problem_and_the_position(case: str, tmp_path: Path) -> None:
    source, expected = NIX_ERRORS[case]
    file = tmp_path / "vm.nix"
    file.write_text(source)
    done = run("build", str(file))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(expected.format(file=file)), line
    if case == "every problem":
        for problem in (
            "vcpus must be a positive integer, got 0",
            'memoryMiB must be a positive integer (MiB), got "x"',
        ):
            assert problem in line


def test_a_bundle_without_its_kernel_link_is_refused(example_build: ExampleBuild, tmp_path: Path) -> None:
    copy = tmp_path / example_build.web.name
    copy.mkdir()
    for name in ("procurator.json", "vm-config.json", "initrd"):
        source = example_build.web / name
        if source.is_symlink():
            (copy / name).symlink_to(source.readlink())
        else:
            (copy / name).write_bytes(source.read_bytes())
    done = run("build", str(copy))
    assert done.returncode == 1
    kernel = json.loads((copy / "vm-config.json").read_text())["payload"]["kernel"]
    assert (
        done.stderr
        == f"error: {copy}/kernel: missing (a bundle links its kernel, {kernel}); rebuild the bundle\n"
    )
    (copy / "kernel").symlink_to("/nix/store/elsewhere")
    done = run("build", str(copy))
    assert (
        done.stderr
        == f"error: {copy}/kernel: points at /nix/store/elsewhere, not at payload.kernel {kernel}\n"
    )
    (copy / "kernel").unlink()
    (copy / "kernel").symlink_to(kernel)
    assert run("build", str(copy)).returncode == 0
