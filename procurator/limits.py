"""The limits on names and sizes a bundle may have, one table that Nix and Python both read: a name Nix
accepts at build, Python accepts at load, and the other way round. The table is nix/lib/limits.json (read
by nix/lib/checks.nix with `builtins.fromJSON`; nix/lib is a library of its own, copied alone into flakes);
`limits.json` beside this module is its copy in the Python package, and tests/unit/test_limits.py fails,
saying to copy it again, when the two differ. Change nix/lib/limits.json, then copy it here.

Why each value (docs/bundle.md):
- dnsLabelMaxLength 63: RFC 1123 (host names, tags).
- vmNameMaxLength 20: a VM name is its guest's host name and part of its ownership alias and records.
- interfaceIdMaxLength 8: an interface id goes into the TAP's owner alias and the guest's device ids.
- volumeNameMaxLength 16, xfsVolumeNameMaxLength 12: a volume's name is the file system label the guest
  mounts it by (`mkfs -L`): ext2/3/4 labels hold 16 bytes, xfs labels 12.
- ifnameMaxLength 15: Linux interface names (bridge, uplink, TAPs), IFNAMSIZ minus its NUL.
- maxVcpus 254: cloud-hypervisor v40-v47 parse vCPU counts as u8; x86_64's legacy APIC/mptable allow 254.
- maxMemoryMiB 32 TiB: half the 46-bit guest physical space (DEFAULT_MAX_PHYS_BITS), the rest for devices.
- maxVolumeMiB 16 TiB: a volume is a file in the state directory; ext4 files end there.
- maxSeconds, maxHealthRetries, maxRestarts: every wait and retry is bounded.
- vmmOverheadMiB, minMemoryMaxMiB, maxWeight (cgroup v2 weights 1-10000), maxHostCpu: resources.
"""

from __future__ import annotations

from pathlib import Path

from procurator.jsonread import Reader, parse_text

SOURCE = "procurator/limits.json"
_KEYS = (
    "dnsLabelMaxLength",
    "vmNameMaxLength",
    "interfaceIdMaxLength",
    "volumeNameMaxLength",
    "xfsVolumeNameMaxLength",
    "ifnameMaxLength",
    "maxVcpus",
    "maxMemoryMiB",
    "maxVolumeMiB",
    "maxSeconds",
    "maxHealthRetries",
    "maxRestarts",
    "vmmOverheadMiB",
    "minMemoryMaxMiB",
    "maxWeight",
    "maxHostCpu",
)


def table() -> dict[str, int]:
    """The table as shipped, every key checked (a whole number from 1)."""
    data = Path(__file__).with_name("limits.json").read_bytes()  # package data, installed beside us
    r = Reader(SOURCE, parse_text(SOURCE, data))
    r.only(_KEYS, what="limit")
    return {key: r.integer(key) for key in _KEYS}


_TABLE = table()
DNS_LABEL_MAX = _TABLE["dnsLabelMaxLength"]
VM_NAME_MAX = _TABLE["vmNameMaxLength"]
INTERFACE_ID_MAX = _TABLE["interfaceIdMaxLength"]
VOLUME_NAME_MAX = _TABLE["volumeNameMaxLength"]
XFS_VOLUME_NAME_MAX = _TABLE["xfsVolumeNameMaxLength"]
IFNAME_MAX = _TABLE["ifnameMaxLength"]
MAX_VCPUS = _TABLE["maxVcpus"]
MAX_MEMORY_MIB = _TABLE["maxMemoryMiB"]
MAX_VOLUME_MIB = _TABLE["maxVolumeMiB"]
MAX_SECONDS = _TABLE["maxSeconds"]
MAX_HEALTH_RETRIES = _TABLE["maxHealthRetries"]
MAX_RESTARTS = _TABLE["maxRestarts"]
VMM_OVERHEAD_MIB = _TABLE["vmmOverheadMiB"]
MIN_MEMORY_MAX_MIB = _TABLE["minMemoryMaxMiB"]
MAX_WEIGHT = _TABLE["maxWeight"]
MAX_HOST_CPU = _TABLE["maxHostCpu"]


def volume_name_max(fs_type: str) -> int:
    """The longest volume name a file system of `fs_type` takes as its label."""
    return XFS_VOLUME_NAME_MAX if fs_type == "xfs" else VOLUME_NAME_MAX
