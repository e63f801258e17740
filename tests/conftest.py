"""Fixtures shared by every test directory: the example Nix builds and a throwaway Procurator host; and
the selection of the nixpkgs_lib tests (below)."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from tests.integration.conftest import example_build, nix_build_example
from tests.support.cli import REPO
from tests.support.host import vm_host

__all__ = ["example_build", "nix_build_example", "vm_host"]

# The cloud-hypervisor double (tests/chdouble/cloud-hypervisor) runs on make setup's .venv/bin/python, else
# on `python3` from PATH, which need not have the project's dependencies: when the tests run from another
# environment (a venv made elsewhere), the double runs on the interpreter running them, as the CLI does
# (tests/support/cli.py). A test that sets CHDOUBLE_PYTHON itself (an unprivileged double) still wins.
if not (REPO / ".venv" / "bin" / "python").is_file():
    os.environ.setdefault("CHDOUBLE_PYTHON", sys.executable)


# The tests marked nixpkgs_lib evaluate the NixOS modules with nixpkgs' lib, which is neither in this
# repository nor reachable offline. Without PROCURATOR_NIXPKGS_LIB they are deselected, and the run says
# so in its summary, however pytest is started (`make test`, `pytest tests/unit`); asked for by name
# (`-m nixpkgs_lib`, `make nixos-eval`) without the variable, they fail saying what to set.
NIXPKGS_LIB = "nixpkgs_lib"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PROCURATOR_NIXPKGS_LIB") or NIXPKGS_LIB in (config.getoption("markexpr") or ""):
        return
    left = [item for item in items if item.get_closest_marker(NIXPKGS_LIB) is not None]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = [item for item in items if item.get_closest_marker(NIXPKGS_LIB) is None]
        config.stash[_DESELECTED] = len(left)


_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    count = config.stash.get(_DESELECTED, 0)
    if count:
        terminalreporter.write_line(
            f"not run: {count} nixpkgs_lib tests (NixOS modules evaluated with nixpkgs' lib) need "
            "PROCURATOR_NIXPKGS_LIB=<nixpkgs>/lib; see make nixos-eval"
        )
