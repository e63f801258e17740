"""The fleet `lib.mkHosts` (nix/hosts.nix) describes: where it is (`FleetRef`), its hosts (`HostSpec`),
and `--on` selection."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator import nix
from procurator.errors import UsageError, ValidationError
from procurator.jsonread import Reader
from procurator.models import SCHEMA_VERSION, is_dns_label
from procurator.resolve import RefKind, parse_ref

CONNECT_TIMEOUT = 10  # seconds: ssh's ConnectTimeout
DEFAULT_ATTR = "procuratorHosts"  # the flake output `procurator deploy FLAKE` reads without `#attr`
CONTROL_PERSIST = 60  # seconds a shared ssh connection outlives its last use (if not closed before)


# -- the fleet -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """One host of the fleet, as lib.mkHosts' `inventory` describes it."""

    name: str
    target: str
    port: int | None = None
    identity_file: str | None = None
    ssh_options: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    procurator: str = "procurator"

    @classmethod
    def parse(cls, source: str, name: str, data: Any) -> HostSpec:
        where = f"hosts.{name}"
        r = Reader(source, data, where, expected="an object of host settings")
        if not is_dns_label(name):
            raise ValidationError(source, where, f"host name {name!r} is not a DNS label")
        target = r.text("target", nonempty=True, what="a non-empty string")
        if target.startswith("-") or target.split() != [target]:
            raise r.fail("target", f"{target!r} is not [user@]host")
        port = r.opt_integer("port", maximum=65535, what="a TCP port (1-65535)")
        tags = r.strings("tags", nonempty=True)
        bad = [t for t in tags if not is_dns_label(t)]
        if bad:
            raise r.fail("tags", f"{bad[0]!r} is not a DNS label")
        options = r.strings("sshOptions", nonempty=True)
        spaced = [o for o in options if o.split() != [o]]
        if spaced:
            raise r.fail("sshOptions", f"{spaced[0]!r} has white space")
        identity_file = r.opt_text("identityFile", nonempty=True, what="a non-empty string")
        command = r.opt_text("procurator", nonempty=True, what="a non-empty string") or "procurator"
        try:
            shlex.split(command)
        except ValueError as exc:
            raise r.fail("procurator", f"{command!r}: {exc}") from exc
        return cls(
            name=name,
            target=target,
            port=port,
            identity_file=identity_file,
            ssh_options=options,
            tags=tags,
            procurator=command,
        )

    @property
    def command(self) -> list[str]:
        """The words of the `procurator` setting, split as a POSIX shell splits them (`shlex`); the
        arguments of a remote command follow them."""
        return shlex.split(self.procurator)

    @property
    def store(self) -> str:
        """The `nix copy --to` store of this host."""
        return f"ssh://{self.target}"

    def ssh_options_for(
        self, connect_timeout: int = CONNECT_TIMEOUT, control_dir: Path | None = None
    ) -> list[str]:
        """ssh's options for this host, for our own ssh and for `nix copy`'s (NIX_SSHOPTS).

        The fleet's own options come first: ssh keeps the first value it is given for an option, so
        they win over these defaults. BatchMode: never ask for a password or a host key. With
        `control_dir`, every ssh to this host shares one connection (ControlMaster): the first one
        opens it and leaves it in the background for the others (`close_shared`).
        """
        out = list(self.ssh_options)
        if self.port is not None:
            out += ["-p", str(self.port)]
        if self.identity_file is not None:
            out += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        out += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
        ]
        if control_dir is not None:
            out += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C"]
            out += ["-o", f"ControlPersist={CONTROL_PERSIST}"]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "port": self.port,
            "identityFile": self.identity_file,
            "sshOptions": list(self.ssh_options),
            "tags": list(self.tags),
            "procurator": self.procurator,
        }


@dataclass(frozen=True)
class FleetRef:
    """Where the fleet is: a flake with an attribute, or a Nix file with an optional attribute."""

    ref: str
    base: str
    attr: str  # the attribute path of the mkHosts value ("" for a file that is one)
    is_file: bool

    @classmethod
    def parse(cls, ref: str) -> FleetRef:
        """REF read by resolve.py's one parser of references: no store paths; a flake without
        `#attr` means its `procuratorHosts`."""
        hint = "a flake (`.`, `.#fleet`) or a Nix file (`hosts.nix[#attr]`)"
        parsed = parse_ref(ref, hint=hint, paths=False)
        if parsed.kind is RefKind.FILE:
            return cls(ref, parsed.base, parsed.attr or "", is_file=True)
        return cls(ref, parsed.base, parsed.attr or DEFAULT_ATTR, is_file=False)

    def _path(self, *rest: str) -> str:
        return ".".join(p for p in (self.attr, *rest) if p)

    def evaluate(self, *rest: str) -> Any:
        """`nix eval --json` of an attribute below the fleet."""
        if self.is_file:
            return nix.eval_file_json(Path(self.base), self._path(*rest))
        return nix.eval_flake_json(f"{self.base}#{self._path(*rest)}")

    def build(self, *rest: str) -> list[Path]:
        """`nix build` of an attribute below the fleet: its output paths."""
        if self.is_file:
            return nix.build_file(Path(self.base), self._path(*rest))
        return nix.build_flake(f"{self.base}#{self._path(*rest)}")

    def build_all(self, attrs: Sequence[Sequence[str]]) -> list[Path]:
        """One `nix build` of several attributes below the fleet (one evaluation of it): their output
        paths, in no promised order."""
        paths = [self._path(*rest) for rest in attrs]
        if self.is_file:
            return nix.build_file_attrs(Path(self.base), paths)
        return nix.build_flakes([f"{self.base}#{p}" for p in paths])

    def deployment_attr(self, name: str) -> str:
        """How people would name the deployment of host `name`."""
        where = self._path("hosts", name, "deployment")
        return f"{self.base} {where}" if self.is_file else f"{self.base}#{where}"


@dataclass(frozen=True)
class Fleet:
    ref: FleetRef
    hosts: dict[str, HostSpec]

    @classmethod
    def parse(cls, ref: FleetRef, data: Any) -> Fleet:
        source = f"{ref.ref} (inventory)"
        r = Reader.versioned(
            source,
            data,
            SCHEMA_VERSION,
            what="the `inventory` of lib.mkHosts",
            fix="use a procurator of the release whose lib.mkHosts the fleet calls",
        )
        hosts = r.obj("hosts", required=True, expected="an object of hosts by name")
        return cls(
            ref, {name: HostSpec.parse(source, name, hosts.data[name]) for name in sorted(hosts.names())}
        )

    @classmethod
    def load(cls, ref: str) -> Fleet:
        """Evaluate REF's inventory (no deployment is evaluated or built)."""
        fleet_ref = FleetRef.parse(ref)
        return cls.parse(fleet_ref, fleet_ref.evaluate("inventory"))

    def select(self, on: str | None) -> list[HostSpec]:
        """The hosts `--on` names: comma-separated host names and @tags (default: every host), by name."""
        if on is None:
            return list(self.hosts.values())
        names: set[str] = set()
        for raw in on.split(","):
            item = raw.strip()
            if not item:
                raise UsageError(f"--on {on!r}: empty item; give HOST,@TAG,...")
            if item.startswith("@"):
                tagged = {h.name for h in self.hosts.values() if item[1:] in h.tags}
                if not tagged:
                    known = sorted({t for h in self.hosts.values() for t in h.tags})
                    raise UsageError(
                        f"--on: no host has tag {item[1:]!r} (tags: {', '.join(known) or 'none'})"
                    )
                names |= tagged
            elif item in self.hosts:
                names.add(item)
            else:
                raise UsageError(f"--on: no host {item!r} in {self.ref.ref} (hosts: {', '.join(self.hosts)})")
        return [self.hosts[n] for n in sorted(names)]
