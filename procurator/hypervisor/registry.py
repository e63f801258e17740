"""Pick a backend by name. The backend is a host setting, never part of the bundle (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Callable

from procurator.config import HypervisorSettings
from procurator.errors import ConfigError
from procurator.hypervisor.base import Hypervisor
from procurator.hypervisor.cloud_hypervisor import CloudHypervisor, resolve_binary
from procurator.hypervisor.qemu import Qemu


def factory(settings: HypervisorSettings) -> Callable[[str], Hypervisor]:
    """A function from backend name to one backend instance per name (instances keep their children)."""
    made: dict[str, Hypervisor] = {}

    def make(backend: str) -> Hypervisor:
        if backend in made:
            return made[backend]
        own = backend == settings.backend
        if backend == "cloud-hypervisor":
            binary = settings.binary if own else None
            made[backend] = CloudHypervisor(resolve_binary(binary or "cloud-hypervisor"))
        elif backend == "qemu":
            made[backend] = Qemu(binary=settings.binary if own else None, accel=settings.accel)
        else:
            raise ConfigError(f"unknown hypervisor backend {backend!r}; use cloud-hypervisor or qemu")
        return made[backend]

    return make
