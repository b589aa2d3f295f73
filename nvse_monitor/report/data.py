"""What the HTML report shows, gathered from a recording (a pure engine pass: no files written)
or from an output directory (the JSON, CSV, log and leaks files). Times are seconds since the
session's time zero."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import leaks as leaks_mod
from ..engine import LARGEST
from ..outputs import CsvRow, LogLine, Snapshot
from ..stream import Batch
from ..writers import FilePaths

RUN_RECORDS = 1 << 12  # engine pass granularity: one module-series sample per run
MAX_POINTS = 4000  # per plotted series (downsampled beyond, keeping the peak)
MAX_MESSAGES = 300

STATUS_RE = re.compile(r"Status: (\w+) -> (\w+) \((.*)\)$")
PERF_RE = re.compile(r"Large allocation: (\d+) bytes took (\d+) microseconds \((.*), (.*)\)$")
LOG_RE = re.compile(r"^\[([\d\- :.]+)\] \[(\w+)\] \[TID:(\d+)\] (.*)$")


class ReportError(Exception):
    """SOURCE cannot be read (one line)."""


@dataclass
class Largest:
    t: float
    size: int
    dur_us: int
    tid: int
    heap: str
    where: str


@dataclass
class SizeClass:
    label: str
    min_bytes: int
    max_bytes: int
    allocations: int


@dataclass
class ReportData:
    source: str
    kind: str  # "recording" or "directory"
    doc: dict[str, Any]  # the final stats JSON document
    t: list[float] = field(default_factory=list)  # CSV points
    current: list[int] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    alloc_rate: list[float] = field(default_factory=list)
    free_rate: list[float] = field(default_factory=list)
    peak_t: float | None = None
    status: list[tuple[float, str, str, str]] = field(default_factory=list)  # t, from, to, why
    end_t: float = 0.0
    module_t: list[float] = field(default_factory=list)
    module_series: dict[str, list[int]] = field(default_factory=dict)
    # live bytes per module at the sample of the module series nearest the peak
    module_peak: dict[str, int] | None = None
    module_peak_t: float | None = None
    leaks: leaks_mod.LeakReport | None = None
    hist: list[SizeClass] | None = None  # allocation size classes, smallest first
    largest: list[Largest] = field(default_factory=list)
    messages: list[tuple[float, str, str]] = field(default_factory=list)  # t, level, text
    messages_omitted: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _downsample(n: int, keep: int | None) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    idx = np.unique(np.linspace(0, n - 1, MAX_POINTS).astype(np.int64))
    if keep is not None:
        idx = np.unique(np.append(idx, keep))
    return idx


def _size_hist(doc: dict[str, Any]) -> list[SizeClass] | None:
    """The JSON's monitor.allocation_sizes (bit-length classes) with the empty classes between
    filled in; None when the JSON has no such section (written by an older nvse-monitor)."""
    classes = (doc.get("monitor") or {}).get("allocation_sizes")
    if not isinstance(classes, list):
        return None
    have = {int(c["min_bytes"]): c for c in classes}
    if not have:
        return []
    bits = [lo.bit_length() for lo in have]  # class k holds 2**(k-1) .. 2**k - 1 (0: size 0)
    out = []
    for k in range(min(bits), max(bits) + 1):
        lo = 1 << (k - 1) if k else 0
        c = have.get(lo, {})
        label = "0" if k == 0 else f"[{_human(lo)}, {_human(2 * lo)})"
        out.append(SizeClass(label, lo, max(2 * lo - 1, 0), int(c.get("allocations", 0))))
    return out


def _human(n: int) -> str:
    for unit, s in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= s and n % s == 0:
            return f"{n // s}{unit}"
    return str(n)


def _largest(doc: dict[str, Any]) -> list[Largest] | None:
    """The JSON's monitor.largest_allocations (None: an older JSON without them)."""
    got = (doc.get("monitor") or {}).get("largest_allocations")
    if not isinstance(got, list):
        return None
    return [Largest(int(x["time_us"]) / 1e6, int(x["bytes"]), int(x["duration_us"]),
                    int(x["thread"]), str(x["heap"]), str(x["caller"])) for x in got]


def from_recording(path: Path, prefix: str = "MemoryPoolNVSE") -> ReportData:
    """Replay `path` through the engine, keeping time series instead of writing files. The
    leak report's WARN lines are logged as a replay logs them (same JSON, same warnings)."""
    from ..engine import Engine
    from ..recording import RecordingError, open_recording
    from ..writers.json import render

    rec = open_recording(path)  # RecordingError when not even the header is readable
    try:
        meta = rec.meta
        eng = Engine(meta)
        rows: list[CsvRow] = []
        lines: list[LogLine] = []
        mod_t: list[float] = []
        mod_rows: list[dict[str, int]] = []

        def take(outs: list) -> None:
            for o in outs:
                if isinstance(o, CsvRow):
                    rows.append(o)
                elif isinstance(o, LogLine):
                    lines.append(o)

        def sample() -> None:
            snap: Snapshot = eng.snapshot()
            mod_t.append(snap.ts_us / 1e6)
            mod_rows.append(dict(snap.monitor.get("modules_live_bytes", {})))

        take(eng.start())
        error = None
        pending: list = []
        n = 0
        try:
            for msg in rec:
                pending.append(msg)
                if isinstance(msg, Batch):
                    n += len(msg.records)
                if n >= RUN_RECORDS or not isinstance(msg, Batch):
                    take(eng.feed_many(pending))
                    pending, n = [], 0
                    sample()
        except RecordingError as e:
            error = str(e)
            if pending:
                take(eng.feed_many(pending))
                pending = []
            where = f" at byte {e.offset}" if e.offset is not None else ""
            take(eng.note_input_error(f"{Path(e.path).name}: {e.problem}{where}"))
        if pending:
            take(eng.feed_many(pending))
        report_leaks = leaks_mod.from_engine(eng)
        report_leaks.log_to(eng, leaks_mod.leaks_path(".", prefix).name)
        outs = eng.finish()
        take(outs)
        final = next(o for o in reversed(outs) if isinstance(o, Snapshot))
        sample()
    finally:
        close = getattr(rec, "close", None)
        if close is not None:
            close()

    doc = json.loads(render(final, meta.wall_clock_zero_us))
    data = ReportData(str(path), "recording", doc, error=error)
    _series(data, [(r.ts_us / 1e6, r.memory_usage, r.peak_memory, r.allocs_per_sec,
                    r.frees_per_sec) for r in rows])
    data.end_t = final.ts_us / 1e6
    for ln in lines:
        _line(data, ln.ts_us / 1e6, ln.level, ln.message)
    names = sorted({m for row in mod_rows for m in row},
                   key=lambda m: -max(row.get(m, 0) for row in mod_rows))
    idx = _downsample(len(mod_t), None)
    data.module_t = [mod_t[i] for i in idx]
    data.module_series = {m: [mod_rows[i].get(m, 0) for i in idx] for m in names}
    if mod_rows and data.peak_t is not None:
        at = min(range(len(mod_t)), key=lambda i: abs(mod_t[i] - data.peak_t))
        data.module_peak, data.module_peak_t = mod_rows[at], mod_t[at]
    data.leaks = report_leaks
    data.hist = _size_hist(doc)
    data.largest = _largest(doc) or []
    return data


def _series(data: ReportData, rows: list[tuple[float, int, int, float, float]]) -> None:
    if not rows:
        return
    cur = np.array([r[1] for r in rows], np.int64)
    keep = int(np.argmax(cur))
    for i in _downsample(len(rows), keep).tolist():
        t, c, p, a, f = rows[i]
        data.t.append(t)
        data.current.append(int(c))
        data.peak.append(int(p))
        data.alloc_rate.append(float(a))
        data.free_rate.append(float(f))
    # The peak happened in the interval ending at the first row whose running peak reaches it.
    final_peak = max(r[2] for r in rows)
    data.peak_t = next(r[0] for r in rows if r[2] == final_peak)


def _line(data: ReportData, t: float, level: str, msg: str, tid: int = 0,
          perf: bool = False) -> None:
    m = STATUS_RE.search(msg) if level == "INFO" else None
    if m:
        data.status.append((t, m.group(1), m.group(2), m.group(3)))
    elif level == "PERF" and perf:
        p = PERF_RE.search(msg)
        if p:
            data.largest.append(Largest(t, int(p.group(1)), int(p.group(2)), tid, p.group(3),
                                        p.group(4)))
    elif level in ("WARN", "ERROR", "CRITICAL"):
        if len(data.messages) < MAX_MESSAGES:
            data.messages.append((t, level, msg))
        else:
            data.messages_omitted += 1


def from_directory(directory: Path, prefix: str) -> ReportData:
    """An output directory's files (the session may still be running)."""
    paths = FilePaths.of(directory, prefix)
    try:
        doc = json.loads(paths.json.read_text(encoding="utf-8"))
        uptime = float(doc["plugin"]["uptime_seconds"])
        zero = int(doc["timestamp"]) - round(uptime * 1e6)  # epoch µs of time zero (±0.05 s)
    except FileNotFoundError:
        raise ReportError(f"{directory}: no {paths.json.name} (not an nvse-monitor output "
                          "directory, or another --prefix)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{paths.json}: not a stats file ({e})") from None
    data = ReportData(str(directory), "directory", doc, end_t=uptime)
    rows = []
    try:
        with open(paths.csv, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                rows.append(((int(r["timestamp"]) - zero) / 1e6, int(r["memory_usage"]),
                             int(r["peak_memory"]), float(r["allocs_per_sec"]),
                             float(r["frees_per_sec"])))
    except FileNotFoundError:
        data.notes.append(f"no {paths.csv.name}: no time series")
    except (OSError, ValueError, KeyError, TypeError) as e:
        data.notes.append(f"{paths.csv.name}: unreadable from some row on ({e})")
    _series(data, rows)
    largest = _largest(doc)
    try:
        with open(paths.log, encoding="utf-8", errors="replace") as f:
            t0 = None
            for raw in f:
                m = LOG_RE.match(raw.rstrip("\n"))
                if not m:
                    continue
                try:
                    when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
                except ValueError:
                    continue
                t0 = t0 or when  # the banner's first line is at time zero
                _line(data, (when - t0).total_seconds(), m.group(2), m.group(4), int(m.group(3)),
                      perf=largest is None)
    except FileNotFoundError:
        data.notes.append(f"no {paths.log.name}: no health changes or warnings")
    if largest is not None:
        data.largest = largest
    else:  # an older JSON: the PERF lines (allocations over 1 MiB) are what there is
        data.largest.sort(key=lambda x: -x.size)
        data.largest = data.largest[:LARGEST]
        data.notes.append("largest allocations: from the log's PERF lines (over 1 MiB) only")
    try:
        data.leaks = leaks_mod.read_csv(leaks_mod.leaks_path(directory, prefix))
        mon = doc.get("monitor") or {}
        until = mon.get("uncertain_fate_until_us")
        if data.leaks.uncertain_allocations and isinstance(until, int):
            data.leaks.uncertain_until_us = until  # the CSV does not say when, nor why
            why = []
            if mon.get("dropped_frees"):
                why.append(f"{mon['dropped_frees']} free/realloc records were dropped")
            elif mon.get("dropped_events"):
                why.append(f"{mon['dropped_events']} events were dropped")
            bad = (mon.get("agent_counters") or {}).get("unknown_records")
            if bad:
                why.append(f"{bad} invalid ring records were skipped")
            data.leaks.uncertain_reason = "; ".join(why)
    except FileNotFoundError:
        data.notes.append("no leaks CSV yet (written when the session ends)")
    except (OSError, ValueError, KeyError) as e:
        data.notes.append(f"leaks CSV unreadable ({e})")
    data.hist = _size_hist(doc)
    if data.hist is None:
        data.notes.append(f"{paths.json.name} has no monitor.allocation_sizes (written by an "
                          "older nvse-monitor): no size histogram")
    return data
