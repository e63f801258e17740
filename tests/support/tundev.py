"""/dev/net/tun as a host with udev has it, for hypervisors that run as an unprivileged user.

The tun driver asks devtmpfs for no mode, so without udev (as on the machines this suite runs on)
/dev/net/tun is 0600 and only root may open it; udev's default rules make it 0666, which is what an
unprivileged cloud-hypervisor relies on. `open_tun_for_everyone` runs a command with a 0666 node of the same
device (10:200, from a tmpfs) bind-mounted on /dev/net/tun. Run it in a private mount namespace (`unshare
--mount`, or `ip netns exec`, which makes one): the host's /dev is never touched.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

TUN = "/dev/net/tun"
_SCRIPT = (
    'mount -t tmpfs -o mode=0755 procurator-test-dev "$0"; mknod -m 0666 "$0/tun" c 10 200; '
    f'mount --bind "$0/tun" {TUN}; exec "$@"'
)


def everyone_may_open() -> bool:
    mode = os.stat(TUN).st_mode
    return mode & (stat.S_IROTH | stat.S_IWOTH) == stat.S_IROTH | stat.S_IWOTH


def open_tun_for_everyone(scratch: Path, argv: Sequence[str]) -> list[str]:
    """`argv`, run with a 0666 /dev/net/tun; `scratch` is an empty directory the tmpfs is mounted on."""
    return ["sh", "-ec", _SCRIPT, str(scratch), *argv]


def in_private_mounts(argv: Sequence[str]) -> list[str]:
    """`argv` in a new mount namespace whose mounts do not propagate back to the host's."""
    return ["unshare", "--mount", "--propagation", "slave", *argv]
