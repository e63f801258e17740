"""Prometheus metrics of the worker and its VMs, in the text exposition format (version 0.0.4).

`Family` holds the samples of one metric family and `render` writes families out: a `# HELP` and a
`# TYPE` line per family, then one line per sample, label values escaped (backslash, double quote and
line feed), values as Prometheus reads them (`+Inf`, `-Inf`, `NaN`). Names and label names are checked
when a sample is added, so a bad name is a bug caught at once, never a broken scrape.

What is measured of a VM's hypervisor process comes from /proc (`cpu_seconds`, `rss_bytes`); its device
counters come from the backend's `counters()` through `CountersCache`, which asks each VM at most once
per scrape and not again before its time-to-live passes.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

from procurator import process
from procurator.errors import ProcuratorError
from procurator.hypervisor.base import Hypervisor
from procurator.state import VmRecord

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "procurator_"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_SUFFIXES = {"": ("",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


class MetricType(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"
    SUMMARY = "summary"
    UNTYPED = "untyped"


Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric family: its name, help text, type and samples (suffix, labels, value)."""

    name: str
    help: str
    type: MetricType
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)
    _checked: set[tuple[str, ...]] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _METRIC_NAME.match(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")

    def add(self, value: float, labels: Mapping[str, str] | None = None, *, suffix: str = "") -> None:
        if suffix and suffix not in _SUFFIXES.get(self.type.value, _SUFFIXES[""]):
            raise ValueError(f"{self.name}: a {self.type.value} has no {suffix!r} samples")
        pairs = tuple((str(k), str(v)) for k, v in labels.items()) if labels else ()
        names = tuple(k for k, _ in pairs)
        if names not in self._checked:
            for key in names:
                if not _LABEL_NAME.match(key) or key.startswith("__"):
                    raise ValueError(f"{self.name}: invalid label name {key!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"{self.name}: a label name repeats in {names}")
            self._checked.add(names)
        self.samples.append((suffix, pairs, float(value)))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family]) -> str:
    """The text exposition of `families` (each name once; families without samples are left out)."""
    lines: list[str] = []
    seen: set[str] = set()
    for family in families:
        if family.name in seen:
            raise ValueError(f"metric family {family.name!r} rendered twice")
        seen.add(family.name)
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type.value}")
        for suffix, labels, value in family.samples:
            text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            name = family.name + suffix
            lines.append(
                f"{name}{{{text}}} {format_value(value)}" if labels else f"{name} {format_value(value)}"
            )
    return "\n".join(lines) + "\n" if lines else ""


# --- histograms ------------------------------------------------------------------------------------

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """A thread-safe histogram of observations (cumulative buckets, sum and count when rendered)."""

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("histogram buckets must be increasing")
        self.bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def add_to(self, family: Family, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            counts, total = list(self._counts), self._sum
        base = dict(labels or {})
        running = 0
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            running += count
            family.add(running, {**base, "le": format_value(bound)}, suffix="_bucket")
        family.add(total, base, suffix="_sum")
        family.add(running, base, suffix="_count")


# --- the hypervisor process, from /proc --------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessFigures:
    cpu_seconds: float  # user + system time of every thread
    rss_bytes: int


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_figures(pid: int, start_time: int, proc: str = "/proc") -> ProcessFigures | None:
    """CPU time and resident memory of `pid`, None unless it is the very process started at `start_time`."""
    stat = process.read_stat(pid, proc)
    if stat is None or stat.start_time != start_time:
        return None
    try:
        with open(f"{proc}/{pid}/statm", "rb") as f:
            statm = f.read().split()
    except OSError:
        return None
    if len(statm) < 2:
        return None
    return ProcessFigures(cpu_seconds=stat.cpu_ticks / _CLOCK_TICKS, rss_bytes=int(statm[1]) * _PAGE_SIZE)


# --- device counters, cached -----------------------------------------------------------------------

Counters = dict[str, dict[str, int]]


@dataclass
class _Cached:
    key: tuple[int, int]  # (pid, start_time): a new process starts from scratch
    at: float
    counters: Counters


class CountersCache:
    """Device counters per VM, each fetched with one API call and kept for `ttl` seconds.

    `get` asks only the VMs whose entry is missing or older than `ttl`, at most `parallel` at a time and
    each within the backend's own API timeout; a VM that does not answer keeps its last counters (or
    none). Concurrent callers share one refresh.
    """

    def __init__(
        self,
        hypervisors: Callable[[str], Hypervisor],
        *,
        ttl: float = 10.0,
        parallel: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hypervisors = hypervisors
        self.ttl = ttl
        self.parallel = parallel
        self.clock = clock
        self.calls = 0  # API calls made, for tests and the benchmark
        self._entries: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def get(self, records: Sequence[VmRecord]) -> dict[str, Counters]:
        with self._lock:
            now = self.clock()
            wanted = {r.name: r for r in records}
            for name in list(self._entries):
                entry = self._entries[name]
                record = wanted.get(name)
                if record is None or entry.key != (record.pid, record.start_time):
                    del self._entries[name]
            stale = [
                r
                for r in wanted.values()
                if r.name not in self._entries or now - self._entries[r.name].at >= self.ttl
            ]
            if stale:
                self._refresh(stale)
            return {name: entry.counters for name, entry in self._entries.items() if name in wanted}

    def _fetch(self, record: VmRecord) -> Counters | None:
        try:
            return self.hypervisors(record.backend).counters(record.handle)
        except ProcuratorError as exc:
            log.debug("counters of %s: %s", record.name, exc)
            return None

    def _refresh(self, records: Sequence[VmRecord]) -> None:
        self.calls += len(records)
        if len(records) == 1 or self.parallel <= 1:
            results = [self._fetch(r) for r in records]
        else:
            with ThreadPoolExecutor(max_workers=min(self.parallel, len(records))) as pool:
                results = list(pool.map(self._fetch, records))
        now = self.clock()
        for record, counters in zip(records, results, strict=True):
            key = (record.pid, record.start_time)
            if counters is not None:
                self._entries[record.name] = _Cached(key, now, counters)
            elif record.name in self._entries:
                self._entries[record.name].at = now  # keep the last figures; ask again after ttl
            else:
                self._entries[record.name] = _Cached(key, now, {})


# Device counters as the backends name them (cloud-hypervisor's vm.counters; qemu maps onto them).
NET_COUNTERS = {
    "rx_bytes": ("network_receive_bytes_total", "Bytes the guest received on the interface."),
    "tx_bytes": ("network_transmit_bytes_total", "Bytes the guest sent on the interface."),
    "rx_frames": ("network_receive_packets_total", "Frames the guest received on the interface."),
    "tx_frames": ("network_transmit_packets_total", "Frames the guest sent on the interface."),
}
BLOCK_COUNTERS = {
    "read_bytes": ("block_read_bytes_total", "Bytes the guest read from the disk."),
    "write_bytes": ("block_written_bytes_total", "Bytes the guest wrote to the disk."),
    "read_ops": ("block_reads_total", "Read requests the guest made to the disk."),
    "write_ops": ("block_writes_total", "Write requests the guest made to the disk."),
}
DEVICE_COUNTERS = {**NET_COUNTERS, **BLOCK_COUNTERS}


def device_families(counters: Mapping[str, Counters]) -> list[Family]:
    """Families of the known device counters of every VM (labels `vm` and `device`)."""
    families = {
        key: Family(PREFIX + "vm_" + name, text, MetricType.COUNTER)
        for key, (name, text) in DEVICE_COUNTERS.items()
    }
    for vm in sorted(counters):
        for device in sorted(counters[vm]):
            for key, value in sorted(counters[vm][device].items()):
                family = families.get(key)
                if family is not None:
                    family.add(value, {"vm": vm, "device": device})
    return list(families.values())
