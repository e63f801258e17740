"""Pick a backend by name. The backend is a host setting, never part of the bundle (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable

from procurator.config import DEFAULT_SERIAL_LOG_MAX_BYTES, HypervisorSettings
from procurator.errors import ConfigError
from procurator.hypervisor.base import Diagnosis, Hypervisor


def factory(
    settings: HypervisorSettings, *, serial_max_bytes: int = DEFAULT_SERIAL_LOG_MAX_BYTES
) -> Callable[[str], Hypervisor]:
    """A function from backend name to one backend instance per name (instances keep their children).
    `serial_max_bytes` is where each VM's serial log rotates (the worker config's serialLogMaxBytes)."""
    made: dict[str, Hypervisor] = {}

    def make(backend: str) -> Hypervisor:
        if backend in made:
            return made[backend]
        own = backend == settings.backend
        # Backends are imported when first used: httpx alone costs tens of milliseconds at start-up.
        if backend == "cloud-hypervisor":
            from procurator.hypervisor.cloud_hypervisor import CloudHypervisor, resolve_binary  # noqa: PLC0415

            binary = settings.binary if own else None
            made[backend] = CloudHypervisor(
                resolve_binary(binary or "cloud-hypervisor"),
                serial_max_bytes=serial_max_bytes,
                landlock=settings.landlock,
            )
        elif backend == "qemu":
            from procurator.hypervisor.qemu import Qemu  # noqa: PLC0415

            made[backend] = Qemu(
                binary=settings.binary if own else None,
                accel=settings.accel,
                serial_max_bytes=serial_max_bytes,
            )
        else:
            raise ConfigError(f"unknown hypervisor backend {backend!r}; use cloud-hypervisor or qemu")
        return made[backend]

    return make


def diagnosis(backend: str) -> Diagnosis:
    """The module of `backend`, for `procurator doctor`'s questions that differ by backend."""
    if backend == "cloud-hypervisor":
        from procurator.hypervisor import cloud_hypervisor  # noqa: PLC0415

        return cloud_hypervisor
    if backend == "qemu":
        from procurator.hypervisor import qemu  # noqa: PLC0415

        return qemu
    raise ConfigError(f"unknown hypervisor backend {backend!r}; use cloud-hypervisor or qemu")
