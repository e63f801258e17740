"""systemd's readiness protocol (sd_notify): datagrams to the socket systemd names in $NOTIFY_SOCKET.

The worker unit is `Type=notify`: the worker says READY=1 once its API socket is bound and the VMs that
were running are adopted, so units ordered after it (procurator-apply, the pull timer's service) talk to
a worker that answers. Without $NOTIFY_SOCKET (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") to systemd; whether a notify socket took them."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(5.0)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd on %s: %s", os.environ["NOTIFY_SOCKET"], exc.strerror or exc)
        return False
    return True
