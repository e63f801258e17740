"""Prometheus metrics of the worker and its VMs, exposed with `prometheus_client`.

The worker's API builds a `Collector` (worker/views.py `WorkerCollector`) at each scrape: a
prometheus_client collector whose `collect` yields the metric families (`gauge`, `counter`, `histogram`
here: prometheus_client's `GaugeMetricFamily`, `CounterMetricFamily`, `HistogramMetricFamily`) from the
worker's state, one family at a time; `exposition` writes them in the text format (version 0.0.4) with
prometheus_client's `generate_latest`. Families without samples are left out; a family name that
repeats is a bug, caught when rendered.

What is measured of a VM's hypervisor process comes from /proc (`process_figures`, cached per VM for a
few seconds by `ProcessCache`, which the status page reads too); its device counters come from the
backend's `counters()` through `CountersCache`, which asks each VM at most once per scrape and not again
before its time-to-live passes.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from procurator import process
from procurator.errors import ProcuratorError
from procurator.hypervisor.base import Hypervisor
from procurator.state import VmRecord

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
PREFIX = "procurator_"


# The classic name rules (prometheus_client also takes UTF-8 names, which it would escape on the way out:
# a bad name here is a bug, caught when the family is made, never a renamed series).
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _name(name: str, labels: Sequence[str]) -> str:
    full = PREFIX + name
    if not _METRIC_NAME.match(full):
        raise ValueError(f"invalid metric name {full!r}")
    for label in labels:
        if not _LABEL_NAME.match(label) or label.startswith("__") or label == "le":
            raise ValueError(f"{full}: invalid label name {label!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{full}: a label name repeats in {tuple(labels)}")
    return full


def gauge(name: str, help_text: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    """`PREFIX + name`, a gauge; its samples are added with `add_metric(label values, value)`."""
    return GaugeMetricFamily(_name(name, labels), help_text, labels=labels)


def counter(name: str, help_text: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    """A counter family; `name` ends in `_total`, as its samples are named."""
    if not name.endswith("_total"):
        raise ValueError(f"invalid counter name {name!r}: a counter's name ends in _total")
    return CounterMetricFamily(_name(name, labels), help_text, labels=labels)


def histogram(name: str, help_text: str, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    """A histogram family; `Histogram.add_to` adds its buckets, sum and count."""
    return HistogramMetricFamily(_name(name, labels), help_text, labels=labels)


def exposition(collector: Collector) -> bytes:
    """The text exposition of what `collector` yields (families without samples left out)."""
    return generate_latest(_Checked(collector))


class _Checked(Collector):
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for family in self.collector.collect():
            if family.name in seen:
                raise ValueError(f"metric family {family.name!r} rendered twice")
            seen.add(family.name)
            if family.samples:
                yield family


def format_value(value: float) -> str:
    """A histogram bound as the `le` label shows it: `0.05`, `1`, `+Inf`."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# --- histograms ------------------------------------------------------------------------------------

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """A thread-safe histogram of observations (cumulative buckets, sum and count when collected).

    The daemon's own, not prometheus_client's `Histogram`: that one registers itself and adds a
    `_created` series; this one only counts, and `family` makes the family a collector yields."""

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("histogram buckets must be increasing")
        self.bounds = tuple(float(b) for b in buckets)
        self._les = (*(format_value(b) for b in self.bounds), "+Inf")
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

    def add_to(self, family: HistogramMetricFamily, labels: Sequence[str] = ()) -> None:
        with self._lock:
            counts, total = list(self._counts), self._sum
        running, buckets = 0, []
        for le, count in zip(self._les, counts, strict=True):
            running += count
            buckets.append((le, float(running)))
        family.add_metric(list(labels), buckets, total)


# --- the hypervisor process, from /proc --------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROCESS_TTL = 5.0  # seconds /proc figures of a VM are reused (the status page polls every 2 s)


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    cpu_seconds: float  # user + system time of every thread
    rss_bytes: int


def process_figures(pid: int, start_time: int, proc: str = "/proc") -> ProcessFigures | None:
    """CPU time and resident memory of `pid`, None unless it is the very process started at `start_time`."""
    stat = process.read_stat(pid, proc)
    if stat is None or stat.start_time != start_time:
        return None
    try:
        with open(f"{proc}/{pid}/statm", "rb") as f:
            statm = f.read(256).split()
    except OSError:
        return None
    if len(statm) < 2:
        return None
    return ProcessFigures(cpu_seconds=stat.cpu_ticks / _CLOCK_TICKS, rss_bytes=int(statm[1]) * _PAGE_SIZE)


class ProcessCache:
    """`process_figures` of each running VM, read again only when older than `ttl` seconds or of another
    process (pid and start time): /metrics and the status page's GET /status share one reading."""

    def __init__(
        self, *, ttl: float = PROCESS_TTL, clock: Callable[[], float] = time.monotonic, proc: str = "/proc"
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.proc = proc
        self.reads = 0  # /proc readings made, for tests
        self._entries: dict[str, tuple[int, int, float, ProcessFigures | None]] = {}
        self._lock = threading.Lock()

    def get(self, records: Sequence[VmRecord]) -> dict[str, ProcessFigures]:
        """The figures of `records` (running ones: a process that is gone has none)."""
        out: dict[str, ProcessFigures] = {}
        with self._lock:
            now = self.clock()
            wanted = {r.name for r in records}
            for name in [n for n in self._entries if n not in wanted]:
                del self._entries[name]
            for r in records:
                entry = self._entries.get(r.name)
                if entry is None or entry[:2] != (r.pid, r.start_time) or now - entry[2] >= self.ttl:
                    self.reads += 1
                    entry = (r.pid, r.start_time, now, process_figures(r.pid, r.start_time, self.proc))
                    self._entries[r.name] = entry
                if entry[3] is not None:
                    out[r.name] = entry[3]
        return out


# --- device counters, cached -----------------------------------------------------------------------

Counters = dict[str, dict[str, int]]

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
COUNTERS_PARALLEL = 4  # vm.counters calls at once: more only contend for the interpreter's lock


def _kept(counters: Counters) -> Counters:
    """Only the counters the metrics show, under shared key strings (a thousand VMs' answers would
    otherwise keep a thousand copies of every key the JSON decoder made)."""
    out: Counters = {}
    for device, values in counters.items():
        known = {key: values[key] for key in DEVICE_COUNTERS if key in values}
        if known:
            out[sys.intern(device)] = known
    return out


@dataclass(slots=True)
class _Cached:
    pid: int  # with start_time: a new process starts from scratch
    start_time: int
    at: float
    counters: Counters


class CountersCache:
    """Device counters per VM, each fetched with one API call and kept for `ttl` seconds.

    `get` asks only the VMs whose entry is missing or older than `ttl`, at most `parallel` at a time and
    each within the backend's own API timeout; a VM that does not answer keeps its last counters (or
    none). Concurrent callers share one refresh. Only the counters in DEVICE_COUNTERS are kept.
    """

    def __init__(
        self,
        hypervisors: Callable[[str], Hypervisor],
        *,
        ttl: float = 10.0,
        parallel: int = COUNTERS_PARALLEL,
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
                if record is None or (entry.pid, entry.start_time) != (record.pid, record.start_time):
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
            return _kept(self.hypervisors(record.backend).counters(record.handle))
        except ProcuratorError as exc:
            log.debug("counters of %s: %s", record.name, exc)
            return None

    def _refresh(self, records: Sequence[VmRecord]) -> None:
        self.calls += len(records)
        if len(records) == 1 or self.parallel <= 1:
            results = [self._fetch(r) for r in records]
        else:
            workers = min(self.parallel, len(records))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="counters") as pool:
                results = list(pool.map(self._fetch, records))
        now = self.clock()
        for record, counters in zip(records, results, strict=True):
            entry = self._entries.get(record.name)
            if counters is not None:
                self._entries[record.name] = _Cached(record.pid, record.start_time, now, counters)
            elif entry is not None:
                entry.at = now  # keep the last figures; ask again after ttl
            else:
                self._entries[record.name] = _Cached(record.pid, record.start_time, now, {})


def device_families(counters: Mapping[str, Counters]) -> Iterator[CounterMetricFamily]:
    """Families of the known device counters of every VM (labels `vm` and `device`), one at a time."""
    vms = sorted(counters)
    for key, (name, text) in DEVICE_COUNTERS.items():
        family = counter("vm_" + name, text, ("vm", "device"))
        for vm in vms:
            per_vm = counters[vm]
            for device in sorted(per_vm):
                value = per_vm[device].get(key)
                if value is not None:
                    family.add_metric((vm, device), value)
        yield family
