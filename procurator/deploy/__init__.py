"""Deploying to many hosts (docs/deploy.md): `procurator deploy` / `nix run .#deploy`.

The package: `fleet.py` (the fleet and its hosts), `model.py` (phases, results, events, options),
`remote.py` (procurator on a host over ssh, its typed output), `host.py` (one host's steps), `pool.py`
(the bounded pool), `run.py` (the deploy of many hosts).

A fleet is what `lib.mkHosts` (nix/hosts.nix) makes: per host an SSH target, tags, the command that runs
procurator there, and a deployment. `Fleet.load(REF)` reads the settings of every host with one
`nix eval --json <REF>.inventory`, evaluating no deployment; `deploy()` then works in two phases:

1. **Pre-flight**, every selected host at once (bounded), before anything is built: `ssh <target>
   true`, so a host that is unreachable or refuses the key is reported (`unreachable`) and left
   alone, and the others go on. (Nothing of procurator runs there yet: a host without procurator
   fails at its apply or plan, having changed nothing.)
2. **Per host**, `parallel` hosts at a time: build `<REF>.hosts.<name>.deployment` (all of them
   first with one `nix build`; when that fails each host builds its own, so one host's evaluation or
   build failing fails that host only), `nix copy --to ssh://<target>` its closure, then
   `<procurator> apply <deployment> --json` there. The remote apply is health-gated and puts back the old
   generation of any VM that fails; when the apply fails having changed something, the host is rolled
   back to the generation it ran before (`rollback --to N`, N being its current generation: an apply
   records its deployment only when it succeeds), or, on a host without history, the VMs the failed
   apply created are taken down again. With `dry_run`, `<procurator> plan <deployment> --json` runs instead
   of apply: the closure is copied (the host's store gains paths, nothing else changes) so that the plan
   sees the real bundles.

One host failing never stops the others. Interrupting (KeyboardInterrupt in the calling thread, or
`stop`) starts no new host; remote applies already running are left to finish (their ssh runs in its
own session, out of reach of the terminal's Ctrl-C) and reported as they end; builds and copies,
which change nothing on a host, end with the Ctrl-C. A second interrupt stops waiting: hosts still
applying are reported `interrupted`.

SSH is the system's `ssh`, its command lines made by `procurator.process.run(..., remote=)` (every
argument quoted); `nix copy` goes through `procurator.nix`; the core never prints: `progress` receives
every change of a host's phase and its result.
"""

from __future__ import annotations

from procurator.deploy.fleet import CONNECT_TIMEOUT, DEFAULT_ATTR, Fleet, FleetRef, HostSpec
from procurator.deploy.model import (
    OK_RESULTS,
    DeployResult,
    Event,
    HostResult,
    Options,
    Phase,
    Progress,
    Result,
    Stage,
)
from procurator.deploy.remote import Remote, preflight
from procurator.deploy.run import deploy

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_ATTR",
    "OK_RESULTS",
    "DeployResult",
    "Event",
    "Fleet",
    "FleetRef",
    "HostResult",
    "HostSpec",
    "Options",
    "Phase",
    "Progress",
    "Remote",
    "Result",
    "Stage",
    "deploy",
    "preflight",
]
