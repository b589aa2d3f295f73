"""Engine + the four writers, driven by stream messages: used by replay and live sessions alike.

A Pipeline routes every engine output to its file and reports write failures back to the engine
(which logs them and degrades health). feed() may be called from one consumer thread while
another calls finish(): a lock serialises them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from ..engine.leaks import LeakReport, from_engine, leaks_path, request_path, stacks_path
from ..stream.messages import Batch, SessionMeta, StreamMessage
from ..words import plural
from .files import DEFAULT_PREFIX, FileLimits, FilePaths, OutputFiles
from .rows import Output, Snapshot

# Where replay writes (and `status` looks) when no directory is given.
DEFAULT_OUT_DIR = Path("nvse-monitor-out")
# Replay feeds the engine runs of batches of at most about this many records at a time...
REPLAY_RUN_RECORDS = 1 << 18
# ...and ends a run where a recording's chunk ends once it has this many: a run within one
# chunk is a view of the chunk's records (no copy), and 64K-record runs cost the engine no more
# per record than 256K ones (bench/bench_ingest.py; the writer's chunks hold 65,536).
REPLAY_RUN_MIN_RECORDS = 1 << 15


class EngineLike(Protocol):
    def start(self) -> list[Output]: ...
    def feed(self, msg: StreamMessage) -> list[Output]: ...
    def note_write_failure(self, ts_us: int, path: str, error: str) -> list[Output]: ...
    def note_input_error(self, message: str) -> list[Output]: ...
    def finish(self, ts_us: int | None = None) -> list[Output]: ...


class Pipeline:
    def __init__(
        self,
        meta: SessionMeta,
        out_dir: Path | str = DEFAULT_OUT_DIR,
        prefix: str = DEFAULT_PREFIX,
        engine_config: Any = None,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        *,
        engine: EngineLike | None = None,
        err: TextIO | None = None,
        limits: FileLimits | None = None,
        snapshot_files_every_s: float | None = None,
    ) -> None:
        """snapshot_files_every_s: write the JSON and status files for at most one snapshot per
        this many seconds of wall time (the final one and any while a file fails always), e.g.
        for a replay, where the engine's snapshots come faster than anyone reads the files; the
        log and CSV are flushed at each snapshot as usual. None: every snapshot."""
        if engine is None:
            from ..engine.engine import Engine

            engine = Engine(meta, engine_config)
        self.meta = meta
        self.engine = engine
        self.files = OutputFiles(meta, out_dir, prefix, err, limits)
        self.on_snapshot = on_snapshot
        self.last_snapshot: Snapshot | None = None
        self.leaks_path = leaks_path(out_dir, prefix)
        self.stacks_path = stacks_path(out_dir, prefix)  # issue 11: sampled stacks
        self.leaks_request = request_path(out_dir, prefix)
        self.leak_report: LeakReport | None = None  # set by finish()
        self._err = err
        self._snapshot_every_s = snapshot_files_every_s
        self._snapshot_written: float | None = None  # time.monotonic() of the last one
        self._snapshot_status: tuple[Any, bool] | None = None  # a new health is always written
        self._lock = threading.Lock()
        self._started = False
        self._finished = False
        self._interrupted = False

    @property
    def paths(self) -> FilePaths:
        return self.files.paths

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> None:
        """Open the files (raises files.OutputDirError) and route the engine's opening outputs."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if not self._started:
            self.files.open()
            self._started = True
            self._route(self.engine.start())

    def feed(self, msg: StreamMessage) -> None:
        with self._lock:
            if self._finished:
                return  # a late message after finish (e.g. live teardown races) changes nothing
            self._start()
            self._route(self.engine.feed(msg))

    def feed_all(self, msgs: Iterable[StreamMessage]) -> None:
        for msg in msgs:
            self.feed(msg)

    def feed_many(self, msgs: list[StreamMessage]) -> None:
        """Like feed() on each in turn; runs of Batches go through the engine in one pass."""
        with self._lock:
            if self._finished:
                return
            self._start()
            feed_many = getattr(self.engine, "feed_many", None)
            if feed_many is None:
                for msg in msgs:
                    self._route(self.engine.feed(msg))
            else:
                self._route(feed_many(msgs))

    def note_interrupted(self, message: str) -> None:
        """The replay stops before the end of its input: logged as such by the engine, and
        finish() writes no leak report (blocks in flight at the cut are not leaks)."""
        with self._lock:
            if not self._finished and hasattr(self.engine, "note_interrupted"):
                self._start()
                self._interrupted = True
                self._route(self.engine.note_interrupted(message))

    def note_input_error(self, message: str) -> None:
        with self._lock:
            if not self._finished:
                self._start()
                self._route(self.engine.note_input_error(message))

    def finish(self, ts_us: int | None = None) -> Snapshot | None:
        """SHUTDOWN and a final update of every file. Idempotent; returns the final snapshot."""
        with self._lock:
            if not self._finished:
                self._start()
                self._leak_report()
                self._finished = True
                self._route(self.engine.finish(ts_us))
                self.files.flush()  # in case the engine's last output was not a snapshot
            return self.last_snapshot

    def snapshot_now(self) -> Snapshot | None:
        """The engine's state now (between feeds), for dashboards and /metrics; the final
        snapshot once finished. Cheap: counters only, no walk over live blocks."""
        with self._lock:
            if self._finished or not self._started:
                return self.last_snapshot
            snap = getattr(self.engine, "snapshot", None)
            return snap() if snap is not None else self.last_snapshot

    def leaks_now(self) -> LeakReport | None:
        """The blocks live now grouped by module and call site (on demand: walks every live
        block, ~0.1-0.3 s per million, holding the feed lock)."""
        with self._lock:
            if self.leak_report is not None or not hasattr(self.engine, "live_allocations"):
                return self.leak_report
            return from_engine(self.engine)

    def symbol_wants(self) -> np.ndarray:
        """The engine's addresses that need function names (Engine.symbol_wants), taken under
        the feed lock, for the symbolizer's thread (issue 11). Empty once finished."""
        with self._lock:
            wants = getattr(self.engine, "symbol_wants", None)
            if self._finished or wants is None:
                return np.zeros(0, np.uint64)
            return wants()

    def answer_leak_request(self) -> bool:
        """A live session's answer to `top DIR` (another process) asking for the blocks live now:
        when `<prefix>_leaks.request` exists, write `<prefix>_leaks.csv`, then remove the
        request. Called about twice a second; a stat() when nobody asks."""
        if not self.leaks_request.exists():
            return False
        report = self.leaks_now()
        if report is None:
            return False
        self._write_leaks_csv(report)
        with contextlib.suppress(OSError):
            self.leaks_request.unlink()
        return True

    def _write_leaks_csv(self, report: LeakReport) -> str | None:
        """`<prefix>_leaks.csv` replaced atomically; the error (also on stderr) if it failed."""
        from .fileio import atomic_write_text

        try:
            atomic_write_text(self.leaks_path, report.csv_text(self.meta.wall_clock_zero_us))
        except OSError as e:
            error = e.strerror or str(e)
            print(f"nvse-monitor: cannot write {self.leaks_path}: {error}",
                  file=self._err or sys.stderr, flush=True)
            return error
        return None

    def _write_stacks(self, report: LeakReport) -> None:
        """`<prefix>_stacks.json`: the sampled stacks' views (views/report/flame.py, for
        `report DIR`)."""
        import json

        from ..views.report import flame
        from ..views.report.data import LEAK_ROWS
        from .fileio import atomic_write_text

        path = self.stacks_path
        fd = flame.gather(self.engine, self.engine.live_allocations(), report.sites[:LEAK_ROWS])
        try:
            atomic_write_text(path, json.dumps(flame.to_json(fd), indent=1) + "\n")
        except OSError as e:
            error = e.strerror or str(e)
            print(f"nvse-monitor: cannot write {path}: {error}", file=self._err or sys.stderr,
                  flush=True)
            self._route(self.engine.note_write_failure(int(self.engine.now), str(path), error))

    def _leak_report(self) -> None:
        """At finish, before the engine's SHUTDOWN: `<prefix>_leaks.csv` and the top modules
        and call sites as WARN lines (through the engine, so the JSON counts them)."""
        if not hasattr(self.engine, "health") or not hasattr(self.engine, "live_allocations"):
            return  # a stand-in engine (tests)
        if self._interrupted:
            with contextlib.suppress(OSError):  # one from an earlier run here would mislead
                self.leaks_path.unlink()
            with contextlib.suppress(OSError):  # (and its sampled stacks, issue 11)
                self.stacks_path.unlink()
            self.engine.health.log(int(self.engine.now), "INFO", "No leak report: the replay was "
                                   "interrupted (blocks live at the cut are not leaks)")
            return
        report = self.leak_report = from_engine(self.engine)
        error = self._write_leaks_csv(report)
        if getattr(self.engine, "samples", None) is not None:  # issue 11: for `report DIR`
            self._write_stacks(report)
        if error is not None:
            self._route(self.engine.note_write_failure(int(self.engine.now),
                                                       str(self.leaks_path), error))
        report.log_to(self.engine, self.leaks_path.name)
        with contextlib.suppress(OSError):  # a request nobody will answer now: the CSV is final
            self.leaks_request.unlink()

    def _skip_snapshot_files(self, snap: Snapshot) -> bool:
        every, last, now = self._snapshot_every_s, self._snapshot_written, time.monotonic()
        changed = (snap.status, snap.is_healthy) != self._snapshot_status
        if every is None or last is None or snap.final or self.files.failing or changed \
                or now - last >= every:
            self._snapshot_written = now
            self._snapshot_status = (snap.status, snap.is_healthy)
            return False
        return True

    def _route(self, outputs: list[Output], depth: int = 0) -> None:
        for out in outputs:
            if isinstance(out, Snapshot) and self._skip_snapshot_files(out):
                failures = self.files.flush()
            else:
                failures = self.files.write(out)
            if isinstance(out, Snapshot):
                self.last_snapshot = out
                if self.on_snapshot is not None:
                    self.on_snapshot(out)
            # A file is reported once per failing spell, so this recursion is bounded by the
            # number of files; after finish the engine takes no more input (stderr said it).
            if failures and not self._finished and depth < 4:
                for f in failures:
                    self._route(
                        self.engine.note_write_failure(out.ts_us, str(f.path), f.error), depth + 1
                    )


@dataclass
class ReplayResult:
    paths: FilePaths
    messages: int  # stream messages fed
    final: Snapshot | None  # the final (SHUTDOWN) snapshot
    error: str | None = None  # the recording's damage, one line; the files cover what preceded it
    leaks: Path | None = None  # `<prefix>_leaks.csv` (docs/views.md); None when interrupted
    events: int = 0  # allocator events (records) fed
    interrupted: str | None = None  # Ctrl-C: where the replay stopped (the files say so)


def message_ts(msg: StreamMessage) -> int:
    return msg.now_us if isinstance(msg, Batch) else msg.ts_us


class Pacer:
    """Sleeps so messages are fed at the pace of their event time (`replay --realtime`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._t0: float | None = None
        self._ts0 = 0

    def wait(self, ts_us: int, stop: threading.Event | None = None) -> None:
        """Until `ts_us` is due; with `stop`, in slices of at most 0.1 s, returning once it is
        set (a long pause in a recording must not delay Ctrl-C)."""
        if self._t0 is None:
            self._t0, self._ts0 = self._clock(), ts_us
            return
        due = self._t0 + (ts_us - self._ts0) / 1e6
        while (delay := due - self._clock()) > 0:
            if stop is None:
                self._sleep(delay)
                return
            if stop.is_set():
                return
            self._sleep(min(delay, 0.1))


class StopOnSignal:
    """SIGINT/SIGTERM set a flag the replay loop checks between messages (a KeyboardInterrupt
    in the middle of an engine update could leave its state half done); a second one raises
    KeyboardInterrupt as usual. Only in the main thread (signals cannot be caught elsewhere)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signame = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name, None)
                if num is not None:
                    self._old[num] = signal.signal(num, self._handle)
        return self

    def _handle(self, num: int, _frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signame = signal.Signals(num).name
        self.event.set()

    def __exit__(self, *exc: Any) -> None:
        for num, old in self._old.items():
            signal.signal(num, old)
        self._old.clear()


def interruption(path: Path | str, offset: int, events: int, signame: str) -> str:
    """Where and how a replay was interrupted, for the log and the CLI (the file name only, as
    for damage)."""
    by = "SIGINT (Ctrl-C)" if signame == "SIGINT" else signame
    try:
        size = Path(path).stat().st_size
        share = f" of {size} ({100 * offset / size:.0f} %)" if size else ""
    except OSError:
        share = ""
    return (f"stopped by {by} at byte {offset}{share} of {Path(path).name}, after "
            f"{plural(events, 'event')}")


def replay(
    path: Path | str,
    out_dir: Path | str = DEFAULT_OUT_DIR,
    prefix: str = DEFAULT_PREFIX,
    engine_config: Any = None,
    *,
    progress: Callable[[int], None] | None = None,
    realtime: bool = False,
    err: TextIO | None = None,
    limits: FileLimits | None = None,
    on_start: Callable[[Pipeline], None] | None = None,
    read_ahead: bool | None = None,
) -> ReplayResult:
    """The four files from a recording.

    Raises recording.RecordingError when not even the header is readable (no files then), and
    files.OutputDirError. Damage later in the file ends the replay there: the files get their
    final update for the intact prefix and the result carries the error line. Ctrl-C
    (KeyboardInterrupt) ends it too: the files say it was interrupted (ERROR, then SHUTDOWN
    unhealthy), no leak report is made, and the result's `interrupted` says where. `progress` is
    called with the reader's byte offset after each message. `read_ahead`: decode on a second
    thread (None: when spare_core() says a core is free); the files are the same either way.
    """
    from ..stream.recording import RecordingError, open_recording

    rec = open_recording(path)
    try:
        # Runs of batches come faster than anyone reads the JSON and status files: they are
        # rewritten at most 4 times a second (and at the end), not after every run.
        pipe = Pipeline(rec.meta, out_dir, prefix, engine_config, err=err, limits=limits,
                        snapshot_files_every_s=None if realtime else 0.25)
        pipe.start()
        if on_start is not None:  # e.g. a /metrics endpoint reading pipe.snapshot_now()
            on_start(pipe)
        n = events = 0
        error = interrupted = None
        fed_offset = 0  # the reader's offset after the last message fed (it may read ahead)
        stop = StopOnSignal()
        try:
            with stop:
                if realtime:
                    pacer = Pacer()
                    for msg in rec:
                        pacer.wait(message_ts(msg), stop.event)
                        if stop.event.is_set():
                            raise KeyboardInterrupt
                        n += 1
                        if isinstance(msg, Batch):
                            events += len(msg.records)
                        pipe.feed(msg)
                        fed_offset = rec.offset
                        if progress is not None:
                            progress(fed_offset)
                else:
                    # Small live drains are fed in runs: the engine's per-call cost dominates
                    # otherwise, and feed_many gives the same files (tested). The runs are
                    # read and decoded ahead on a thread when a core is free (zlib and numpy
                    # let go of the GIL).
                    ahead = spare_core() if read_ahead is None else read_ahead
                    with _Prefetch(rec, ahead=ahead) as runs:
                        for msgs, offsets in runs:
                            if stop.event.is_set():
                                raise KeyboardInterrupt
                            n += len(msgs)
                            events += sum(len(m.records) for m in msgs if isinstance(m, Batch))
                            pipe.feed_many(msgs)
                            fed_offset = offsets[-1] if offsets else fed_offset
                            if progress is not None:
                                for off in offsets:
                                    progress(off)
                if stop.event.is_set():  # a signal during the last message
                    raise KeyboardInterrupt
        except RecordingError as e:
            error = str(e)
            # The file name only: the files stay byte-identical wherever the recording lies.
            where = f" at byte {e.offset}" if e.offset is not None else ""
            pipe.note_input_error(f"{Path(e.path).name}: {e.problem}{where}")
        except KeyboardInterrupt:
            interrupted = interruption(path, fed_offset, events, stop.signame or "SIGINT")
            pipe.note_interrupted(interrupted)
        finally:
            final = pipe.finish()  # also on Ctrl-C: the files end with a SHUTDOWN update
        leaks = None if interrupted else pipe.leaks_path
        return ReplayResult(pipe.paths, n, final, error, leaks, events, interrupted)
    finally:
        close = getattr(rec, "close", None)
        if close is not None:
            close()


Run = tuple[list[StreamMessage], list[int]]  # messages, the reader's offset after each


def _runs(rec: Iterable[StreamMessage]) -> Iterator[Run]:
    """A recording's messages in runs for feed_many: the batches of one chunk, or of several
    small ones (at most about REPLAY_RUN_RECORDS records), each control message ending a run.
    On damage (or any exception) the run read so
    far comes first, then the exception, as iterating the recording directly would."""
    msgs: list[StreamMessage] = []
    offsets: list[int] = []
    records = 0
    base = None  # the array the run's latest records are a slice of (a chunk's)
    it = iter(rec)
    try:
        try:
            for msg in it:
                if isinstance(msg, Batch) and len(msg.records):
                    if records >= REPLAY_RUN_MIN_RECORDS and msg.records.base is not base:
                        yield _merged(msgs), offsets  # the next chunk starts
                        msgs, offsets, records = [], [], 0
                    base = msg.records.base
                msgs.append(msg)
                offsets.append(getattr(rec, "offset", 0))
                if isinstance(msg, Batch):
                    records += len(msg.records)
                if records >= REPLAY_RUN_RECORDS or not isinstance(msg, Batch):
                    yield _merged(msgs), offsets
                    msgs, offsets, records = [], [], 0
        except GeneratorExit:
            raise
        except BaseException:
            if msgs:
                yield _merged(msgs), offsets
            raise
        if msgs:
            yield _merged(msgs), offsets
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def keep_freed_memory() -> None:
    """glibc (Linux): keep freed memory for reuse rather than hand it back to the kernel at once.
    A replay allocates and frees tens of MB per run of batches; by default glibc unmaps or trims
    most of it each time and then faults it in again: ~150,000 page faults, about 15 % of the
    CPU time of a 6 M-event replay. Blocks up to 32 MiB come from the heap and up to 256 MiB of
    free heap is kept (the process is short-lived; its peak RSS barely changes)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # also turns off glibc's own threshold tuning
    mallopt(m_trim_threshold, 256 << 20)


def spare_core(samples: int = 10) -> bool:
    """Whether a second thread is likely to find a core: the 1-minute load average (this
    command's own earlier runs included) is under the cores this process may use plus one and,
    on Linux, fewer than cores less a half other tasks run now (the running count of
    /proc/loadavg over ~5 ms; the average lags a burst of other work). With the GIL, two busy
    threads on oversubscribed cores hand it over slowly. Measured on the 2-core machine
    (bench/bench_replay.py, the reader thread vs decoding in turn): 1.2x when quiet, 1.14x at a
    load average of 2.5, 0.9x at 3.5-5, 0.7-0.9x at 5-8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    try:
        if os.getloadavg()[0] >= cpus + 1:
            return False
    except (AttributeError, OSError):  # Windows: no load average; assume a core is free
        return True
    try:
        others = 0
        for i in range(samples):
            with open("/proc/loadavg", "rb") as f:  # "0.52 0.58 0.59 3/467 12345"
                others += int(f.read().split()[3].split(b"/")[0]) - 1  # less this thread
            if i + 1 < samples:
                time.sleep(0.0005)
        return others / samples < cpus - 0.5
    except (OSError, ValueError, IndexError):
        return True


class _Prefetch:
    """_runs(rec) on a thread, `depth` runs ahead of the consumer (or, ahead=False, in the
    consumer's thread)."""

    def __init__(self, rec: Iterable[StreamMessage], depth: int = 2, ahead: bool = True) -> None:
        self._rec = rec
        self._ahead = ahead
        self._q: queue.Queue[tuple[Run | None, BaseException | None]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="replay-reader", daemon=True)

    def __enter__(self) -> _Prefetch:
        if self._ahead:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a put() waiting for room
            with contextlib.suppress(queue.Empty):
                self._q.get(timeout=0.05)
        if self._ahead:
            self._thread.join()

    def __iter__(self) -> Iterator[Run]:
        if not self._ahead:
            yield from _runs(self._rec)
            return
        while True:
            run, exc = self._q.get()
            if run is not None:
                yield run
            elif exc is not None:
                raise exc
            else:
                return

    def _put(self, item: tuple[Run | None, BaseException | None]) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._q.put(item, timeout=0.1)
                return True
        return False

    def _work(self) -> None:
        gen = _runs(self._rec)
        try:
            for run in gen:
                if not self._put((run, None)):
                    return
        except BaseException as e:  # handed to the consumer, after what preceded it
            self._put((None, e))
            return
        finally:
            gen.close()
        self._put((None, None))


def _merged(msgs: list[StreamMessage]) -> list[StreamMessage]:
    """The same messages, the records of each run of batches copied back to back into one
    array (here, on the reader's thread) so that the engine takes them as one view."""
    out: list[StreamMessage] = []
    i = 0
    while i < len(msgs):
        j = i
        while j < len(msgs) and isinstance(msgs[j], Batch):
            j += 1
        run: list[Batch] = msgs[i:j]  # type: ignore[assignment]
        full = [b.records for b in run if len(b.records)]
        base = full[0].base if full else None
        if len(full) > 1 and (base is None or any(r.base is not base for r in full)):
            void = np.dtype((np.void, run[0].records.dtype.itemsize))  # plain copies, see engine
            recs = np.concatenate([b.records.view(void) for b in run]).view(run[0].records.dtype)
            pos = 0
            for b in run:
                n = len(b.records)
                out.append(Batch(b.now_us, b.counters, recs[pos:pos + n]))
                pos += n
        else:
            out += run
        out += msgs[j:j + 1]
        i = j + 1
    return out
