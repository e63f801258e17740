"""JSON Schema validators for cloud-hypervisor's API bodies, for tests and the test double.

`errors()` validates against Procurator's own schema (procurator/hypervisor/ch-api.schema.json), which the
repository carries, so the suite needs nothing beside the clone. `official_spec()` loads cloud-hypervisor's
official OpenAPI spec when one is found ($PROCURATOR_CH_SPEC, else a `shared/cloud-hypervisor/` folder beside
the repository, as CI lays it): tests/unit/test_ch_schema.py cross-checks our schema against it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
OUR_SCHEMA = REPO / "procurator" / "hypervisor" / "ch-api.schema.json"


@functools.cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OUR_SCHEMA.read_text())
    return loaded


@functools.cache
def validator(schema_name: str) -> jsonschema.protocols.Validator:
    """A validator for `$defs.<schema_name>` of our schema (refs resolve inside it)."""
    defs = schema()["$defs"]
    if schema_name not in defs:
        raise KeyError(f"no schema {schema_name!r} in {OUR_SCHEMA}")
    root = {"$ref": f"#/$defs/{schema_name}", "$defs": defs}
    return jsonschema.Draft202012Validator(root)


def errors(schema_name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks our schema, as readable lines (empty when it validates)."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found]


def official_spec_path() -> Path:
    override = os.environ.get("PROCURATOR_CH_SPEC")
    if override:
        return Path(override)
    return REPO.parent / "shared" / "cloud-hypervisor" / "cloud-hypervisor.yaml"


@functools.cache
def official_spec() -> dict[str, Any] | None:
    """The official spec's `components.schemas`, or None when no spec is found."""
    path = official_spec_path()
    if not path.is_file():
        return None
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    schemas: dict[str, Any] = loaded["components"]["schemas"]
    return schemas


@functools.cache
def official_validator(schema_name: str) -> jsonschema.protocols.Validator:
    schemas = official_spec()
    if schemas is None:
        raise FileNotFoundError(f"{official_spec_path()}: no official cloud-hypervisor spec")
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": {"schemas": schemas}}
    return jsonschema.Draft4Validator(root)


def official_errors(schema_name: str, instance: Any) -> list[str]:
    found = official_validator(schema_name).iter_errors(instance)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found)


def full_body_errors(schema_name: str, instance: Any) -> list[str]:
    """For bodies that spell out fields Procurator never sends (the qemu backend's tests): the official
    spec's verdict when a spec is found, else ours with unknown fields let through."""
    if official_spec() is not None:
        return official_errors(schema_name, instance)
    return [e for e in errors(schema_name, instance) if "Additional properties are not allowed" not in e]
