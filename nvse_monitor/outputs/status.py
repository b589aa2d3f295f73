"""`<prefix>_status.txt`: the spec's layout line for line.

The title is "<prefix> RPmalloc Status", so the default prefix gives the spec's exact title; the
underline matches the title's length as in the spec.
"""

from __future__ import annotations

from pathlib import Path

from .fileio import atomic_write_text
from .json import MIB
from .rows import Snapshot


def render(snap: Snapshot, wall_clock_zero_us: int, prefix: str) -> str:
    title = f"{prefix} RPmalloc Status"
    lines = [
        title,
        "=" * len(title),
        f"Status: {snap.status.value}",
        f"Health: {'HEALTHY' if snap.is_healthy else 'UNHEALTHY'}",
        f"Uptime: {snap.uptime_seconds:.1f} seconds",
        f"Memory Usage: {snap.current_bytes_allocated / MIB:.2f} MB",
        f"Peak Memory: {snap.peak_bytes_allocated / MIB:.2f} MB",
        f"Allocations: {int(snap.total_allocations)}",
        f"Errors: {int(snap.error_count) + int(snap.critical_count)}",  # ERROR + CRITICAL lines
        f"Last Update: {wall_clock_zero_us + int(snap.ts_us)}",
    ]
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, str]:
    """`Key: value` lines of a status file (for `nvse-monitor status`)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


class StatusWriter:
    def __init__(self, path: Path, wall_clock_zero_us: int, prefix: str) -> None:
        self.path = path
        self.wall_clock_zero_us = wall_clock_zero_us
        self.prefix = prefix

    def write(self, snap: Snapshot) -> None:
        """Replace the file atomically. Raises OSError."""
        atomic_write_text(self.path, render(snap, self.wall_clock_zero_us, self.prefix))
