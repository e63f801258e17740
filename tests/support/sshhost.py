"""Fake worker hosts for `procurator deploy`: real sshd, a Nix store of their own, the real CLI.

A `FakeFleet` is a "deployer" network namespace (where `procurator deploy` runs) and, per host, a
network namespace joined to it by a veth pair on a private /30 (10.231.<i>.1 deployer side,
10.231.<i>.2 host side; addresses exist only inside these namespaces). Each host runs

    ip netns exec <host ns> unshare --mount --propagation private \\
        sh -c 'mount --bind <host>/nix /nix && exec sshd -D -e -f <host>/sshd_config'

so everything its sshd starts (nix-store --serve for `nix copy`, `procurator apply`, the hypervisors)
sees the host's own, initially empty, /nix: a deploy really copies closures, and the host runs VMs from
the copied paths only. Its sshd takes the fleet's generated client key (authorized_keys and host key in
the host's directory; UsePAM no, root by key only), listens on the host address only, and logs to
`<host>/sshd.log`. The host's `procurator` command (named in the fleet's hosts file) is a generated
wrapper setting the host's own state directory and worker configuration (cloud-hypervisor double or
QEMU, VM bridge inside the host's namespace) and sourcing `<host>/env` for extra variables.

The deployer's ssh uses the client key, `-F none` and a known_hosts file in the fleet's directory,
never ~/.ssh. Tests observe hosts directly (`nsenter` into the sshd's mount and network namespaces),
not through the code under test. Teardown takes every VM down, stops sshd, kills whatever else still
runs from a host's directory, deletes the namespaces and the directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cli import PROCURATOR
from tests.support.host import REPO, pids_mentioning
from tests.support.netns import Netns, throwaway_netns, veth

DOUBLE = REPO / "tests" / "chdouble" / "cloud-hypervisor"
EXAMPLE = REPO / "examples" / "minimal.nix"
HOSTS_NIX = REPO / "nix" / "hosts.nix"
MAKE_DEPLOYMENT = REPO / "nix" / "make-deployment.nix"
SSHD = Path("/usr/sbin/sshd")
SUBNET = "10.231"  # 10.231.<i>.0/30 per host, inside the fleet's namespaces only
VM_SUBNET = "10.124.0.0/24"  # the VM bridge inside each host namespace
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 180.0
DEPLOY_TIMEOUT = 600.0


def _sh(
    argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)


def _ok(argv: Sequence[str], **kw: Any) -> str:
    done = _sh(argv, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def remove_tree(path: Path) -> None:
    """rm -rf that also removes read-only store directories (Nix makes them 0555)."""
    if not path.exists():
        return
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = Path(root) / d
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SshHost:
    """One fake worker host."""

    name: str
    index: int
    root: Path
    ns: Netns
    backend: str  # "double" | "qemu"
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @property
    def target(self) -> str:
        return f"root@{self.address}"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def store(self) -> Path:
        """The host's own Nix store as seen from outside (its /nix/store inside)."""
        return self.root / "nix" / "store"

    @property
    def wrapper(self) -> Path:
        return self.root / "procurator"

    @property
    def config(self) -> dict[str, Any]:
        hypervisor: dict[str, Any] = (
            {"backend": "qemu", "accel": "tcg"}
            if self.backend == "qemu"
            else {"backend": "cloud-hypervisor", "binary": str(DOUBLE)}
        )
        return {
            "hypervisor": hypervisor,
            "network": {"bridge": "pcbr0", "subnet": VM_SUBNET, "netns": self.ns.name},
            # Never the machine's /run/procurator/api.sock: no worker daemon answers for this host.
            "apiSocket": str(self.root / "api.sock"),
        }

    def prepare(self, client_pub: str, *, authorized: str | None = None) -> None:
        """Keys, sshd_config, worker config, the procurator wrapper and an empty /nix."""
        (self.root / "nix" / "store").mkdir(parents=True)
        (self.root / "nix" / "var" / "nix").mkdir(parents=True)
        _ok(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "host_key")])
        (self.root / "authorized_keys").write_text(authorized if authorized is not None else client_pub)
        (self.root / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}:22",
                    f"HostKey {self.root / 'host_key'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PidFile none",
                    "PrintMotd no",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        (self.root / "worker.json").write_text(json.dumps(self.config))
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"# procurator on fake host {self.name}: its own state directory and worker configuration\n"
            f"export PROCURATOR_STATE_DIR={self.state} PROCURATOR_CONFIG={self.root / 'worker.json'}\n"
            f"[ -f {self.root / 'env'} ] && . {self.root / 'env'}\n"
            f'exec {PROCURATOR} "$@"\n'
        )
        self.wrapper.chmod(0o755)

    def set_env(self, **env: str) -> None:
        """Extra environment for the host's procurator (and so its hypervisors) from now on."""
        lines = [f"export {k}={json.dumps(v)}" for k, v in env.items()]
        (self.root / "env").write_text("\n".join(lines) + "\n")

    def start_sshd(self, deployer: Netns) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        log = (self.root / "sshd.log").open("ab")
        # In the host's own mount namespace: its Nix store, and no ~/.bashrc of this machine's root: bash
        # reads it for every command sshd runs (here it runs pyenv's init, ~100 ms of CPU a command),
        # which a worker host's root does not have.
        script = 'mount --bind "$1" /nix && { [ ! -f "$4" ] || mount --bind /dev/null "$4"; }'
        script += ' && exec "$2" -D -e -f "$3"'
        bashrc = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".bashrc"
        argv = ["ip", "netns", "exec", self.ns.name, "unshare", "--mount", "--propagation", "private"]
        argv += ["sh", "-c", script, "sh", str(self.root / "nix"), str(SSHD), str(self.root / "sshd_config")]
        argv += [str(bashrc)]
        with log:
            self.sshd = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

        def listening() -> bool:
            if self.sshd is not None and self.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {self.name} exited: {(self.root / 'sshd.log').read_text()}")
            with contextlib.closing(deployer.socket()) as s:
                s.settimeout(1)
                try:
                    s.connect((self.address, 22))
                except OSError:
                    return False
                return True

        _wait(listening, START_TIMEOUT, f"sshd of {self.name} on {self.address}:22")

    def stop_sshd(self) -> None:
        if self.sshd is None:
            return
        if self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait(STOP_TIMEOUT)
        self.sshd = None

    # -- observing the host (nsenter into its sshd's namespaces, not through ssh) --

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        if self.sshd is None:
            raise RuntimeError(f"host {self.name} has no sshd running to enter")
        enter = ["nsenter", "--target", str(self.sshd.pid), "--mount", "--net", "--"]
        return _sh([*enter, str(self.wrapper), *args], timeout=timeout)

    def ok(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"{self.name}: procurator {' '.join(args)} failed:\n{done.stderr}"
        return done.stdout

    def ps(self) -> dict[str, dict[str, Any]]:
        return {vm["name"]: vm for vm in json.loads(self.ok("ps", "--json"))}

    def running(self) -> dict[str, str]:
        """VM name -> bundle store path of each running VM."""
        return {name: vm["bundle"] for name, vm in self.ps().items() if vm["state"] == "running"}

    def pids(self) -> dict[str, int]:
        return {name: vm["pid"] for name, vm in self.ps().items()}

    def history(self) -> list[dict[str, Any]]:
        result: dict[str, Any] = json.loads(self.ok("history", "--json"))
        generations: list[dict[str, Any]] = result["generations"]
        return generations

    def current(self) -> str | None:
        return next((g["deployment"] for g in self.history() if g["current"]), None)

    def store_paths(self) -> set[str]:
        return {f"/nix/store/{p.name}" for p in self.store.iterdir()} if self.store.exists() else set()

    def cleanup(self) -> list[str]:
        """Take every VM down, stop sshd, kill leftovers. Returns what went wrong (and carries on)."""
        problems = []
        if self.sshd is not None and self.sshd.poll() is None:
            try:
                for name in self.ps():
                    done = self.run("down", "--purge", name)
                    if done.returncode != 0:
                        problems.append(f"{self.name}: down {name}: {done.stderr.strip()}")
            except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                problems.append(f"{self.name}: listing VMs: {exc}")
        self.stop_sshd()
        for pid in pids_mentioning(str(self.root)):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
            problems.append(f"{self.name}: killed leftover process {pid}: {cmdline.strip()}")
        return problems


@dataclass
class HostDecl:
    """How a host appears in the generated hosts file."""

    deployment: str  # a Nix expression (see FakeFleet.example / FakeFleet.web_only)
    tags: Sequence[str] = ()
    procurator: str | None = None  # default: the host's wrapper
    identity_file: str | None = None  # default: the fleet's client key


@dataclass
class FakeFleet:
    root: Path
    deployer: Netns
    hosts: dict[str, SshHost] = field(default_factory=dict)

    @property
    def client_key(self) -> Path:
        return self.root / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @staticmethod
    def example(host: str, **overrides: str) -> str:
        """The deployment of examples/minimal.nix for `host` (web and api) on the double: no health
        checks (the double runs no guest), plus per-VM overrides given as Nix attribute bodies."""
        body = " ".join(
            f"{name} = {{ health = [ ]; }} // {{ {overrides.get(name, '')} }};" for name in ("web", "api")
        )
        return f'(example "{host}" {{ {body} }}).deployment'

    @staticmethod
    def web_only(host: str) -> str:
        """A deployment of the example's web VM alone, health check included (for a QEMU host)."""
        return f'makeDeployment {{ host = "{host}"; vms = {{ inherit (example "{host}" {{ }}) web; }}; }}'

    def write_hosts(self, decls: Mapping[str, HostDecl], name: str = "hosts.nix") -> Path:
        """A hosts file (nix/hosts.nix, nixpkgs-free) declaring these hosts; returns its path."""
        cache = os.environ.get("PROCURATOR_HOST_CACHE")
        cache_arg = f"hostCache = {json.dumps(cache)}; " if cache else ""
        lines = []
        for host_name, d in decls.items():
            host = self.hosts.get(host_name)
            target = host.target if host is not None else f"root@{SUBNET}.250.2"
            procurator = d.procurator or (str(host.wrapper) if host is not None else "procurator")
            tags = " ".join(json.dumps(t) for t in d.tags)
            identity = f"identityFile = {json.dumps(d.identity_file)}; " if d.identity_file else ""
            lines.append(
                f"    {host_name} = {{ target = {json.dumps(target)}; tags = [ {tags} ]; "
                f"procurator = {json.dumps(procurator)}; {identity}deployment = {d.deployment}; }};"
            )
        options = [
            "-F",
            "none",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "LogLevel=ERROR",
        ]
        text = (
            "# Generated by tests/support/sshhost.py\n"
            "let\n"
            f"  example = host: overrides: import {EXAMPLE} {{ {cache_arg}inherit host overrides; }};\n"
            f"  makeDeployment = import {MAKE_DEPLOYMENT};\n"
            "in\n"
            f"import {HOSTS_NIX} {{\n"
            "  defaults = {\n"
            f"    identityFile = {json.dumps(str(self.client_key))};\n"
            f"    sshOptions = [ {' '.join(json.dumps(o) for o in options)} ];\n"
            "  };\n"
            "  hosts = {\n" + "\n".join(lines) + "\n  };\n}\n"
        )
        path = self.root / name
        path.write_text(text)
        return path

    def deploy_argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.deployer.name, str(PROCURATOR), "deploy", *args]

    def deploy(self, *args: str, timeout: float = DEPLOY_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """`procurator deploy ARGS` from the deployer namespace."""
        return _sh(self.deploy_argv(*args), timeout=timeout)

    def deploy_json(self, *args: str, code: int = 0) -> dict[str, Any]:
        done = self.deploy(*args, "--json")
        assert done.returncode == code, f"exit {done.returncode}:\n{done.stderr}"
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@contextlib.contextmanager
def fake_fleet(
    root: Path,
    backends: Mapping[str, str],
    *,
    stopped: Sequence[str] = (),
    unauthorized: Sequence[str] = (),
) -> Iterator[FakeFleet]:
    """Hosts by name -> backend ("double" | "qemu"); `stopped` hosts get no sshd (connection refused),
    `unauthorized` hosts do not accept the fleet's key."""
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        deployer = stack.enter_context(throwaway_netns("pcdd"))
        deployer.ip("link", "set", "lo", "up")
        fleet = FakeFleet(root, deployer)
        _ok(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(fleet.client_key)])
        client_pub = Path(f"{fleet.client_key}.pub").read_text()
        other = root / "other_key"
        _ok(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
        try:
            for index, (name, backend) in enumerate(backends.items(), start=1):
                ns = stack.enter_context(throwaway_netns("pcdh"))
                ns.ip("link", "set", "lo", "up")
                veth(deployer, f"vd{index}", ns, "vh0")
                deployer.ip("addr", "add", f"{SUBNET}.{index}.1/30", "dev", f"vd{index}")
                ns.ip("addr", "add", f"{SUBNET}.{index}.2/30", "dev", "vh0")
                host = SshHost(name, index, root / name, ns, backend)
                fleet.hosts[name] = host
                authorized = Path(f"{other}.pub").read_text() if name in unauthorized else None
                host.prepare(client_pub, authorized=authorized)
                if name not in stopped:
                    host.start_sshd(deployer)
            yield fleet
        finally:
            problems = []
            for host in fleet.hosts.values():
                problems += host.cleanup()
            stack.close()
            for host in fleet.hosts.values():
                remove_tree(host.root)
            if problems:
                print("fleet teardown:", *problems, sep="\n  ")
