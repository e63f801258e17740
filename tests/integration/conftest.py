"""Nix fixtures: real builds of examples/minimal.nix in the machine's Nix store, once per session.

The kernel comes from the host cache written by scripts/setup.sh (PROCURATOR_HOST_CACHE overrides the
default /var/cache/procurator, as it does for setup.sh).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "minimal.nix"
NIX_TIMEOUT = 600

NixBuild = Callable[..., list[Path]]


def host_cache_args() -> list[str]:
    cache = os.environ.get("PROCURATOR_HOST_CACHE")
    return ["--argstr", "hostCache", cache] if cache else []


def build_example(*attrs: str, args: Sequence[str] = ()) -> list[Path]:
    """`nix-build examples/minimal.nix -A <attr>...`: one output path per attribute, in order."""
    argv = ["nix-build", str(EXAMPLE), "--no-out-link", *host_cache_args(), *args]
    for attr in attrs:
        argv += ["-A", attr]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=NIX_TIMEOUT, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    paths = [Path(line) for line in done.stdout.split()]
    assert len(paths) == len(attrs), f"{argv}: expected {len(attrs)} paths, got {done.stdout!r}"
    return paths


@dataclass(frozen=True)
class ExampleBuild:
    """Output paths of one build of examples/minimal.nix."""

    web: Path
    api: Path
    deployment: Path

    @property
    def bundles(self) -> dict[str, Path]:
        return {"web": self.web, "api": self.api}


@pytest.fixture(scope="session")
def nix_build_example() -> NixBuild:
    """The builder behind `example_build`, for tests that need another variant."""
    return build_example


@pytest.fixture(scope="session")
def example_build() -> ExampleBuild:
    web, api, deployment = build_example("web", "api", "deployment")
    return ExampleBuild(web=web, api=api, deployment=deployment)
