"""`<prefix>_performance.csv`: `timestamp,allocs_per_sec,frees_per_sec,memory_usage,peak_memory`.

Timestamps are Unix epoch µs, rates have 1 decimal, memory figures are bytes (as the spec's
example). Rows are buffered and appended at each snapshot and at close.
"""

from __future__ import annotations

from pathlib import Path

from .fileio import AppendFile
from .rows import CsvRow

HEADER = "timestamp,allocs_per_sec,frees_per_sec,memory_usage,peak_memory\n"
FLUSH_ROWS = 4096


class CsvWriter:
    def __init__(self, path: Path, wall_clock_zero_us: int, *, max_bytes: int = 0,
                 backups: int = 3) -> None:
        # A rotated-in file starts with the header too, so every file loads on its own.
        self.file = AppendFile(path, max_bytes=max_bytes, backups=backups, header=HEADER)
        self.wall_clock_zero_us = wall_clock_zero_us

    @property
    def path(self) -> Path:
        return self.file.path

    def start(self) -> None:
        """A new session starts the file afresh with its header. Raises OSError."""
        self.file.truncate(HEADER)

    def format(self, row: CsvRow) -> str:
        return (f"{self.wall_clock_zero_us + int(row.ts_us)},{row.allocs_per_sec:.1f},"
                f"{row.frees_per_sec:.1f},{int(row.memory_usage)},{int(row.peak_memory)}\n")

    def add(self, row: CsvRow) -> bool:
        """Buffer one row; True when the caller should flush now (full buffer)."""
        self.file.lines.append(self.format(row))
        return len(self.file.lines) >= FLUSH_ROWS

    def flush(self) -> None:
        """Append buffered rows; raises OSError (rows kept for the next flush)."""
        self.file.flush()
