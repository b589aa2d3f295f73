"""`<prefix>_stats.json`: the spec's schema, key for key, then an added "monitor" section.

Floats of the spec's sections have fixed decimals, as the spec shows them: seconds, sizes and
rates 1 decimal ("125.4", "22.7"), megabytes 2 ("3.00"). Fixed text rather than repr() keeps the
bytes stable and the numbers readable; they still parse as JSON floats.
"""

from __future__ import annotations

import json
import math
import numbers
from enum import Enum
from pathlib import Path
from typing import Any

from .. import BUILD_DATE, NAME, __version__
from .fileio import atomic_write_text
from .rows import Snapshot

MIB = 1 << 20


class Fixed:
    """A float written with a fixed number of decimals."""

    __slots__ = ("value", "places")

    def __init__(self, value: float, places: int) -> None:
        self.value = float(value)
        self.places = places


def spec_document(snap: Snapshot, wall_clock_zero_us: int) -> dict[str, Any]:
    """The JSON document as an ordered dict (Fixed for the spec's floats)."""
    c = snap.log_counts
    return {
        "plugin": {
            "name": NAME,
            "version": __version__,
            "build_date": BUILD_DATE,
            "status": snap.status.value.lower(),
            "uptime_seconds": Fixed(snap.uptime_seconds, 1),
            "is_healthy": bool(snap.is_healthy),
        },
        "memory_stats": {
            "total_allocations": int(snap.total_allocations),
            "total_frees": int(snap.total_frees),
            "current_allocations": int(snap.current_allocations),
            "peak_allocations": int(snap.peak_allocations),
            "total_bytes_allocated": int(snap.total_bytes_allocated),
            "total_bytes_freed": int(snap.total_bytes_freed),
            "current_bytes_allocated": int(snap.current_bytes_allocated),
            "peak_bytes_allocated": int(snap.peak_bytes_allocated),
            "allocation_failures": int(snap.allocation_failures),
            "average_allocation_size": Fixed(snap.average_allocation_size, 1),
        },
        "performance": {
            "allocations_per_second": Fixed(snap.allocations_per_second, 1),
            "frees_per_second": Fixed(snap.frees_per_second, 1),
            "memory_usage_mb": Fixed(snap.current_bytes_allocated / MIB, 2),
            "peak_memory_usage_mb": Fixed(snap.peak_bytes_allocated / MIB, 2),
        },
        "health": {
            "error_count": int(snap.error_count),
            "warning_count": int(snap.warning_count),
            "critical_count": int(snap.critical_count),
            "last_error": str(snap.last_error),
            "tracked_allocations": int(snap.tracked_allocations),
            "max_tracked_allocations": int(snap.max_tracked_allocations),
        },
        "logging": {
            "debug_logs": int(c.get("DEBUG", 0)),
            "info_logs": int(c.get("INFO", 0)),
            "warning_logs": int(c.get("WARN", 0)),
            "error_logs": int(c.get("ERROR", 0)),
            "critical_logs": int(c.get("CRITICAL", 0)),
            "performance_logs": int(c.get("PERF", 0)),
        },
        "timestamp": wall_clock_zero_us + int(snap.ts_us),
        "monitor": snap.monitor,
    }


def encode(value: Any, indent: str = "") -> str:
    """JSON text, 2-space indented like json.dumps(indent=2), with Fixed floats."""
    if isinstance(value, Fixed):
        if not math.isfinite(value.value):
            return "null"
        text = f"{value.value:.{value.places}f}"
        return "0." + "0" * value.places if text.startswith("-") and float(text) == 0 else text
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = indent + "  "
        items = (f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {encode(v, inner)}"
                 for k, v in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + encode(v, inner) for v in value) + "\n" + indent + "]"
    if value is None or isinstance(value, bool | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Enum):
        return encode(value.value, indent)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        return repr(f) if math.isfinite(f) else "null"
    return json.dumps(str(value), ensure_ascii=False)  # anything else: its text, never a crash


def render(snap: Snapshot, wall_clock_zero_us: int) -> str:
    return encode(spec_document(snap, wall_clock_zero_us)) + "\n"


class JsonWriter:
    def __init__(self, path: Path, wall_clock_zero_us: int) -> None:
        self.path = path
        self.wall_clock_zero_us = wall_clock_zero_us

    def write(self, snap: Snapshot) -> None:
        """Replace the file atomically. Raises OSError."""
        atomic_write_text(self.path, render(snap, self.wall_clock_zero_us))
