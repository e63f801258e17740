"""Procurator: microVMs built with Nix, run with cloud-hypervisor."""

# pyproject.toml's `project.version`, which nix/package.nix reads; test_version keeps the two equal
__version__ = "0.1.0"
