"""Our schema of cloud-hypervisor's API (procurator/hypervisor/ch-api.schema.json) against the official spec.

Every definition, property, type and enum value we carry must exist in the official spec with the same
meaning; where the official schema requires a field, so does ours. CI always lays the official spec beside
the clone and fails without it; on a machine without one, the comparison runs against our own schema
(which checks the comparison itself and that every reference in our schema resolves), never skipped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

from tests.support import chspec


def _official() -> dict[str, Any]:
    """The official spec's schemas; without one (never under CI), our own definitions stand in."""
    schemas = chspec.official_spec()
    if schemas is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{chspec.official_spec_path()}: CI always has the official spec; it is missing")
        ours: dict[str, Any] = chspec.schema()["$defs"]
        return ours
    return schemas


def _ref_name(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    return None if ref is None else str(ref).rsplit("/", 1)[-1]


def _compare(path: str, ours: dict[str, Any], theirs: dict[str, Any], problems: list[str]) -> None:
    """Structural comparison of one of our nodes with the official node at the same place.

    Where ours is a plain node and the official one a reference (VmInfo.config: ours is any object, since
    the real answer fills in every default), ours is compared with the referenced schema.
    """
    our_ref, their_ref = _ref_name(ours), _ref_name(theirs)
    official = chspec.official_spec() or {}
    if our_ref is None and their_ref is not None and their_ref in official:
        _compare(path, ours, official[their_ref], problems)
        return
    if our_ref is not None or their_ref is not None:
        if our_ref != their_ref:
            problems.append(f"{path}: ours refers to {our_ref}, the official spec to {their_ref}")
        return
    if "type" in ours and ours["type"] != theirs.get("type"):
        problems.append(f"{path}: type {ours['type']!r}, official {theirs.get('type')!r}")
    if "enum" in ours:
        extra = set(ours["enum"]) - set(theirs.get("enum", ()))
        if extra:
            problems.append(f"{path}: enum values {sorted(extra)} are not in the official spec")
    missing_required = set(theirs.get("required", ())) - set(ours.get("required", ()))
    if missing_required and ours.get("properties"):
        problems.append(f"{path}: the official spec requires {sorted(missing_required)}; ours does not")
    for name, prop in ours.get("properties", {}).items():
        official = theirs.get("properties", {}).get(name)
        if official is None:
            problems.append(f"{path}.{name}: not in the official spec")
            continue
        _compare(f"{path}.{name}", prop, official, problems)
    for key in ("items", "additionalProperties"):
        if isinstance(ours.get(key), dict):
            if not isinstance(theirs.get(key), dict):
                problems.append(f"{path}: ours has {key}, the official spec does not")
            else:
                _compare(f"{path}.{key}", ours[key], theirs[key], problems)


def test_every_definition_matches_the_official_spec() -> None:
    official = _official()
    problems: list[str] = []
    for name, ours in chspec.schema()["$defs"].items():
        if name not in official:
            problems.append(f"{name}: no such schema in the official spec")
            continue
        _compare(name, ours, official[name], problems)
    defs = chspec.schema()["$defs"]
    refs = set(re.findall(r'"\$ref": "#/\$defs/([A-Za-z]+)"', json.dumps(defs)))
    problems += [f"$ref {ref}: no such definition in our schema" for ref in sorted(refs - set(defs))]
    assert refs
    assert problems == []


def test_the_cross_check_catches_a_field_the_spec_lacks() -> None:
    official = _official()
    problems: list[str] = []
    made_up = {
        "type": "object",
        "properties": {"tap": {"type": "string"}, "queue_pairs": {"type": "integer"}},
    }
    _compare("NetConfig", made_up, official["NetConfig"], problems)
    assert problems == ["NetConfig.queue_pairs: not in the official spec"]
    problems.clear()
    _compare("ConsoleMode", {"type": "string", "enum": ["Off", "Vsock"]}, official["ConsoleMode"], problems)
    assert problems == ["ConsoleMode: enum values ['Vsock'] are not in the official spec"]


def test_what_our_schema_accepts_the_official_spec_accepts() -> None:
    config = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 << 20},
        "payload": {"kernel": "/k", "initramfs": "/i", "cmdline": "console=ttyS0"},
        "disks": [{"id": "store", "path": "/s", "readonly": True, "image_type": "Raw"}],
        "net": [{"id": "eth0", "tap": "pv-a-0", "mac": "02:00:00:00:00:01", "num_queues": 4}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Socket", "socket": "/vm/serial.sock"},
        "console": {"mode": "Pty"},
    }
    assert chspec.errors("VmConfig", config) == []
    if chspec.official_spec() is not None:
        assert chspec.official_errors("VmConfig", config) == []
