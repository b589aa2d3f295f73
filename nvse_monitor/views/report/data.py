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

from ...engine import leaks as leaks_mod
from ...engine.engine import LARGEST
from ...engine.sitename import site_label
from ...outputs.files import FilePaths
from ...outputs.rows import LogLine, Snapshot
from ...stream.messages import Batch
from . import flame as flame_mod

RUN_RECORDS = 1 << 12  # engine pass granularity: a sample of the series at least this often
# ... and at least every 1/SAMPLES_PER_SPAN of the time so far (never finer than MIN_SAMPLE_US):
# a short session of a few large blocks gets a curve, not one point per 1,000 allocations
SAMPLES_PER_SPAN = 1000
MIN_SAMPLE_US = 200
MAX_PARTS = 2000  # a drained batch is cut into at most this many samples
RATE_BUCKETS = 200  # the rate chart: about this many time buckets over the session
MAX_POINTS = 4000  # per plotted series (downsampled beyond, keeping the peak)
MAX_MESSAGES = 300
LEAK_ROWS = 50  # leak call sites in the report's table

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
    # memory series: a recording's engine samples (the module series' times too), or the CSV's
    # rows (a directory)
    t: list[float] = field(default_factory=list)
    current: list[int] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    # rates per time bucket of `bucket_s` seconds starting at `rate_t` (resampled from the
    # cumulative counts: a recording's samples, or the CSV's rows integrated)
    rate_t: list[float] = field(default_factory=list)
    bucket_s: float = 0.0
    alloc_rate: list[float] = field(default_factory=list)
    free_rate: list[float] = field(default_factory=list)
    avg_alloc_rate: float = 0.0  # over the whole session (total / uptime)
    avg_free_rate: float = 0.0
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
    flame: flame_mod.FlameData | None = None  # sampled stacks (a recording that sampled them)


def bucket_width(span_s: float, buckets: int = RATE_BUCKETS) -> float:
    """A round bucket width (1, 2 or 5 x 10^k s, at least 1 µs) giving about `buckets`
    buckets over `span_s`."""
    raw = max(span_s / buckets, 1e-6)
    k = np.floor(np.log10(raw))
    for m in (1, 2, 5, 10):
        w = m * 10.0 ** k
        if w >= raw * (1 - 1e-9):
            return float(w)
    return float(10.0 ** (k + 1))  # pragma: no cover - 10 above always qualifies


def resample_rates(data: ReportData, t: np.ndarray, allocs: np.ndarray, frees: np.ndarray,
                   end_t: float) -> None:
    """Per-bucket rates from cumulative counts at times `t` (seconds, rising): each bucket's
    count is the difference of the counts at its edges (linear between samples), over its
    width; the last bucket ends with the session."""
    end_t = max(end_t, float(t[-1]) if len(t) else 0.0)
    if end_t <= 0:
        return
    w = bucket_width(end_t)
    edges = np.arange(0.0, end_t, w)
    edges = np.append(edges, end_t)
    tt = np.concatenate([[0.0], t])
    a = np.interp(edges, tt, np.concatenate([[0], allocs]).astype(np.float64))
    f = np.interp(edges, tt, np.concatenate([[0], frees]).astype(np.float64))
    width = np.diff(edges)
    data.bucket_s = w
    data.rate_t = edges[:-1].tolist()
    data.alloc_rate = (np.diff(a) / width).tolist()
    data.free_rate = (np.diff(f) / width).tolist()
    data.avg_alloc_rate = float(allocs[-1]) / end_t if len(allocs) else 0.0
    data.avg_free_rate = float(frees[-1]) / end_t if len(frees) else 0.0


def _parts(b: Batch, since_us: int, quantum_us: int) -> list[Batch]:
    """`b` cut where its records' time crosses since_us + k * quantum_us (a live batch can hold
    a whole short session): each part but the last without agent counters (the engine takes
    drops at the batch's end, as before), ending at its last record's time."""
    ts = np.maximum.accumulate(b.records["ts_us"].astype(np.int64)) if len(b.records) else None
    if ts is None or int(ts[-1]) - since_us < quantum_us:
        return [b]
    # at most MAX_PARTS parts: a long batch gets a coarser quantum
    quantum_us = max(quantum_us, -(-(int(ts[-1]) - since_us) // MAX_PARTS))
    slot = (ts - since_us) // quantum_us
    cuts = (np.flatnonzero(np.diff(slot)) + 1).tolist()
    parts, lo = [], 0
    for hi in cuts:
        parts.append(Batch(int(ts[hi - 1]), None, b.records[lo:hi]))  # type: ignore[arg-type]
        lo = hi
    parts.append(Batch(b.now_us, b.counters, b.records[lo:]))
    return parts


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
                    int(x["thread"]), str(x["heap"]), caller_label(x)) for x in got]


def caller_label(x: dict[str, Any]) -> str:
    """A largest-allocations entry's call site: module!function+0xoff where the JSON names the
    function (issue 11), else its `caller` (module+0xoff)."""
    caller, func = str(x["caller"]), x.get("function")
    if not func:
        return caller
    module = caller.rsplit("+0x", 1)[0] if "+0x" in caller else ""
    return site_label(module, None, str(func))


def from_recording(path: Path, prefix: str = "MemoryPoolNVSE") -> ReportData:
    """Replay `path` through the engine, keeping time series instead of writing files. The
    leak report's WARN lines are logged as a replay logs them (same JSON, same warnings)."""
    from ...engine.engine import Engine
    from ...outputs.json import render
    from ...stream.recording import RecordingError, open_recording

    rec = open_recording(path)  # RecordingError when not even the header is readable
    try:
        meta = rec.meta
        eng = Engine(meta)
        lines: list[LogLine] = []
        # samples: seconds, current bytes, peak bytes, total allocations, total frees
        samples: list[tuple[float, int, int, int, int]] = []
        mod_rows: list[dict[str, int]] = []

        def take(outs: list) -> None:
            lines.extend(o for o in outs if isinstance(o, LogLine))

        def sample(at_us: int | None = None, first_us: int | None = None) -> None:
            """The state now, at the time of the last record fed (`at_us`) and, when the stream
            went on without records (a drain of a quiet target), at the engine's time too.
            `first_us`: the run's first record; the state before it held until then (a quiet
            spell is drawn flat, not as a slope to the next change)."""
            if first_us is not None and samples and first_us - 1 > samples[-1][0] * 1e6:
                samples.append(((first_us - 1) / 1e6, *samples[-1][1:]))
                mod_rows.append(mod_rows[-1])
            c = eng.state.c
            row: dict[str, int] = {}
            for i, v in enumerate(eng.state.mod_cur.tolist()):
                if v:
                    name = eng.modmap.name(i)
                    row[name] = row.get(name, 0) + v
            times = [eng.now] if at_us is None or at_us >= eng.now else [at_us, eng.now]
            for t in times:
                if samples and t <= samples[-1][0] * 1e6:
                    samples[-1] = (samples[-1][0], c.current_bytes, c.peak_bytes,
                                   c.total_allocations, c.total_frees)
                    mod_rows[-1] = row
                    continue
                samples.append((t / 1e6, c.current_bytes, c.peak_bytes, c.total_allocations,
                                c.total_frees))
                mod_rows.append(row)

        take(eng.start())
        sample()  # time zero: nothing yet
        error = None
        pending: list = []
        n = 0
        since = 0  # µs of the last sample
        last_rec = None  # µs of the last record fed
        first_rec = None  # µs of the first record of the run pending

        def flush() -> None:
            nonlocal pending, n, since, first_rec
            take(eng.feed_many(pending))
            pending, n = [], 0
            sample(last_rec, first_rec)
            since, first_rec = eng.now, None

        try:
            for msg in rec:
                if not isinstance(msg, Batch):
                    pending.append(msg)
                    flush()
                    continue
                quantum = max(MIN_SAMPLE_US, since // SAMPLES_PER_SPAN)
                for part in _parts(msg, since, quantum):
                    pending.append(part)
                    n += len(part.records)
                    last = int(part.records["ts_us"][-1]) if len(part.records) else part.now_us
                    if len(part.records):
                        last_rec = last
                        if first_rec is None:
                            first_rec = int(part.records["ts_us"][0])
                    if n >= RUN_RECORDS or last - since >= quantum:
                        flush()
        except RecordingError as e:
            error = str(e)
            if pending:
                flush()
            where = f" at byte {e.offset}" if e.offset is not None else ""
            take(eng.note_input_error(f"{Path(e.path).name}: {e.problem}{where}"))
        if pending:
            flush()
        report_leaks = leaks_mod.from_engine(eng)
        flame = flame_mod.gather(eng, eng.live_allocations() if eng.samples is not None else None,
                                 report_leaks.sites[:LEAK_ROWS])
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
    data.end_t = final.ts_us / 1e6
    idx = _series(data, samples)
    arr = np.array(samples, dtype=np.float64).reshape(-1, 5)
    resample_rates(data, arr[:, 0], arr[:, 3], arr[:, 4], data.end_t)
    for ln in lines:
        _line(data, ln.ts_us / 1e6, ln.level, ln.message)
    # the module series at the memory series' own sample times: their spikes line up
    names = sorted({m for row in mod_rows for m in row},
                   key=lambda m: -max(row.get(m, 0) for row in mod_rows))
    data.module_t = [samples[i][0] for i in idx]
    data.module_series = {m: [mod_rows[i].get(m, 0) for i in idx] for m in names}
    if mod_rows and data.peak_t is not None:
        at = next(i for i, x in enumerate(samples) if x[0] >= data.peak_t)
        data.module_peak, data.module_peak_t = mod_rows[at], samples[at][0]
    data.leaks = report_leaks
    data.flame = flame
    data.hist = _size_hist(doc)
    data.largest = _largest(doc) or []
    return data


def _series(data: ReportData, rows: list[tuple]) -> list[int]:
    """The memory series from rows (seconds, current, peak, ...), downsampled keeping the
    highest point; returns the indices kept."""
    if not rows:
        return []
    cur = np.array([r[1] for r in rows], np.int64)
    keep = int(np.argmax(cur))
    idx = _downsample(len(rows), keep).tolist()
    for i in idx:
        data.t.append(float(rows[i][0]))
        data.current.append(int(rows[i][1]))
        data.peak.append(int(rows[i][2]))
    # The peak happened in the interval ending at the first row whose running peak reaches it.
    final_peak = max(r[2] for r in rows)
    data.peak_t = next(float(r[0]) for r in rows if r[2] == final_peak)
    return idx


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
    if rows:
        # the CSV's rates are over the interval since the row before (the first: since time
        # zero): integrated, they give the cumulative counts the buckets need
        arr = np.array(rows, dtype=np.float64)
        dt = np.diff(np.concatenate([[0.0], arr[:, 0]]))
        resample_rates(data, arr[:, 0], np.cumsum(arr[:, 3] * dt), np.cumsum(arr[:, 4] * dt),
                       uptime)
        ms = doc.get("memory_stats") or {}
        if uptime > 0:  # the JSON's totals are exact
            data.avg_alloc_rate = float(ms.get("total_allocations", 0)) / uptime
            data.avg_free_rate = float(ms.get("total_frees", 0)) / uptime
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
    if (doc.get("monitor") or {}).get("sampling"):
        sp = leaks_mod.stacks_path(directory, prefix)
        try:
            data.flame = flame_mod.from_json(json.loads(sp.read_text(encoding="utf-8")))
        except FileNotFoundError:
            data.notes.append(f"no {sp.name} yet (written when the session ends): no sampled "
                              "stacks")
        except (OSError, ValueError, KeyError, TypeError) as e:
            data.notes.append(f"{sp.name} unreadable ({e}): no sampled stacks")
    data.hist = _size_hist(doc)
    if data.hist is None:
        data.notes.append(f"{paths.json.name} has no monitor.allocation_sizes (written by an "
                          "older nvse-monitor): no size histogram")
    return data
