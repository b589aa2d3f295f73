"""`<prefix>_rpmalloc.log`: `[YYYY-MM-DD HH:MM:SS.ffffff] [LEVEL] [TID:n] message` lines.

Times are the recording machine's local time (wall clock at time zero + event µs + the
recorded UTC offset), never the host's time zone, so a replay anywhere gives the same bytes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from .fileio import AppendFile
from .rows import LogLine

_EPOCH = datetime(1970, 1, 1)
# Lines written at once rather than waiting for the next snapshot (bounds memory).
FLUSH_LINES = 4096
URGENT_LEVELS = frozenset(("ERROR", "CRITICAL"))


class LogWriter:
    """Buffered: flush() at snapshots and at close; add() says when an immediate flush is due
    (an ERROR/CRITICAL line, or a full buffer)."""

    def __init__(self, path: Path, wall_clock_zero_us: int, utc_offset_s: int = 0,
                 own_tid: int = 0, *, max_bytes: int = 0, backups: int = 3) -> None:
        self.file = AppendFile(path, max_bytes=max_bytes, backups=backups)
        self.own_tid = own_tid  # TID of the monitor's own lines (the engine uses the target PID)
        self._zero_us = wall_clock_zero_us + utc_offset_s * 1_000_000
        self._sec = None  # cache: most lines of a burst share their second
        self._sec_text = ""

    @property
    def path(self) -> Path:
        return self.file.path

    def start(self) -> None:
        """A new session truncates the log (appends within a session). Raises OSError."""
        self.file.truncate()

    def format_time(self, ts_us: int) -> str:
        sec, us = divmod(self._zero_us + ts_us, 1_000_000)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = (_EPOCH + timedelta(seconds=sec)).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self._sec_text}.{us:06d}"

    def format(self, line: LogLine) -> str:
        msg = line.message
        if "\n" in msg or "\r" in msg:  # one entry per line, always
            msg = msg.replace("\r", "\\r").replace("\n", "\\n")
        return f"[{self.format_time(line.ts_us)}] [{line.level}] [TID:{line.tid}] {msg}\n"

    def add(self, line: LogLine) -> bool:
        """Buffer one line; True when the caller should flush now."""
        self.file.lines.append(self.format(line))
        return line.level in URGENT_LEVELS or len(self.file.lines) >= FLUSH_LINES

    def flush(self, ts_us: int | None = None) -> None:
        """Write buffered lines; raises OSError (lines kept for the next flush)."""
        if self.file.lost_lines and self.file.pending and ts_us is not None:
            # Say so in the log itself once it can be written again.
            lost, self.file.lost_lines = self.file.lost_lines, 0
            note = LogLine(ts_us, "WARN", self.own_tid, f"nvse-monitor: {lost} log lines were lost "
                           f"while {self.path.name} could not be written")
            self.file.prepend(self.format(note))
        self.file.flush()
