"""Fixtures shared by every test directory: the example Nix builds and a throwaway Procurator host."""

from tests.integration.conftest import example_build, nix_build_example
from tests.support.host import vm_host

__all__ = ["example_build", "nix_build_example", "vm_host"]
