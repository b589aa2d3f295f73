"""Address-space headroom (docs/fnv.md): what actually crashes a 32-bit game is running out of
address space or fragmenting it, not the heap counters. A small script (agent/addrspace.js)
loaded next to the agent samples the target's memory ranges about once a second; here the
samples become a time series `<prefix>_addrspace.csv` and WARN lines when the largest free
block falls under a threshold (and a note when it recovers).

Host-side only for now: the samples are not stream messages, so they are neither in the engine's
log/JSON/health nor in recordings (see the issue 4 report for the engine/stream change).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

DEFAULT_WARN_BYTES = 256 << 20  # ia32: under this largest free block, big allocations start failing
DEFAULT_INTERVAL_MS = 1000
CSV_HEADER = ("timestamp,mapped_bytes,committed_bytes,reserved_bytes,free_bytes,"
              "largest_free_bytes,limit_bytes,regions")


def csv_path(out_dir: Path | str, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}_addrspace.csv"


def default_limit(arch: str, platform: str) -> int | None:
    """The user address space to count free blocks in: ia32 on Linux (under a 64-bit kernel)
    4 GiB; on Windows None = the script asks the system (2 GiB, 4 GiB when large-address-aware
    under WOW64); 64-bit targets: None (free space is not the limit there)."""
    if arch != "ia32":
        return None
    return None if platform == "windows" else 1 << 32


def script_source(limit: int | None, interval_ms: int = DEFAULT_INTERVAL_MS) -> str:
    js = resources.files("nvse_monitor.agent").joinpath("addrspace.js").read_text("utf-8")
    conf = json.dumps({"interval_ms": int(interval_ms), "limit": limit})
    return f"const ADDRSPACE = {conf};\n{js}"


@dataclass(frozen=True)
class Sample:
    ts_us: int  # host wall clock (µs since the epoch) when the target took the sample
    mapped: int
    committed: int
    reserved: int
    free: int | None  # below limit; None when not counted (64-bit)
    largest_free: int | None
    limit: int | None
    regions: int

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> Sample:
        def opt(k: str) -> int | None:
            v = p.get(k)
            return None if v is None else int(v)

        return cls(int(p["ts_us"]), int(p["mapped"]), int(p["committed"]), int(p["reserved"]),
                   opt("free"), opt("largest_free"), opt("limit"), int(p.get("regions", 0)))

    def csv_row(self) -> str:
        vals = (self.ts_us, self.mapped, self.committed, self.reserved, self.free,
                self.largest_free, self.limit, self.regions)
        return ",".join("" if v is None else str(v) for v in vals)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Headroom:
    """Turns samples into CSV rows and threshold crossings into lines (main thread only)."""

    def __init__(self, path: Path, warn_bytes: int = DEFAULT_WARN_BYTES,
                 flush_every_s: float = 5.0) -> None:
        self.path = path
        self.warn_bytes = warn_bytes
        self.low = False  # the largest free block is under the threshold now
        self.samples = 0
        self.min_largest_free: int | None = None
        self._flush_every_s = flush_every_s
        self._last_flush = 0.0
        self._f: TextIO | None = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._f.write(CSV_HEADER + "\n")
        self._f.flush()

    def add(self, s: Sample) -> list[str]:
        """Record a sample; the WARN/INFO lines a threshold crossing deserves."""
        self.samples += 1
        if self._f is not None:
            try:
                self._f.write(s.csv_row() + "\n")
                now = time.monotonic()
                if now - self._last_flush >= self._flush_every_s:
                    self._f.flush()
                    self._last_flush = now
            except OSError:  # a full disk ends the time series, never the session
                self.close()
        lf = s.largest_free
        if lf is None:
            return []
        if self.min_largest_free is None or lf < self.min_largest_free:
            self.min_largest_free = lf
        if not self.low and lf < self.warn_bytes:
            self.low = True
            return [f"WARN Address space low: largest free block {_mib(lf)} < "
                    f"{_mib(self.warn_bytes)} ({_mib(s.free or 0)} free in {s.regions} regions, "
                    f"{_mib(s.mapped)} mapped)"]
        if self.low and lf >= self.warn_bytes:
            self.low = False
            return [f"INFO Address space recovered: largest free block {_mib(lf)}"]
        return []

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


class Watch:
    """The sampler script in the target. Its messages go to `on_message` (Frida's thread)."""

    def __init__(self, session: Any, limit: int | None, on_sample: Any, on_error: Any,
                 interval_ms: int = DEFAULT_INTERVAL_MS) -> None:
        self._script = session.create_script(script_source(limit, interval_ms),
                                             name="nvse-monitor-addrspace")

        def on_message(message: dict[str, Any], _data: Any) -> None:
            p = message.get("payload") if message.get("type") == "send" else None
            if isinstance(p, dict) and p.get("type") == "addrspace":
                on_sample(Sample.from_payload(p))
            elif isinstance(p, dict) and p.get("type") == "addrspace-error":
                on_error(str(p.get("message", "")))
            elif message.get("type") == "error":
                on_error(str(message.get("description", message)))

        self._script.on("message", on_message)
        self._script.load()

    def unload(self) -> None:
        """Stops the sampler (unloading clears its timer); the target may be gone already."""
        with contextlib.suppress(Exception):
            self._script.unload()
