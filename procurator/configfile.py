"""The worker configuration file's defaults and identity, apart from its reader (config.py).

For the one caller that must not import the reader (dataclasses, pathlib and typing: some 30 ms of a
command on a small host): `procurator ps` answered by a running worker (cli/listing.py). It reads the
file's bytes and takes `apiSocket` and `stateDir` from them, and trusts them only when the worker's
answer names the same `digest`: the worker parsed those very bytes with config.py's reader when it
started, so they are a valid configuration and the two keys mean what the reader makes of them.
"""

from __future__ import annotations

API_SOCKET = "/run/procurator/api.sock"  # the default `apiSocket`
STATE_DIR = "/var/lib/procurator"  # the default `stateDir`
MAX_BYTES = 1024 * 1024  # a configuration file larger than this is refused


def digest(raw: bytes) -> str:
    """The identity of a configuration file's bytes (the worker's `GET /vms` names the one it loaded)."""
    import hashlib  # noqa: PLC0415 - only where a file is read, not for every command that imports this

    return "sha256:" + hashlib.sha256(raw).hexdigest()
