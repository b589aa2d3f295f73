"""The one-line live status on a terminal's stderr, refreshed ~2x/s by the session's consumer."""

from __future__ import annotations

import shutil
from typing import Any, TextIO

from ..stream.messages import AgentCounters


class StatusLine:
    def __init__(self, err: TextIO) -> None:
        self.err = err
        self._shown = False
        self._last_records = 0
        self._last_t: float | None = None
        self._rate = 0.0

    def update(
        self, pipeline: Any, counters: AgentCounters | None, records: int, now: float
    ) -> None:
        if self._last_t is not None and now > self._last_t:
            self._rate = (records - self._last_records) / (now - self._last_t)
        self._last_records, self._last_t = records, now
        snap = getattr(pipeline, "last_snapshot", None)
        status = snap.status.value if snap is not None else "INITIALIZING"
        cur_mb = snap.current_bytes_allocated / 1048576 if snap is not None else 0.0
        peak_mb = snap.peak_bytes_allocated / 1048576 if snap is not None else 0.0
        allocs = counters.allocs if counters is not None else 0
        drops = counters.dropped if counters is not None else 0
        self._show(
            f"{status}  allocs {allocs:,}  cur {cur_mb:,.1f} MiB  peak {peak_mb:,.1f} MiB  "
            f"{_si(self._rate)} ev/s  drops {drops:,}"
            + (f"  stalls {counters.stalls:,}" if counters is not None and counters.stalls else "")
        )

    def note(self, text: str) -> None:
        self._show(text)

    def _show(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.err.write("\r" + text[:width] + "\x1b[K")
        self.err.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.err.write("\n")
            self.err.flush()
            self._shown = False


def _si(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"
