"""OpenMetrics / Prometheus endpoint: `/metrics` built from the latest engine Snapshot.

A custom Collector in a private registry (the global default registry is never touched): each
scrape asks its source for a Snapshot (Pipeline.snapshot_now: the engine's counters between two
feeds, no walk over live blocks) and turns it into metric families. Nothing runs per event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from .. import __version__
from ..outputs.rows import Status
from ..stream.messages import SessionMeta

NS = "nvse_monitor"
DEFAULT_ADDRESS = "127.0.0.1"

SnapshotSource = Callable[[], Any]  # returns an outputs.Snapshot or None


class SnapshotCollector(Collector):
    def __init__(self, source: SnapshotSource | None = None,
                 meta: SessionMeta | None = None) -> None:
        self.source = source  # set later (attach) when the server starts before the session
        self.meta = meta

    def collect(self) -> Iterator[Metric]:
        snap = self.source() if self.source is not None else None
        if self.meta is not None:
            m = self.meta
            yield InfoMetricFamily(f"{NS}_session", "The monitored session", value={
                "target": str(m.target), "pid": str(m.pid), "profile": str(m.profile),
                "arch": str(m.arch), "platform": str(m.platform), "mode": str(m.mode),
                "version": __version__})
        if snap is None:
            return
        mon = snap.monitor or {}

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NS}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float, unit: str = "") -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NS}_{name}", doc, value=value, unit=unit)

        yield counter("allocations", "Successful allocations seen", snap.total_allocations)
        yield counter("frees", "Frees of tracked blocks", snap.total_frees)
        yield counter("allocated_bytes", "Bytes allocated", snap.total_bytes_allocated)
        yield counter("freed_bytes", "Bytes freed (tracked blocks)", snap.total_bytes_freed)
        yield counter("allocation_failures", "Allocations that returned NULL",
                      snap.allocation_failures)
        yield counter("dropped_events", "Events the agent's ring had no room for",
                      int(mon.get("dropped_events", 0)))
        # issue 13: the shared ring (absent from an older JSON: 0)
        yield counter("dropped_frees", "Free/realloc records among the dropped events (blocks "
                      "allocated before them have an uncertain fate)",
                      int(mon.get("dropped_frees") or 0))
        yield counter("stalls", "Hooked calls that waited for a free ring slot (--on-full wait)",
                      int(mon.get("stalls") or 0))
        yield counter("stall_seconds", "Total time hooked calls waited for a free ring slot",
                      int(mon.get("stall_total_us") or 0) / 1e6)
        yield gauge("stall_max_seconds", "Longest single wait for a free ring slot",
                    int(mon.get("stall_max_us") or 0) / 1e6)
        yield counter("unknown_records", "Records skipped as invalid or of an unknown kind",
                      int(mon.get("unknown_records") or 0))
        yield counter("untracked_frees", "Frees of blocks not tracked (allocated before attach, "
                      "double frees)", int(mon.get("untracked_frees", 0)))
        yield counter("untracked_allocations", "Allocations not tracked (tracking limit)",
                      int(mon.get("untracked_allocations_overflow", 0)))
        yield gauge("live_bytes", "Bytes of tracked live blocks", snap.current_bytes_allocated)
        yield gauge("live_allocations", "Tracked live blocks", snap.current_allocations)
        yield gauge("peak_live_bytes", "Peak of live_bytes", snap.peak_bytes_allocated)
        yield gauge("peak_live_allocations", "Peak of live_allocations", snap.peak_allocations)
        yield gauge("max_tracked_allocations", "Tracking limit", snap.max_tracked_allocations)
        yield gauge("uptime_seconds", "Stream time since the session started",
                    snap.uptime_seconds)
        mod = GaugeMetricFamily(f"{NS}_module_live_bytes",
                                "Live tracked bytes by module of the allocating caller",
                                labels=["module"])
        for name, v in sorted((mon.get("modules_live_bytes") or {}).items()):
            mod.add_metric([str(name)], v)
        yield mod
        heap_cur = GaugeMetricFamily(f"{NS}_heap_live_bytes", "Live tracked bytes by heap",
                                     labels=["heap"])
        heap_peak = GaugeMetricFamily(f"{NS}_heap_peak_live_bytes", "Peak live bytes by heap",
                                      labels=["heap"])
        for name, h in sorted((mon.get("heaps") or {}).items()):
            heap_cur.add_metric([str(name)], h.get("current_bytes", 0))
            heap_peak.add_metric([str(name)], h.get("peak_bytes", 0))
        yield heap_cur
        yield heap_peak
        logs = CounterMetricFamily(f"{NS}_log_lines", "Log lines written, by level",
                                   labels=["level"])
        for level, v in sorted(snap.log_counts.items()):
            logs.add_metric([level], v)
        yield logs
        yield size_histogram(mon.get("allocation_sizes") or [], snap.total_allocations,
                             snap.total_bytes_allocated)
        status = snap.status.value if isinstance(snap.status, Status) else str(snap.status)
        yield StateSetMetricFamily(f"{NS}_status", "Health state of the monitor",
                                   value={s.value: s.value == status for s in Status})
        yield gauge("healthy", "1 until an ERROR or CRITICAL line was logged",
                    1 if snap.is_healthy else 0)


def size_histogram(classes: list[dict], count: int, total: int) -> HistogramMetricFamily:
    """monitor.allocation_sizes as a Prometheus histogram: the engine's power-of-two classes
    are its buckets (le = 2**k - 1, cumulative), always up to 4 GiB so the series stay the same
    from scrape to scrape; every successful allocation is counted, _sum is their bytes."""
    per = {int(c["max_bytes"]).bit_length(): int(c["allocations"]) for c in classes}
    buckets, below = [], 0
    for k in range(max(32, *per) + 1 if per else 33):
        below += per.get(k, 0)
        buckets.append((f"{float((1 << k) - 1)}", below))
    buckets.append(("+Inf", count))
    return HistogramMetricFamily(f"{NS}_allocation_size_bytes", "Sizes of the allocations",
                                 buckets=buckets, sum_value=total)


class MetricsServer:
    """`/metrics` on address:port in a daemon thread; port 0 picks a free port (see .port)."""

    def __init__(self, source: SnapshotSource | None = None, meta: SessionMeta | None = None,
                 port: int = 0, address: str = DEFAULT_ADDRESS) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = SnapshotCollector(source, meta)
        self.registry.register(self.collector)
        self.address = address
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Raises OSError when the address/port cannot be bound."""
        self._server, self._thread = start_http_server(self.port, self.address, self.registry)
        self.port = int(self._server.server_address[1])
        return self

    def attach(self, pipeline: Any) -> None:
        """Serve this pipeline's state from now on (bound before the session starts, so a busy
        port fails early)."""
        self.collector.meta = pipeline.meta
        self.collector.source = pipeline.snapshot_now

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
