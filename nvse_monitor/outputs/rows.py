"""What the engine emits and the writers consume. Times are agent µs since time zero; writers
turn them into wall-clock with SessionMeta.wall_clock_zero_us (+ utc_offset_s for the log)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    UNINITIALIZED = "UNINITIALIZED"
    INITIALIZING = "INITIALIZING"
    ACTIVE = "ACTIVE"
    DEGRADED = "DEGRADED"
    ERROR = "ERROR"
    SHUTDOWN = "SHUTDOWN"


LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL", "PERF")


@dataclass(frozen=True)
class LogLine:
    ts_us: int
    level: str  # one of LOG_LEVELS
    tid: int
    message: str


@dataclass(frozen=True)
class CsvRow:
    ts_us: int
    allocs_per_sec: float
    frees_per_sec: float
    memory_usage: int  # current bytes
    peak_memory: int  # peak bytes


@dataclass(frozen=True)
class AddressSpaceRow:
    """A row of `<prefix>_addrspace.csv`: one address-space sample (stream.AddressSpace)."""

    ts_us: int
    mapped: int
    committed: int
    reserved: int
    free: int | None
    largest_free: int | None
    limit: int | None
    regions: int


@dataclass(frozen=True)
class Snapshot:
    """Everything the JSON and status files show at one moment (spec keys, see writers)."""

    ts_us: int
    status: Status
    is_healthy: bool
    uptime_seconds: float
    # memory_stats
    total_allocations: int
    total_frees: int
    current_allocations: int
    peak_allocations: int
    total_bytes_allocated: int
    total_bytes_freed: int
    current_bytes_allocated: int
    peak_bytes_allocated: int
    allocation_failures: int
    average_allocation_size: float
    # performance
    allocations_per_second: float
    frees_per_second: float
    # health
    error_count: int
    warning_count: int
    critical_count: int
    last_error: str
    tracked_allocations: int
    max_tracked_allocations: int
    # logging: counts per level, keys of LOG_LEVELS
    log_counts: dict[str, int]
    final: bool = False
    # the added "monitor" section: target, pid, profile, dropped events, untracked frees,
    # agent counters, per-heap and per-module figures...
    monitor: dict[str, Any] = field(default_factory=dict)


Output = LogLine | CsvRow | AddressSpaceRow | Snapshot
