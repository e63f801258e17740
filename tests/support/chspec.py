"""cloud-hypervisor's official OpenAPI spec (../shared/cloud-hypervisor/cloud-hypervisor.yaml) as JSON Schema
validators, for tests and the test double. The product itself never reads ../shared."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]


def spec_path() -> Path:
    override = os.environ.get("PROCURATOR_CH_SPEC")
    if override:
        return Path(override)
    return REPO.parent / "shared" / "cloud-hypervisor" / "cloud-hypervisor.yaml"


@functools.cache
def spec() -> dict[str, Any]:
    path = spec_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cloud-hypervisor spec not found; set PROCURATOR_CH_SPEC")
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


@functools.cache
def validator(schema_name: str) -> jsonschema.protocols.Validator:
    """A validator for `components.schemas.<schema_name>` (refs resolve inside the spec)."""
    components = spec()["components"]
    if schema_name not in components["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in the cloud-hypervisor spec")
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
    cls = jsonschema.validators.validator_for({"$schema": "http://json-schema.org/draft-04/schema#"})
    return cls(root)


def errors(schema_name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks the schema, as readable lines (empty when it validates)."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found]
