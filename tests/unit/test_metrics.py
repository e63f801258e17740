"""The Prometheus text exposition: written by procurator.metrics, read back by an independent parser of
the format (HELP and TYPE lines, label escaping, values, histograms), and the worker's own series."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from procurator import metrics, process
from procurator.config import WorkerConfig
from procurator.errors import HypervisorError
from procurator.hypervisor.base import GuestEnd, Handle, Hypervisor, LaunchSpec, StopResult, VmInfo, VmState
from procurator.lifecycle import Host
from procurator.metrics import CountersCache, Histogram
from procurator.state import StateDir, VmRecord
from procurator.worker import Settings, Worker

# --- an independent reader of the text format (version 0.0.4) ---------------------------------------

METRIC_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Parsed:
    help: dict[str, str] = field(default_factory=dict)
    type: dict[str, str] = field(default_factory=dict)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def family_of(self, sample: str) -> str:
        for suffix in ("_bucket", "_sum", "_count", ""):
            base = sample.removesuffix(suffix) if suffix else sample
            if base in self.type and (suffix == "" or self.type[base] in {"histogram", "summary"}):
                return base
        raise AssertionError(f"sample {sample} has no TYPE line before it")

    def values(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(labels.items())): value for n, labels, value in self.samples if n == name}

    def one(self, name: str, **labels: str) -> float:
        found = [
            v for n, ls, v in self.samples if n == name and all(ls.get(k) == x for k, x in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return found[0]


def unescape(text: str, escapes: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            assert i + 1 < len(text), f"dangling backslash in {text!r}"
            assert text[i + 1] in escapes, f"bad escape \\{text[i + 1]} in {text!r}"
            out.append(escapes[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_labels(text: str, i: int) -> tuple[dict[str, str], int]:
    """Labels from text[i] == '{' to the matching '}'; returns them and the index after it."""
    assert text[i] == "{"
    i += 1
    labels: dict[str, str] = {}
    while text[i] != "}":
        start = i
        while text[i] != "=":
            i += 1
        name = text[start:i]
        assert name, f"empty label name at {start}"
        assert name[0].isalpha() or name[0] == "_", f"bad label name {name!r}"
        assert set(name) <= METRIC_NAME - {":"}, f"bad label name {name!r}"
        assert text[i + 1] == '"', f"label value of {name} is not quoted"
        i += 2
        raw = []
        while text[i] != '"':
            if text[i] == "\\":
                raw.append(text[i : i + 2])
                i += 2
            else:
                assert text[i] != "\n"
                raw.append(text[i])
                i += 1
        assert name not in labels, f"label {name} twice"
        labels[name] = unescape("".join(raw), {"\\": "\\", '"': '"', "n": "\n"})
        i += 1
        if text[i] == ",":
            i += 1
    return labels, i + 1


def parse_value(text: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    return float(text)


def parse_exposition(text: str) -> Parsed:
    assert text.endswith("\n"), "the exposition ends with a line feed"
    parsed = Parsed()
    finished: set[str] = set()  # families whose samples are over: they must not come back
    current: str | None = None
    for line in text[:-1].split("\n"):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                name = parts[2]
                assert name not in parsed.help, f"second HELP for {name}"
                parsed.help[name] = unescape(parts[3] if len(parts) > 3 else "", {"\\": "\\", "n": "\n"})
            elif len(parts) >= 3 and parts[1] == "TYPE":
                name, kind = parts[2], parts[3]
                assert kind in TYPES, line
                assert name not in parsed.type, f"second TYPE for {name}"
                assert not any(n == name for n, _, _ in parsed.samples), f"TYPE of {name} after its samples"
                parsed.type[name] = kind
            continue
        i = 0
        while i < len(line) and line[i] in METRIC_NAME:
            i += 1
        name = line[:i]
        assert name, line
        assert not name[0].isdigit(), line
        labels: dict[str, str] = {}
        if line[i] == "{":
            labels, i = parse_labels(line, i)
        assert line[i] == " ", line
        fields = line[i + 1 :].split(" ")
        assert len(fields) in (1, 2), line
        family = parsed.family_of(name)
        if family != current:
            assert family not in finished, f"samples of {family} are not together"
            if current is not None:
                finished.add(current)
            current = family
        parsed.samples.append((name, labels, parse_value(fields[0])))
    for family, kind in parsed.type.items():
        if kind == "histogram":
            check_histogram(parsed, family)
    return parsed


def check_histogram(parsed: Parsed, family: str) -> None:
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for name, labels, value in parsed.samples:
        if name == family + "_bucket":
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            buckets.setdefault(rest, []).append((parse_value(labels["le"]), value))
    counts = parsed.values(family + "_count")
    for rest, series in buckets.items():
        bounds = [b for b, _ in series]
        assert bounds == sorted(bounds), series
        assert bounds[-1] == math.inf, series
        values = [v for _, v in series]
        assert values == sorted(values), f"buckets of {family} are not cumulative: {series}"
        assert counts[rest] == values[-1], f"{family}_count differs from its +Inf bucket"


# --- the format --------------------------------------------------------------------------------------


class Families:
    """A collector of fixed families (what the worker's collector yields at a scrape)."""

    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render(*families: Metric) -> str:
    return metrics.exposition(Families(*families)).decode()


def test_exposition_round_trips_names_help_types_labels_and_values() -> None:
    gauge = metrics.gauge(
        "demo_temperature", 'A "help" text\\with a backslash\nand a line feed', ("room", "path", "note")
    )
    gauge.add_metric(('kitchen "north"', "C:\\dir\\", "two\nlines"), 21.5)
    gauge.add_metric(("cellar", "", ""), -3)
    gauge.add_metric(("sun", "", ""), math.inf)
    gauge.add_metric(("space", "", ""), -math.inf)
    gauge.add_metric(("unknown", "", ""), math.nan)
    counter = metrics.counter("demo_events_total", "Events.", ("kind",))
    counter.add_metric(("",), 12345678901)
    counter.add_metric(("x",), 0.1)
    empty = metrics.gauge("demo_unused", "No samples: not rendered.")
    text = render(gauge, counter, empty)

    parsed = parse_exposition(text)
    assert parsed.type == {"procurator_demo_temperature": "gauge", "procurator_demo_events_total": "counter"}
    assert parsed.help["procurator_demo_temperature"] == 'A "help" text\\with a backslash\nand a line feed'
    t = "procurator_demo_temperature"
    assert parsed.one(t, room='kitchen "north"') == 21.5
    assert parsed.one(t, path="C:\\dir\\") == 21.5
    assert parsed.one(t, note="two\nlines") == 21.5
    assert parsed.one(t, room="cellar") == -3
    assert parsed.one(t, room="sun") == math.inf
    assert parsed.one(t, room="space") == -math.inf
    assert math.isnan(parsed.one(t, room="unknown"))
    assert parsed.values("procurator_demo_events_total") == {
        (("kind", ""),): 12345678901,
        (("kind", "x"),): 0.1,
    }
    assert "demo_unused" not in text
    lines = text.splitlines()
    assert (
        lines[0] == '# HELP procurator_demo_temperature A "help" text\\\\with a backslash\\nand a line feed'
    )
    assert lines[1] == "# TYPE procurator_demo_temperature gauge"
    assert lines[2] == (
        'procurator_demo_temperature{note="two\\nlines",path="C:\\\\dir\\\\",room="kitchen \\"north\\""} 21.5'
    )
    # prometheus_client's own parser reads the same
    read = {f.name: f for f in text_string_to_metric_families(text)}
    assert (
        read["procurator_demo_temperature"].documentation
        == 'A "help" text\\with a backslash\nand a line feed'
    )
    assert read["procurator_demo_events"].type == "counter"
    assert {s.labels["kind"]: s.value for s in read["procurator_demo_events"].samples} == {
        "": 12345678901,
        "x": 0.1,
    }


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    histogram = Histogram((0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 2.0, 20.0, 30.0):
        histogram.observe(value)
    family = metrics.histogram("demo_duration_seconds", "Durations.", ("kind",))
    histogram.add_to(family, ("x",))
    parsed = parse_exposition(render(family))
    name = "procurator_demo_duration_seconds"
    buckets = {labels["le"]: v for n, labels, v in parsed.samples if n == name + "_bucket"}
    assert buckets == {"0.1": 2, "1": 3, "10": 4, "+Inf": 6}
    assert parsed.one(name + "_count", kind="x") == 6
    assert parsed.one(name + "_sum", kind="x") == pytest.approx(52.65)
    assert histogram.count == 6


@pytest.mark.parametrize(
    ("kind", "name", "labels"),
    [
        ("gauge", "has-dash", ()),
        ("gauge", "ok_name", ("bad-label",)),
        ("gauge", "ok_name", ("__reserved",)),
        ("gauge", "ok_name", ("vm", "vm")),
        ("counter", "events", ()),  # a counter's name ends in _total
        ("histogram", "ok_seconds", ("le",)),  # the buckets' own label
    ],
)
def test_bad_names_are_refused_when_the_family_is_made(kind: str, name: str, labels: tuple[str, ...]) -> None:
    make = {"gauge": metrics.gauge, "counter": metrics.counter, "histogram": metrics.histogram}[kind]
    with pytest.raises(ValueError, match=r"invalid|repeats"):
        make(name, "x", labels)


def test_a_family_is_rendered_once() -> None:
    family = metrics.counter("demo_total", "x")
    family.add_metric((), 1)
    with pytest.raises(ValueError, match="twice"):
        render(family, family)


# --- what is measured ------------------------------------------------------------------------------


def test_process_figures_of_the_very_process() -> None:
    start = process.process_start_time(os.getpid())
    assert start is not None
    figures = metrics.process_figures(os.getpid(), start)
    assert figures is not None
    assert figures.rss_bytes > 1 << 20
    assert figures.cpu_seconds > 0
    assert metrics.process_figures(os.getpid(), start + 1) is None  # a recycled pid is not ours
    assert metrics.process_figures(2**22 + 1, 0) is None


class FakeHypervisor:
    """Answers counters() per pid and counts the calls; everything else is not needed here."""

    name = "cloud-hypervisor"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.failing: set[int] = set()

    def counters(self, handle: Handle) -> dict[str, dict[str, int]]:
        self.calls.append(handle.pid)
        if handle.pid in self.failing:
            raise HypervisorError("no answer")
        return {
            "eth0": {"rx_bytes": 100 * len(self.calls), "tx_bytes": 7, "rx_frames": 1, "tx_frames": 2},
            "store": {
                "read_bytes": 4096,
                "write_bytes": 0,
                "read_ops": 1,
                "write_ops": 0,
                "read_latency_avg": 3,
            },
        }

    def start(self, spec: LaunchSpec) -> Handle:
        raise NotImplementedError

    def info(self, handle: Handle) -> VmInfo:
        return VmInfo(VmState.RUNNING, {"pid": handle.pid})

    def shutdown(self, handle: Handle, timeout: float) -> StopResult:
        raise NotImplementedError

    def kill(self, handle: Handle) -> None:
        raise NotImplementedError

    def pause(self, handle: Handle) -> None:
        raise NotImplementedError

    def resume(self, handle: Handle) -> None:
        raise NotImplementedError

    def snapshot(self, handle: Handle, directory: Path) -> None:
        raise NotImplementedError

    def restore(self, spec: LaunchSpec, directory: Path, *, paused: bool) -> Handle:
        raise NotImplementedError

    def console_path(self, handle: Handle) -> Path:
        return handle.vm_dir / "console.sock"

    def guest_end(self, _vm_dir: Path) -> GuestEnd | None:
        return None

    def ping(self, handle: Handle, *, timeout: float | None = None) -> object:
        raise NotImplementedError

    def adopt(self, handle: Handle) -> bool:
        return handle.pid > 0


def fake_record(name: str, pid: int, start_time: int, tmp: Path, **extra: object) -> VmRecord:
    return VmRecord(
        name=name,
        bundle=f"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-procurator-vm-{name}",
        generation="0123456789abcdfghijklmnpqrsvwxyz",
        backend="cloud-hypervisor",
        pid=pid,
        start_time=start_time,
        api_socket=str(tmp / name / "api.sock"),
        vm_dir=str(tmp / name),
        **extra,  # type: ignore[arg-type]
    )


def test_counters_cache_asks_each_vm_once_per_ttl(tmp_path: Path) -> None:
    now = [0.0]
    hv = FakeHypervisor()
    factory: dict[str, Hypervisor] = {"cloud-hypervisor": hv}
    cache = CountersCache(factory.__getitem__, ttl=10.0, parallel=4, clock=lambda: now[0])
    records = [fake_record(f"vm{i}", 1000 + i, 1, tmp_path) for i in range(6)]
    first = cache.get(records)
    assert sorted(hv.calls) == [1000 + i for i in range(6)]
    assert first["vm0"]["eth0"]["tx_bytes"] == 7
    now[0] = 9.9
    cache.get(records)
    assert len(hv.calls) == 6  # within the ttl: no call at all
    now[0] = 10.0
    hv.failing = {1001}
    again = cache.get(records)
    assert len(hv.calls) == 12  # one call per VM, no more
    assert again["vm1"] == first["vm1"]  # no answer: the last figures stay
    restarted = [*records[:2], fake_record("vm2", 2002, 5, tmp_path)]
    now[0] = 11.0
    cache.get(restarted)
    assert hv.calls[12:] == [2002]  # a new process is asked at once; gone VMs are dropped
    assert set(cache.get(restarted)) == {"vm0", "vm1", "vm2"}
    assert cache.calls == 13


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def test_worker_metrics_have_every_series_and_parse(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    state = StateDir(tmp_path / "state")
    start = process.process_start_time(sleeper.pid)
    assert start is not None
    state.save_record(fake_record("web", sleeper.pid, start, state.vms_dir, restarts=2, started_at=1000.0))
    state.save_record(fake_record('we"ird', 0, 0, state.vms_dir, desired="failed", last_exit="crash loop"))
    hv = FakeHypervisor()
    factory: dict[str, Hypervisor] = {"cloud-hypervisor": hv}
    host = Host(state=state, config=WorkerConfig(), hypervisors=factory.__getitem__, clock=lambda: 1010.0)
    worker = Worker(host, Settings(api_socket=tmp_path / "api.sock"))

    parsed = parse_exposition(worker.metrics_text())
    up = parsed.values("procurator_vm_up")
    assert up == {
        (
            ("backend", "cloud-hypervisor"),
            ("generation", "0123456789abcdfghijklmnpqrsvwxyz"),
            ("vm", "web"),
        ): 1,
        (
            ("backend", "cloud-hypervisor"),
            ("generation", "0123456789abcdfghijklmnpqrsvwxyz"),
            ("vm", 'we"ird'),
        ): 0,
    }
    assert parsed.one("procurator_vm_state", vm='we"ird', state="failed") == 1
    assert parsed.one("procurator_vm_uptime_seconds", vm="web") == 10.0
    assert parsed.one("procurator_vm_restarts_total", vm="web") == 2
    assert parsed.one("procurator_vm_cpu_seconds_total", vm="web") >= 0
    assert parsed.one("procurator_vm_memory_rss_bytes", vm="web") > 1 << 20
    assert parsed.one("procurator_vm_network_receive_bytes_total", vm="web", device="eth0") == 100
    assert parsed.one("procurator_vm_block_read_bytes_total", vm="web", device="store") == 4096
    assert not any(n.startswith("procurator_vm_") and ls.get("vm") == 'we"ird' and n != "procurator_vm_up"
                   and n not in {"procurator_vm_state", "procurator_vm_restarts_total"}
                   for n, ls, _ in parsed.samples)  # fmt: skip
    assert parsed.type["procurator_reconcile_duration_seconds"] == "histogram"
    assert parsed.one("procurator_reconcile_duration_seconds_count") == 0
    assert parsed.type["procurator_vm_cpu_seconds_total"] == "counter"
    assert all(parsed.help[name] for name in parsed.type)
    assert hv.calls == [sleeper.pid]  # one API call for the one running VM
    worker.metrics_text()
    assert hv.calls == [sleeper.pid]  # the next scrape within the ttl costs none


def test_worker_metrics_read_by_prometheus_clients_parser(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    state = StateDir(tmp_path / "state")
    start = process.process_start_time(sleeper.pid)
    assert start is not None
    state.save_record(fake_record("web", sleeper.pid, start, state.vms_dir, restarts=2, started_at=1000.0))
    state.save_record(fake_record("db", 0, 0, state.vms_dir, desired="stopped"))
    factory: dict[str, Hypervisor] = {"cloud-hypervisor": FakeHypervisor()}
    host = Host(state=state, config=WorkerConfig(), hypervisors=factory.__getitem__, clock=lambda: 1010.0)
    worker = Worker(host, Settings(api_socket=tmp_path / "api.sock"))

    read = {f.name: f for f in text_string_to_metric_families(worker.metrics_text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in read.values() for s in f.samples}
    assert read["procurator_vm_up"].type == "gauge"
    assert read["procurator_vm_restarts"].type == "counter"  # the family; its samples end in _total
    assert read["procurator_reconcile_duration_seconds"].type == "histogram"
    assert samples[("procurator_vm_restarts_total", (("vm", "web"),))] == 2
    assert samples[("procurator_vm_state", (("state", "stopped"), ("vm", "db")))] == 1
    assert samples[("procurator_vm_uptime_seconds", (("vm", "web"),))] == 10.0
    assert samples[("procurator_vm_network_transmit_bytes_total", (("device", "eth0"), ("vm", "web")))] == 7
    assert samples[("procurator_vm_block_reads_total", (("device", "store"), ("vm", "web")))] == 1
    assert samples[("procurator_reconcile_duration_seconds_bucket", (("le", "+Inf"),))] == 0
    assert samples[("procurator_watchdog_kills_total", ())] == 0
    assert not any("read_latency" in name for name, _ in samples)  # only the counters the metrics know
    assert ("procurator_vm_cpu_seconds_total", (("vm", "db"),)) not in samples  # not running: no figures
    assert all(f.documentation for f in read.values())


def test_process_figures_are_read_once_per_ttl_and_shared_with_status(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    state = StateDir(tmp_path / "state")
    start = process.process_start_time(sleeper.pid)
    assert start is not None
    state.save_record(fake_record("web", sleeper.pid, start, state.vms_dir))
    factory: dict[str, Hypervisor] = {"cloud-hypervisor": FakeHypervisor()}
    now = [0.0]
    host = Host(state=state, config=WorkerConfig(), hypervisors=factory.__getitem__)
    worker = Worker(host, Settings(api_socket=tmp_path / "api.sock"), clock=lambda: now[0])

    details = worker.status_json()["details"]["web"]
    assert details["memory_bytes"] > 1 << 20
    assert details["cpu_seconds"] >= 0
    parsed = parse_exposition(worker.metrics_text())
    assert parsed.one("procurator_vm_memory_rss_bytes", vm="web") == details["memory_bytes"]
    worker.status_json()
    assert worker.processes.reads == 1  # /metrics and every poll within the ttl: one reading of /proc
    now[0] = metrics.PROCESS_TTL
    worker.status_json()
    assert worker.processes.reads == 2
    state.save_record(fake_record("web", sleeper.pid, start + 1, state.vms_dir))  # another process
    assert worker.status_json()["details"]["web"]["memory_bytes"] is None
    assert worker.processes.reads == 2  # not running: not read at all
