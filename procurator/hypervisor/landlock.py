"""Landlock for cloud-hypervisor: which releases have it, what the VMM grants itself, what we add.

What cloud-hypervisor does (read at the tags named; docs/architecture.md, "Landlock"):

- The VMM thread restricts itself at `vm.create` (vmm/src/lib.rs `vm_create`, v41.0-v53.0), right after
  `pre_create_console_devices`, when the VmConfig says `landlock_enable`; the threads it starts later
  (vCPUs, devices) inherit the domain. The rules are the config's own paths (vmm/src/vm_config.rs
  `VmConfig::apply_landlock` and each device's `apply_landlock`: disks "rw", payload "r", rng "r",
  console and serial files and sockets "rw", from v52 `/dev/pts` and `/dev/ptmx` for a Pty, with nets
  `/dev/net/tun` "rw") plus the config's `landlock_rules`.
- We send both fields in the `vm.create` body, not `--landlock` on the command line: from v44 clap refuses
  `--landlock` and `--landlock-rules` without `--kernel`/`--firmware` (the `vm-config` ArgGroup
  `.requires("vm-payload")`, cloud-hypervisor/src/main.rs), and the command-line rules only reach a VM
  given on the command line (`VmParams`).
- A rule whose path cannot be opened is dropped silently at `vm.create` (the landlock crate's
  `path_beneath_rules`); `VmConfig::validate` refuses a `landlock_rules` path that does not exist at
  `vm.boot` ("Path .. provided in landlock-rules does not exist"), so every path we add must exist first.
- From v48 the ruleset is a hard requirement on ABI V3 (vmm/src/landlock.rs `CompatLevel::HardRequirement`):
  on an older kernel `vm.create` fails. So Landlock is used only where the kernel has ABI 3 or newer.

What we add (`extra_rules`) is only what the VM needs after `vm.create` that the config's own rules do not
give: for each TAP named in the config, `/sys/class/net/<tap>/tun_flags` "r" (net_util/src/open_tap.rs
`check_mq_support` reads it at `vm.boot` when the TAP exists, as ours do; v41.0-v53.0), the VM's
snapshot directory "rw", where `vm.snapshot` creates its files, and the serial socket's own directory
"rw", where a guest reset removes and binds the socket again (vmm/src/serial_manager.rs `Drop`,
`vm_reboot` -> `pre_create_console_devices`; hypervisor/keepers.py). Nothing else: the VM directory
(records, logs, the API socket) stays out of reach.
`needs` and `uncovered` check a config against a rule list, so a rule left out is caught before start.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

LANDLOCK_SINCE = 41  # vmm/src/landlock.rs, `landlock_enable`/`landlock_rules` in VmConfig: first in v41.0
PTY_RULES_SINCE = 52  # vmm/src/vm_config.rs CommonConsoleConfig: /dev/pts and /dev/ptmx for a Pty from v52.0
NEEDED_ABI = 3  # vmm/src/landlock.rs `static ABI: ABI = ABI::V3` (a hard requirement from v48.0)
DEFAULT_RNG = "/dev/urandom"  # vmm/src/vm_config.rs `RngConfig::default` src
TUN = "/dev/net/tun"

_SYS_LANDLOCK_CREATE_RULESET = 444  # x86_64 and aarch64 (the generic table)
_LANDLOCK_CREATE_RULESET_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """One `LandlockConfig` (vmm/src/vm_config.rs): a file or a directory beneath which `access` holds."""

    path: str
    access: str  # "r", "w" or "rw"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "access": self.access}


def vmm_rules(config: dict[str, Any], release: int) -> list[Rule]:
    """The rules cloud-hypervisor `release` derives from the fields of `config` our schema allows
    (`VmConfig::apply_landlock`, vmm/src/vm_config.rs v41.0-v53.0), without its `landlock_rules`."""
    rules = [Rule(d["path"], "rw") for d in config.get("disks") or [] if d.get("path")]
    rules.append(Rule((config.get("rng") or {}).get("src") or DEFAULT_RNG, "r"))
    for key in ("console", "serial"):
        device = config.get(key) or {}
        if device.get("mode") == "Pty" and release >= PTY_RULES_SINCE:
            rules += [Rule("/dev/pts", "rw"), Rule("/dev/ptmx", "rw")]
        rules += [Rule(device[k], "rw") for k in ("file", "socket") if device.get(k)]
    payload = config.get("payload") or {}
    rules += [Rule(payload[k], "r") for k in ("firmware", "kernel", "initramfs") if payload.get(k)]
    if config.get("net"):
        rules.append(Rule(TUN, "rw"))
    return rules


def extra_rules(config: dict[str, Any], writable: tuple[PurePath, ...]) -> list[Rule]:
    """The `landlock_rules` we send: each TAP's `tun_flags` in sysfs, "r", and the directories below which
    the VMM creates files after start (the VM's snapshot directory, the serial socket's), "rw"."""
    return [*(Rule(_tun_flags(tap), "r") for tap in _taps(config)), *(Rule(str(p), "rw") for p in writable)]


def _taps(config: dict[str, Any]) -> list[str]:
    return [str(net["tap"]) for net in config.get("net") or [] if net.get("tap")]


def _tun_flags(tap: str) -> str:
    return f"/sys/class/net/{tap}/tun_flags"  # net_util/src/open_tap.rs check_mq_support


def needs(config: dict[str, Any], writable: tuple[PurePath, ...]) -> list[Rule]:
    """What the VMM opens or creates after `vm.create` for `config`, with the access it needs: each disk
    (read-write unless `readonly`), the payload, the TAP device and each named TAP's flags in sysfs, and
    `writable` (snapshots)."""
    wanted = [
        Rule(d["path"], "r" if d.get("readonly") else "rw")
        for d in config.get("disks") or []
        if d.get("path")
    ]
    payload = config.get("payload") or {}
    wanted += [Rule(payload[k], "r") for k in ("firmware", "kernel", "initramfs") if payload.get(k)]
    if any(net.get("tap") or not net.get("fds") for net in config.get("net") or []):
        wanted.append(Rule(TUN, "rw"))
    wanted += [Rule(_tun_flags(tap), "r") for tap in _taps(config)]
    wanted += [Rule(str(path), "w") for path in writable]
    return wanted


def uncovered(wanted: list[Rule], rules: list[Rule]) -> list[Rule]:
    """The entries of `wanted` that no rule grants: a rule covers its own path and, as a directory, every
    path beneath it (Landlock's path-beneath rules), for the letters of its access."""

    def covers(rule: Rule, want: Rule) -> bool:
        inside = (
            PurePath(want.path) == PurePath(rule.path) or PurePath(rule.path) in PurePath(want.path).parents
        )
        return inside and set(want.access) <= set(rule.access)

    return [want for want in wanted if not any(covers(rule, want) for rule in rules)]


@functools.cache
def host_abi() -> int:
    """The kernel's Landlock ABI version (`landlock_create_ruleset(NULL, 0, VERSION)`), 0 without Landlock."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        answer = int(libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(answer, 0)
