"""Fuzzed bundles and deployments: whatever the bytes, loading one returns it or raises ValidationError
(one line naming the file), never another exception; and the limits models.py states are enforced.

The corpus is generated from a seed, so every run sees the same few hundred cases: structural mutations of
a valid procurator.json, vm-config.json and deployment.json (a value replaced by another type, a key
dropped or added, a huge or negative number), and byte-level damage (truncation, a flipped byte)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from procurator import models
from procurator.config import WorkerConfig
from procurator.errors import ConfigError, ProcuratorError, ValidationError
from procurator.models import Bundle, Deployment
from tests.support.bundles import meta, vm_config, write_bundle, write_deployment

SEED = 20261203
CASES = 300
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, 2**70, 10**13, -(10**13), "", "x", "\u0000", "é" * 300, [], {}, [[[]]],
    {"a": {"b": {"c": {}}}}, float("inf"), 255, 256, 4096, 1, "/nix/store/x", [1, "a", None],
]  # fmt: skip


def paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (dict keys and list indices)."""
    out = [here]
    if isinstance(value, dict):
        for key, inner in value.items():
            out += paths(inner, (*here, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            out += paths(inner, (*here, i))
    return out


def mutate(doc: Any, rng: random.Random) -> Any:
    doc = copy.deepcopy(doc)
    where = rng.choice(paths(doc)[1:])
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    move = rng.random()
    if move < 0.6:
        parent[last] = rng.choice(ODD_VALUES)
    elif move < 0.8 and isinstance(parent, dict):
        del parent[last]
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", "colour", "__x", "tap"])] = rng.choice(ODD_VALUES)
    else:
        parent.append(rng.choice(ODD_VALUES))
    return doc


def damage(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data))]
    i = rng.randrange(len(data))
    return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]


def load_or_refuse(load: Any, path: Path, *, bundles: bool = False) -> None:
    """`load(path)` works or raises a one-line ValidationError naming a file under `path` (or, with
    `bundles`, a file of a bundle the deployment names)."""
    try:
        load(path)
    except ValidationError as exc:
        problem = exc
    else:
        return
    assert "\n" not in problem.message
    named = problem.source.startswith(str(path))
    if bundles:
        named = named or problem.source.endswith(("/procurator.json", "/vm-config.json"))
    assert named, problem.message


def test_fuzzed_bundles_load_or_are_refused_in_one_line(tmp_path: Path) -> None:
    rng = random.Random(SEED)  # noqa: S311 - a reproducible corpus, not a secret
    good_meta, good_config = meta("web"), vm_config("web")
    for case in range(CASES):
        meta_data, config = good_meta, good_config
        if rng.random() < 0.5:
            meta_data = mutate(good_meta, rng)
        else:
            config = mutate(good_config, rng)
        path = write_bundle(tmp_path, config=config, meta_data=meta_data, dirname=f"b{case}")
        if case % 5 == 0:  # and byte-level damage of one of its files
            target = path / rng.choice(["procurator.json", "vm-config.json"])
            target.write_bytes(damage(target.read_bytes(), rng))
        load_or_refuse(Bundle.load, path)


def test_fuzzed_deployments_load_or_are_refused_in_one_line(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)  # noqa: S311
    bundle = write_bundle(tmp_path / "store")
    good = json.loads(
        (write_deployment(tmp_path / "d", "local", {"web": bundle}) / "deployment.json").read_text()
    )
    for case in range(CASES // 3):
        path = tmp_path / f"dep{case}"
        path.mkdir()
        text = json.dumps(mutate(good, rng)).encode()
        (path / "deployment.json").write_bytes(damage(text, rng) if case % 4 == 0 else text)

        def load(p: Path) -> None:
            Deployment.load(p).bundles()

        load_or_refuse(load, path, bundles=True)


def refused(tmp_path: Path, *, config: Any = None, meta_data: Any = None, raw: bytes | None = None) -> str:
    path = write_bundle(tmp_path / str(len(list(tmp_path.iterdir()))), config=config, meta_data=meta_data)
    if raw is not None:
        (path / "procurator.json").write_bytes(raw)
    with pytest.raises(ValidationError) as caught:
        Bundle.load(path)
    return caught.value.message.split(f"{path}/", 1)[1]


def test_the_stated_limits(tmp_path: Path) -> None:
    def with_config(**changes: Any) -> dict[str, Any]:
        config = vm_config("web")
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            config[section][key] = value
        return config

    def with_meta(**changes: Any) -> dict[str, Any]:
        return {**meta("web"), **changes}

    volume = {"name": "data", "sizeMiB": 10**13, "fsType": "ext4", "mountPoint": "/mnt/data"}
    too_big = b" " * (models.MAX_INPUT_BYTES + 1)
    retries = [{"type": "http", "port": 80, "retries": 10**9}]
    store = [{"id": "__store", "path": "/nix/store/s", "readonly": True}]
    meta_cases: list[tuple[str, dict[str, Any]]] = [
        ("not UTF-8 (byte 1)", {"raw": b'{\xff"}'}),
        ("not JSON that can be read (RecursionError): nested too deeply", {"raw": b"[" * 100_000}),
        ("not JSON that can be read (ValueError): Exceeds the limit (4300 digits)", {"raw": b"1" * 5000}),
        (f"larger than {models.MAX_INPUT_BYTES} bytes; not a file Procurator reads", {"raw": too_big}),
        (
            f"volumes[0].sizeMiB: must be at most {models.MAX_VOLUME_MIB}, found 10000000000000",
            {"meta_data": with_meta(volumes=[volume])},
        ),
        (
            "health[0].retries: must be at most 1000, found 1000000000",
            {"meta_data": with_meta(health=retries)},
        ),
    ]
    config_cases: list[tuple[str, dict[str, Any]]] = [
        ("memory.size: must be at least 1048576, found 1", with_config(memory__size=1)),
        (f"memory.size: must be at most {1 << 45}, found {1 << 50}", with_config(memory__size=1 << 50)),
        (
            "memory.size: 1048577 bytes is not a multiple of the 4096-byte page",
            with_config(memory__size=(1 << 20) + 1),
        ),
        (
            "cpus.boot_vcpus: must be at most 254, found 1000000",
            with_config(cpus__boot_vcpus=10**6, cpus__max_vcpus=10**6),
        ),
        ("cpus.max_vcpus: must be at least 2, found 1", with_config(cpus__boot_vcpus=2, cpus__max_vcpus=1)),
        (
            "memory.sise: not a cloud-hypervisor setting Procurator passes on (a typo?); remove it",
            with_config(memory__sise=5),
        ),
        ("disks[0].id: '__store' must not start with '__'", {**vm_config("web"), "disks": store}),
    ]
    for expected, kwargs in meta_cases:
        assert refused(tmp_path, **kwargs).startswith(f"procurator.json: {expected}"), expected
    for expected, config in config_cases:
        assert refused(tmp_path, config=config).startswith(f"vm-config.json: {expected}"), expected


def test_fuzzed_worker_configurations_are_refused_in_one_line(tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)  # noqa: S311
    good = {
        "schema": 1,
        "stateDir": "/var/lib/procurator",
        "user": "procurator-vm",
        "hypervisor": {"backend": "cloud-hypervisor", "binary": "/bin/true", "accel": "auto"},
        "network": {"bridge": "procurator0", "subnet": "10.100.0.0/16", "gateway": None, "uplink": None,
                    "nat": False, "isolate": False},
        "apiSocket": "/run/procurator/api.sock",
        "metricsListen": None,
        "healthTimeout": 600,
    }  # fmt: skip
    path = tmp_path / "worker.json"
    for case in range(CASES // 3):
        text = json.dumps(mutate(good, rng)).encode()
        path.write_bytes(damage(text, rng) if case % 4 == 0 else text)
        try:
            WorkerConfig.load(path)
        except (ConfigError, ValidationError) as exc:
            problem: ProcuratorError = exc
        else:
            continue
        assert "\n" not in problem.message
        assert problem.message.startswith(str(path)), problem.message
