"""The pure stats engine: stream messages in, outputs (log lines, CSV rows, snapshots) out.

No clock and no I/O: time comes only from the messages. Each Batch is processed with whole-array
numpy operations (docs/engine.md explains the steps and every counter rule):
1. records -> events: a realloc becomes free(old) + alloc(new); failures stay in place;
2. events are grouped by pointer (stable sort of a pointer hash) so each event knows the
   state of its block from the previous event on the same pointer in the batch, or from the
   live table (classify.py, tracking.py); here the tracking limit is enforced;
3. per-event deltas are cumulated in time order -> current/peak counts and bytes, CSV samples at
   every 1000th allocation, the 10,000-allocation snapshot point;
4. a short Python walk over the sparse points of interest (CSV rows, large allocations, failure
   reports, ...) emits the outputs in time order and drives the health machine.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .. import BUILD_DATE, NAME, __version__, native
from ..capture.addrspace import DEFAULT_WARN_BYTES
from ..capture.fnv import notable_module
from ..outputs.rows import AddressSpaceRow, CsvRow, Output, Snapshot
from ..stream.events import RECORD_DTYPE
from ..stream.messages import (
    AddressSpace,
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    ModuleEvent,
    SessionEnd,
    SessionMeta,
    StreamMessage,
    SymbolNames,
)
from ..words import plural
from .classify import (
    FAILURE,
    FREE_T,
    FREE_U,
    NEW,
    O_ALLOC,
    O_DCOUNT,
    O_FREE,
    O_PLUS,
    OVERFLOW,
    REPLACE,
    apply_plan,
    classify,
    expand_records,
    track_compiled,
)
from .health import Health
from .modmap import ModuleMap
from .samples import SampledStacks
from .tracking import LiveColumns, LiveTable

ADDRSPACE_LOW = "address space low"  # the health cause
# Detail prefix of a hook message for an optional entry point that a module does not have
# (agent.js notPresent): logged INFO, not a failure (docs/engine.md, "Hook failures").
NOT_PRESENT = "not present: "
_MB = 1 << 20
# Allocation size classes by bit length: class 0 = size 0, class k = 2**(k-1) .. 2**k - 1 bytes.
# Counted per batch from the biased exponent of each size as a float64 (one bincount, no log or
# loop; exact below 2**53 bytes). State keeps the raw exponent bins; _size_classes maps them.
_SIZE_BINS = 1088  # biased exponents 0 (size 0) and 1023..1087 (1 .. 2**64)
# The largest allocations of the session (monitor.largest_allocations): size desc, then the
# earliest first, so the list does not depend on how the stream was cut into batches.
LARGEST = 20
_LARGEST_DTYPE = np.dtype([("size", "u8"), ("ts", "u8"), ("dur", "u4"), ("tid", "u4"),
                           ("hook", "u1"), ("mod", "u2"), ("caller", "u8")])


@dataclass
class EngineConfig:
    max_tracked: int = 8_000_000  # bound on live tracked allocations
    large_alloc_bytes: int = 1 << 20  # PERF line for allocations larger than this
    csv_every_allocs: int = 1000
    json_every_allocs: int = 10_000
    quiet_snapshot_us: int = 2_000_000  # snapshot at least this often (stream time) when quiet
    recovery_us: int = 30_000_000  # DEGRADED by transient causes -> ACTIVE after this long
    warn_interval_us: int = 1_000_000  # repeated WARN lines (failures, drops): at most one per
    # Address space (ia32): DEGRADED while the largest free block is under this many bytes.
    addrspace_warn_bytes: int = DEFAULT_WARN_BYTES
    # Ring stalls (--on-full wait): a burst is stalls rising in batches less than this apart...
    stall_gap_us: int = 1_000_000
    # ...and one whose calls waited this long in total degrades health (transient).
    stall_degrade_us: int = 1_000_000


@dataclass
class Counters:
    total_allocations: int = 0  # successful allocations, tracked or not
    total_frees: int = 0  # frees of tracked blocks (+ blocks replaced while live)
    current_allocations: int = 0  # tracked live blocks
    peak_allocations: int = 0
    total_bytes_allocated: int = 0
    total_bytes_freed: int = 0
    current_bytes: int = 0  # bytes of tracked live blocks
    peak_bytes: int = 0
    allocation_failures: int = 0
    untracked_frees: int = 0
    replaced_live: int = 0
    overflow_allocations: int = 0  # allocations not tracked because tracking was full
    overflow_bytes: int = 0


@dataclass
class State:
    """Counters plus per-heap and per-module figures at one moment."""

    c: Counters
    heap_cur: np.ndarray  # int64 per heap index
    heap_peak: np.ndarray
    mod_cur: np.ndarray  # int64 live bytes per module index, last entry = unknown module
    size_count: np.ndarray  # int64 allocations per raw size bin (_SIZE_BINS)
    largest: np.ndarray  # _LARGEST_DTYPE, at most LARGEST, largest first


@dataclass
class _Batch:
    """Per-event arrays of the batch being processed (time order)."""

    ts: np.ndarray
    size: np.ndarray
    outcome: np.ndarray
    plus: np.ndarray  # int64 bytes added to tracked (NEW/REPLACE)
    minus: np.ndarray  # int64 bytes removed from tracked (FREE_T/REPLACE)
    cur_c: np.ndarray
    cur_b: np.ndarray
    hook: np.ndarray
    old_hook: np.ndarray
    mod: np.ndarray
    old_mod: np.ndarray
    rec: np.ndarray | None  # record index of each event (None: identity)
    heap_runs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    delta: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    to_new: np.ndarray = field(default_factory=lambda: np.empty(0, bool))  # O_PLUS per event
    counts: np.ndarray = field(default_factory=lambda: np.zeros(7, np.intp))
    records: np.ndarray | None = None  # the records the events came from


_REC_VOID = np.dtype((np.void, RECORD_DTYPE.itemsize))
# Live batches in separate arrays are joined into runs of about this many records (small ones
# cost the engine more per record; bigger runs cost no less per record than this, and the
# copy that joins them costs a pass over every record).
JOIN_RECORDS = 1 << 14
# Per outcome: allocation counted + (change of the live count << 32), as int64 (a cumsum that
# converts int8/bool on the fly is ~3x slower): one running sum gives both (a batch has fewer
# than 2**31 events).
_ALLOC_DCOUNT = O_ALLOC.astype(np.int64) + (O_DCOUNT.astype(np.int64) << 32)
_SUMS_TABLES = (O_PLUS.view(np.uint8), O_ALLOC.view(np.uint8), O_DCOUNT)  # kernels.c nvsm_sums


# Session ends that need words in the log (the others say what they are).
END_REASONS = {"target-exec": "the program replaced itself (exec) with another, which is not "
               "monitored: the hooks were in the image it replaced"}


@dataclass
class _Throttled:
    """A WARN about counts that come often: at most one line per interval, summing the rest."""

    unreported: int = 0
    last: int | None = None  # stream time of the last line

    def due(self, t: int, interval_us: int, force: bool) -> int:
        """The count to report now (and it is taken), or 0."""
        n = self.unreported
        if n and (force or self.last is None or t - self.last >= interval_us):
            self.unreported, self.last = 0, t
            return n
        return 0


def _view_of(recs: list[np.ndarray]) -> np.ndarray | None:
    """The records of consecutive batches as one view when they lie back to back in one array
    (a replayed chunk, a run merged by replay's reader), else None."""
    full = [r for r in recs if len(r)]  # an empty slice's address is not where it was cut
    if len(full) <= 1:
        return full[0] if full else recs[0]
    base = full[0].base  # numpy's base: the array that owns the memory
    if isinstance(base, np.ndarray) and base.ndim == 1 and base.flags.c_contiguous \
            and base.itemsize == full[0].itemsize:
        pos = start = full[0].__array_interface__["data"][0]
        for r in full:
            if r.base is not base or r.__array_interface__["data"][0] != pos \
                    or not r.flags.c_contiguous:
                break
            pos += r.nbytes
        else:
            i = (start - base.__array_interface__["data"][0]) // base.itemsize
            return base[i:i + (pos - start) // base.itemsize].view(full[0].dtype)
    return None


def _joined(recs: list[np.ndarray]) -> np.ndarray:
    """The records of consecutive batches as one array: a view where _view_of finds one, else
    a copy."""
    view = _view_of(recs)
    if view is not None:
        return view
    # as opaque items: concatenating structured arrays promotes dtypes field by field
    return np.concatenate([r.view(_REC_VOID) for r in recs]).view(recs[0].dtype)


class Engine:
    def __init__(self, meta: SessionMeta, config: EngineConfig | None = None) -> None:
        self.meta = meta
        self.config = config or EngineConfig()
        self.table = LiveTable()
        self._out: list[Output] = []
        self.health = Health(meta.pid, self.config.recovery_us, self._out)
        self.modmap = ModuleMap(meta.modules)
        # Issue 11: sampled stacks and their estimates (docs/attribution.md); None: no sampling
        self.samples = (SampledStacks(meta.sample_bytes, self.modmap)
                        if meta.sample_bytes > 0 else None)
        self.heap_names: list[str] = []
        for h in meta.hooks:
            if h.heap not in self.heap_names:
                self.heap_names.append(h.heap)
        self.heap_names.append("unknown")  # hook indices outside meta.hooks
        self._heap_of_hook = np.full(256, len(self.heap_names) - 1, dtype=np.uint8)
        for i, h in enumerate(meta.hooks[:256]):
            self._heap_of_hook[i] = self.heap_names.index(h.heap)
        self._single_heap = len(self.heap_names) == 2  # every known hook in one heap
        nh = len(self.heap_names)
        self.state = State(Counters(), np.zeros(nh, np.int64), np.zeros(nh, np.int64),
                           np.zeros(len(self.modmap.modules) + 1, np.int64),
                           np.zeros(_SIZE_BINS, np.int64),
                           np.zeros(0, _LARGEST_DTYPE))
        self.now = 0
        self.unknown_records = 0
        # CSV sampling
        self._sample_ts = 0
        self._sample_allocs = 0
        self._sample_frees = 0
        self.rate_allocs = 0.0
        self.rate_frees = 0.0
        # agent counters and drops
        self.agent = AgentCounters()
        self._counters_t = 0  # time of the latest counters
        self.dropped = 0
        self._drop_warn = _Throttled()
        self._last_fail_warn: int | None = None
        self._overflow_warned = False
        # Issue 13: ring stalls, invalid ring records, blocks whose fate is uncertain.
        self._burst: _StallBurst | None = None
        self.stall_bursts = 0
        self._long_stalls = False  # some burst degraded health
        self._invalid_warn = _Throttled()
        # Whether the counters say which dropped records were frees (a session that knows its
        # --on-full policy has the ring counters; so does any that counted a dropped free).
        self._knows_dropped_frees = "on_full" in meta.extra
        self.uncertain_until: int | None = None  # blocks allocated at or before: fate unknown
        self.uncertain_reason = ""
        self.leak_summary: dict[str, int] | None = None  # set by note_leaks (session end)
        self._hook_state: dict[object, str] = {}  # hook index -> ok, failed, pending, absent
        self._hooks_complete = False
        self.hooks_installed: list[str] = []
        self.hooks_failed: list[dict[str, str]] = []
        self._session_end: SessionEnd | None = None
        # address space: the latest sample, how many, the smallest largest-free block seen
        self.addrspace: AddressSpace | None = None
        self.addrspace_samples = 0
        self.min_largest_free: int | None = None
        # A live session records its threshold in the metadata: a replay judges the same way.
        recorded = meta.extra.get("addrspace_warn_bytes")
        self.addrspace_warn_bytes = (recorded if type(recorded) is int and recorded > 0
                                     else self.config.addrspace_warn_bytes)
        self._last_snap_ts: int | None = None
        self._largest_cache: tuple[np.ndarray | None, list[dict]] = (None, [])
        # Issue 11: function names of code addresses ("name+0xoff"), from SymbolNames messages
        self.symbols: dict[int, str] = {}
        self._last_snap_status = None
        self.started = False
        self.finished = False
        self.interrupted = False  # note_interrupted(): the JSON's monitor section says so

    # -- public API --
    def start(self) -> list[Output]:
        if not self.started:
            self._start()
        return self._take()

    def feed(self, msg: StreamMessage) -> list[Output]:
        if self.finished:
            return []
        if not self.started:
            self._start()
        if isinstance(msg, SymbolNames):  # names: no time of their own, no snapshot
            self.symbols.update(msg.names)
            self._largest_cache = (None, [])
            if msg.error:
                self.health.log(self.now, "WARN", "Function names unavailable"
                                + (f" for {plural(msg.unresolved, 'call site')}"
                                   if msg.unresolved else "")
                                + f" ({msg.error}): those call sites are shown as "
                                "module+offset")
            return self._take()
        if isinstance(msg, Batch):
            self._feed_batches([msg])
        elif isinstance(msg, HookEvent):
            self._feed_hook(msg)
        elif isinstance(msg, ModuleEvent):
            self._feed_module(msg)
        elif isinstance(msg, AgentError):
            t = self._advance(msg.ts_us)
            self.health.fail(t, "ERROR", f"Agent error: {msg.message}", "agent error")
        elif isinstance(msg, SessionEnd):
            self._feed_end(msg)
        elif isinstance(msg, AddressSpace):
            self._feed_addrspace(msg)
        else:
            raise TypeError(f"not a stream message: {type(msg).__name__}")
        self._end_feed()
        return self._take()

    def feed_many(self, msgs: Iterable[StreamMessage]) -> list[Output]:
        """Like feed() on each message in turn, faster for runs of small batches (replay): each
        run of consecutive Batches is processed in one pass. Log lines and CSV rows are the
        same; only snapshots that a later one in the same call supersedes are left out."""
        out: list[Output] = []
        run: list[Batch] = []
        for msg in msgs:
            if isinstance(msg, Batch) and not self.finished:
                run.append(msg)
                continue
            if run:
                out += self._feed_run(run)
                run = []
            out += self.feed(msg)
        if run:
            out += self._feed_run(run)
        return out

    def _feed_run(self, run: list[Batch]) -> list[Output]:
        if not self.started:
            self._start()
        self._feed_batches(run)
        self._end_feed()
        return self._take()

    def note_write_failure(self, ts_us: int, path: str, error: str) -> list[Output]:
        if self.finished:
            return []
        t = self._advance(ts_us)
        self.health.log(t, "WARN", f"Failed to write {path}: {error}")
        self.health.degrade_transient(t, "output write failures")
        return self._take()

    def note_input_error(self, message: str) -> list[Output]:
        """The input stream itself is damaged (a cut or corrupt recording): the files cover what
        came before it, so the session's figures are incomplete -> ERROR. Not a stream message."""
        if self.finished:
            return []
        if not self.started:
            self._start()
        t = self._advance(self.now)
        self.health.fail(t, "ERROR", f"Input damaged, figures cover the intact prefix: {message}",
                         "damaged input")
        return self._take()

    def note_interrupted(self, message: str) -> list[Output]:
        """The replay was stopped before the end of its input (Ctrl-C): like damaged input, the
        figures cover only a prefix of the session -> ERROR, then SHUTDOWN unhealthy."""
        if self.finished:
            return []
        if not self.started:
            self._start()
        t = self._advance(self.now)
        self.interrupted = True
        self.health.fail(t, "ERROR", f"Replay interrupted, figures cover only the part before "
                         f"it: {message}", "replay interrupted")
        return self._take()

    def finish(self, ts_us: int | None = None) -> list[Output]:
        if self.finished:
            return []
        if not self.started:
            self._start()
        if self._session_end is not None:
            t = self._advance(self._session_end.ts_us)
        else:
            t = self._advance(self.now if ts_us is None else ts_us)
        self._report_drops(t, force=True)
        c = self.state.c
        log = self.health.log
        log(t, "INFO", f"Final statistics: {plural(c.total_allocations, 'allocation')}, "
            f"{plural(c.total_frees, 'free')}, {plural(c.total_bytes_allocated, 'byte')} "
            f"allocated, {plural(c.total_bytes_freed, 'byte')} freed, "
            f"{plural(c.allocation_failures, 'failure')}")
        log(t, "INFO", f"Peak: {plural(c.peak_allocations, 'live allocation')}, "
            f"{plural(c.peak_bytes, 'byte')}")
        log(t, "INFO", f"Still live at end: {plural(c.current_allocations, 'allocation')}, "
            f"{plural(c.current_bytes, 'byte')}")
        log(t, "INFO", f"Untracked frees: {c.untracked_frees}; dropped events: {self.dropped}; "
            f"untracked allocations (tracking full): {c.overflow_allocations}")
        self._report_invalid(t, force=True)
        self._end_stall_burst(t)
        self._stall_summary(t)
        self.health.finish(t)
        log(t, "INFO", f"=== {NAME} monitoring stopped ===")
        self._csv_row(t, c.total_allocations, c.total_frees, c.current_bytes, c.peak_bytes,
                      final=True)
        self._emit_snapshot(t, self.state, final=True)
        self.finished = True
        return self._take()

    def snapshot(self) -> Snapshot:
        return self._make_snapshot(self.now, self.state)

    def live_allocations(self) -> dict[str, np.ndarray]:
        """Live tracked blocks sorted by pointer: ptr, size, ts, caller, hook, heap, module.
        heap indexes `heap_names`; module indexes `modmap.modules` (0xFFFF = unknown)."""
        e = self.table.entries()
        o = np.argsort(e.ptr, kind="stable")
        return {"ptr": e.ptr[o], "size": e.size[o], "ts": e.ts[o], "caller": e.caller[o],
                "hook": e.hook[o], "heap": self._heap_of_hook[e.hook[o]], "module": e.module[o]}

    def symbol_wants(self) -> np.ndarray:
        """Code addresses the outputs name that have no function name yet (u64, sorted): the
        distinct callers of live blocks (leak report, `top`) and of the largest allocations.
        For the host's symbolizer (capture/symbolizer.py), which asks the agent off this
        thread; and the frames of sampled stacks."""
        e = self.table.entries()
        parts = [e.caller.astype(np.uint64), self.state.largest["caller"].astype(np.uint64)]
        if self.samples is not None:  # the flame graph's and the leak sites' stack frames
            parts.append(np.asarray(self.samples.frame_addresses(), np.uint64))
        callers = np.unique(np.concatenate(parts))
        callers = callers[callers != 0]
        if self.symbols and len(callers):
            known = np.fromiter(self.symbols, np.uint64, len(self.symbols))
            callers = callers[~np.isin(callers, known)]
        return callers

    # -- plumbing --
    def _take(self) -> list[Output]:
        out = list(self._out)
        self._out.clear()
        return out

    def _advance(self, ts: int) -> int:
        """Stream time moves to max(now, ts) (never backwards); returns it."""
        t = max(self.now, int(ts))
        self.now = t
        self.health.advance(t)
        return t

    def _start(self) -> None:
        self.started = True
        m, cfg, t = self.meta, self.config, self.now
        log = self.health.log
        log(t, "INFO", f"=== {NAME} Memory Monitor Initialized ===")
        log(t, "INFO", f"Monitor Version: {m.monitor_version or __version__}")
        log(t, "INFO", f"Build: {BUILD_DATE}")
        log(t, "INFO", f"Target: {m.target} ({m.platform} {m.arch}, {m.mode})")
        log(t, "INFO", f"Process ID: {m.pid}")
        log(t, "INFO", f"Profile: {m.profile}")
        for line in m.extra.get("banner", []):  # target-specific lines (game/NVSE versions...)
            log(t, "INFO", str(line))
        hooks = ", ".join(f"{h.name} ({h.heap})" for h in m.hooks) or "none"
        log(t, "INFO", f"Hooks: {len(m.hooks)}: {hooks}")
        log(t, "INFO", f"Modules at start: {len(m.modules)}")
        log(t, "INFO", f"Tracking up to {cfg.max_tracked} live allocations; large allocation "
            f"threshold {cfg.large_alloc_bytes} bytes")
        transport = m.extra.get("transport")
        if transport:  # live sessions since 0.3.0: how records reach us (docs/agent.md)
            log(t, "INFO", f"Transport: {transport}")
        on_full = m.extra.get("on_full")
        if on_full is not None:  # live sessions since issue 13
            wait = m.extra.get("max_wait_ms")
            log(t, "INFO", f"Full-ring policy: {on_full}" + (
                f" (a hooked call waits up to {wait:g} ms for a free slot, then drops its event)"
                if on_full == "wait" and wait is not None else ""))
        self.health.start(t)

    def _end_feed(self) -> None:
        st = self.health.status
        if (self._last_snap_ts is None or st != self._last_snap_status
                or self.now - self._last_snap_ts >= self.config.quiet_snapshot_us):
            self._emit_snapshot(self.now, self.state)

    def _emit_snapshot(self, ts: int, state: State, final: bool = False) -> None:
        self._out.append(self._make_snapshot(ts, state, final))
        self._last_snap_ts = ts
        self._last_snap_status = self.health.status

    # -- control messages --
    def _feed_hook(self, msg: HookEvent) -> None:
        t = self._advance(msg.ts_us)
        h = self.health
        detail = f" ({plain_hook_detail(msg.detail)})" if msg.detail else ""
        key = msg.hook if msg.hook >= 0 else ("name", msg.name)
        if not msg.ok and not msg.pending and msg.detail.startswith(NOT_PRESENT):
            # an optional entry point this module does not have: no failure (docs/engine.md)
            h.log(t, "INFO", f"Hook not present: {msg.name} ({msg.detail[len(NOT_PRESENT):]})")
            state = "ok" if self._hook_state.get(key) == "ok" else "absent"
        elif msg.pending:
            h.log(t, "INFO", f"Hook pending: {msg.name}{detail}")
            state = "pending"
        elif msg.ok:
            hooks = self.meta.hooks
            size_query = 0 <= msg.hook < len(hooks) and hooks[msg.hook].role == "size"
            # a size query allocates nothing: the agent leaves it alone
            h.log(t, "INFO", f"{'Hook not needed' if size_query else 'Hook installed'}: "
                  f"{msg.name}{detail}")
            self.hooks_installed.append(msg.name)
            state = "ok"
        else:
            h.log(t, "WARN", f"Hook failed: {msg.name}{detail}")
            self.hooks_failed.append({"name": msg.name, "detail": msg.detail})
            state = "failed"
        self._hook_state[key] = state
        nh = len(self.meta.hooks)
        if not self._hooks_complete and nh and all(i in self._hook_state for i in range(nh)):
            self._hooks_complete = True
            states = [self._hook_state[i] for i in range(nh)]
            ok, pending = states.count("ok"), states.count("pending")
            absent = states.count("absent")
            if ok == 0 and pending == 0:
                h.fail(t, "ERROR", f"All {nh} hooks failed to install", "all hooks failed")
                return
            h.log(t, "INFO", f"Hooks installed: {ok} of {nh}"
                  + (f", {pending} waiting for their modules" if pending else "")
                  + (f", {absent} optional not present" if absent else ""))
            if state == "failed":  # earlier failures degraded when they came
                h.degrade_persistent(t, f"hook {msg.name} failed")
            h.activate(t, "hooks installed")
        elif state == "failed":
            h.degrade_persistent(t, f"hook {msg.name} failed")

    def _feed_module(self, msg: ModuleEvent) -> None:
        t = self._advance(msg.ts_us)
        m = msg.module
        if msg.action == "add":
            before = len(self.modmap.modules)
            self.modmap.add(m)
            if len(self.modmap.modules) > before:
                mc = self.state.mod_cur
                self.state.mod_cur = np.insert(mc, len(mc) - 1, 0)
            what = notable_module(m.name, m.path)  # NVSE, its plugins, a heap replacer
            if what is not None:
                self.health.log(t, "INFO", f"{what} loaded: {m.name} at 0x{m.base:x} ({m.path})")
            else:
                self.health.log(t, "DEBUG",
                                f"Module loaded: {m.name} at 0x{m.base:x} ({m.size} bytes)")
        else:
            self.modmap.remove(m)
            self.health.log(t, "DEBUG", f"Module unloaded: {m.name} at 0x{m.base:x}")

    def _feed_addrspace(self, msg: AddressSpace) -> None:
        t = self._advance(msg.ts_us)
        self._out.append(AddressSpaceRow(t, msg.mapped, msg.committed, msg.reserved, msg.free,
                                         msg.largest_free, msg.limit, msg.regions))
        self.addrspace = msg
        self.addrspace_samples += 1
        lf = msg.largest_free
        if lf is None:  # not counted (64-bit): nothing to judge
            return
        if self.min_largest_free is None or lf < self.min_largest_free:
            self.min_largest_free = lf
        h, warn = self.health, self.addrspace_warn_bytes
        low = ADDRSPACE_LOW in h.conditions
        if lf >= warn and not low:
            return
        free = f"free {(msg.free or 0) / _MB:.1f} MiB" + (
            f" of {msg.limit / _MB:.1f} MiB" if msg.limit is not None else "")
        if lf < warn and not low:
            h.log(t, "WARN", f"Address space low: largest free block {lf / _MB:.1f} MiB "
                  f"(< {warn / _MB:.1f} MiB), {free}")
            h.set_condition(t, ADDRSPACE_LOW)
        elif lf >= warn and low:
            h.log(t, "INFO", f"Address space recovered: largest free block {lf / _MB:.1f} MiB "
                  f"(>= {warn / _MB:.1f} MiB), {free}")
            h.clear_condition(t, ADDRSPACE_LOW, "address space recovered")

    def _feed_end(self, msg: SessionEnd) -> None:
        t = self._advance(msg.ts_us)
        self._session_end = msg
        if msg.counters is not None:
            self._agent_counters(t, msg.counters)
        if msg.expected:
            why = END_REASONS.get(msg.reason)
            self.health.log(t, "INFO", f"Session ended: {msg.reason}" + (f" ({why})" if why
                                                                         else ""))
        else:
            crash = f"; crash: {msg.crash}" if msg.crash else ""
            self.health.fail(t, "CRITICAL", f"Target lost unexpectedly: {msg.reason}{crash}",
                             "target lost")

    def _agent_counters(self, t: int, ac: AgentCounters) -> None:
        prev = self.agent
        self.agent = ac
        self._ring_counters(t, prev, ac)
        new = ac.dropped - self.dropped
        if new > 0:
            self.dropped = ac.dropped
            self._drop_warn.unreported += new
            self._report_drops(t)
            self.health.degrade_transient(t, "dropped events")
        else:
            self._report_drops(t)

    def _report_drops(self, t: int, force: bool = False) -> None:
        if (n := self._drop_warn.due(t, self.config.warn_interval_us, force)):
            self.health.log(t, "WARN", f"Dropped {plural(n, 'event')} (agent ring full); "
                            f"{self.dropped} dropped so far")

    # -- issue 13: the shared ring's counters --
    def _ring_counters(self, t: int, prev: AgentCounters, ac: AgentCounters) -> None:
        """Blocks of uncertain fate, invalid records and stall bursts from the cumulative
        counters of a batch (or the SessionEnd) at stream time t."""
        if ac.dropped_frees:
            self._knows_dropped_frees = True
        if self._knows_dropped_frees:
            lost = ac.dropped_frees > prev.dropped_frees
        else:  # a recording from before issue 13: any drop may have been a free
            lost = ac.dropped > max(prev.dropped, self.dropped)
        invalid = ac.unknown_records > prev.unknown_records  # garbage in the ring: lost events
        if invalid:
            self._invalid_warn.unreported += ac.unknown_records - prev.unknown_records
            self.health.degrade_transient(t, "invalid ring records")
        if lost or invalid:
            self.uncertain_until = t  # every record of a batch is at or before its time
            why = []
            if self._knows_dropped_frees and ac.dropped_frees:
                n = ac.dropped_frees
                why.append(f"{plural(n, 'free/realloc record')} {_were(n)} dropped")
            elif not self._knows_dropped_frees and ac.dropped:
                why.append(f"{plural(ac.dropped, 'event')} {_were(ac.dropped)} dropped (the "
                           "recording does not say which were frees)")
            if ac.unknown_records:
                n = ac.unknown_records
                why.append(f"{plural(n, 'invalid ring record')} {_were(n)} skipped")
            self.uncertain_reason = "; ".join(why)
        self._report_invalid(t)
        burst = self._burst
        if ac.stalls > prev.stalls:
            if burst is not None and t - burst.last_t >= self.config.stall_gap_us:
                self._end_stall_burst(t)
                burst = None
            if burst is None:
                burst = self._burst = _StallBurst(self._counters_t, t, prev)
                self.stall_bursts += 1
            burst.last_t, burst.end = t, ac
            if burst.degraded:
                self.health.touch_transient(t, "long stalls")
            elif ac.stall_us - burst.start.stall_us >= self.config.stall_degrade_us:
                burst.degraded = self._long_stalls = True
                self.health.degrade_transient(t, "long stalls")
        elif burst is not None and t - burst.last_t >= self.config.stall_gap_us:
            self._end_stall_burst(t)
        self._counters_t = t

    def _report_invalid(self, t: int, force: bool = False) -> None:
        if (n := self._invalid_warn.due(t, self.config.warn_interval_us, force)):
            self.health.log(t, "WARN", f"Skipped {n} invalid records from the shared ring; "
                            f"{self.agent.unknown_records} so far")

    def _end_stall_burst(self, t: int) -> None:
        """One WARN per burst, when it is over (a quiet stall_gap_us, or the end)."""
        b = self._burst
        if b is None:
            return
        self._burst = None
        a, z = b.start, b.end
        self.health.log(t, "WARN", f"Stall burst: {z.stalls - a.stalls} hooked calls waited for "
                        f"a free ring slot, {z.stall_us - a.stall_us} microseconds in total, "
                        f"within {b.last_t - b.first_t} microseconds (longest wait so far "
                        f"{z.stall_max_us} microseconds; {z.stalls} stalls so far)")

    def _stall_summary(self, t: int) -> None:
        ac, extra = self.agent, self.meta.extra
        if not ac.stalls and "on_full" not in extra:
            return  # a recording from before issue 13: nothing to say
        policy = f"; policy {extra['on_full']}" if "on_full" in extra else ""
        if "max_wait_ms" in extra and extra.get("on_full") == "wait":
            policy += f", at most {extra['max_wait_ms']} ms per call"
        self.health.log(t, "WARN" if self._long_stalls else "INFO",
                        f"Stalls: {ac.stalls} hooked calls waited for a free ring slot, "
                        f"{ac.stall_us} microseconds in total, longest {ac.stall_max_us} "
                        f"microseconds, in {_n(self.stall_bursts, 'burst')}{policy}")

    def note_leaks(self, report: object) -> None:
        """The session's leak report (leaks.LeakReport), for the final JSON's monitor.leaks."""
        self.leak_summary = {
            "leaked_allocations": int(getattr(report, "allocations", 0)),
            "leaked_bytes": int(getattr(report, "bytes", 0)),
            "uncertain_allocations": int(getattr(report, "uncertain_allocations", 0)),
            "uncertain_bytes": int(getattr(report, "uncertain_bytes", 0)),
        }

    # -- batches --
    def _feed_batches(self, run: list[Batch]) -> None:
        """Consecutive batches; each batch boundary keeps its effects (time, agent counters,
        drops) at its place in the timeline. Batches in separate arrays (live) are joined only
        up to JOIN_RECORDS: a bigger one goes alone, without the copy that joining costs
        (a pass over every record); any grouping gives the same log and CSV."""
        if len(run) > 1 and _view_of([b.records for b in run]) is None:
            start = len(self._out)
            group: list[Batch] = []
            n = 0
            for b in run:
                group.append(b)
                n += len(b.records)
                if n >= JOIN_RECORDS:
                    self._feed_group(group)
                    group, n = [], 0
            if group:
                self._feed_group(group)
            # One pass over the run would emit only the last of the snapshots taken at the
            # 10,000-allocation points (the state there does not depend on the grouping)
            snaps = [i for i in range(start, len(self._out))
                     if isinstance(self._out[i], Snapshot)]
            for i in reversed(snaps[:-1]):
                del self._out[i]
        else:
            self._feed_group(run)

    def _feed_group(self, run: list[Batch]) -> None:
        """Consecutive batches in one pass."""
        first = run[0].records
        t0 = self._advance(int(first["ts_us"][0]) if len(first) else run[0].now_us)
        self.health.activate(t0, "first batch")
        if len(run) == 1:
            recs, floor, bounds = first, None, []
        else:
            sizes = [len(b.records) for b in run]
            recs = _joined([b.records for b in run])
            # As if fed one by one: a batch's records are no earlier than the batches before.
            floors = np.maximum.accumulate(
                np.array([self.now] + [b.now_us for b in run[:-1]], dtype=np.uint64))
            floor = np.repeat(floors, sizes)
            bounds = list(zip(np.cumsum(sizes)[:-1].tolist(), run[:-1], strict=True))
        if len(recs):
            self._process_records(recs, floor, bounds)  # now >= every record's time after it
        else:
            for _, b in bounds:
                self._batch_end(b)
        self._batch_end(run[-1])

    def _batch_end(self, b: Batch) -> None:
        t = self._advance(b.now_us)
        if b.counters is not None:
            self._agent_counters(t, b.counters)

    def _process_records(self, r: np.ndarray, floor: np.ndarray | None = None,
                         bounds: list[tuple[int, Batch]] | None = None) -> None:
        """Records of one batch, or of several (bounds: record index where each batch but the
        last ends, and that batch)."""
        ev = expand_records(r, self.now, floor)
        self.unknown_records += ev.unknown
        # The time each batch but the last reached (its records, even those with no event).
        bounds = [(i, int(ev.rec_ts[i - 1]) if i else 0, b) for i, b in bounds or []]
        if ev.ptr is None:
            if self.samples is not None:  # chunks only: they wait for their calls
                self.samples.feed(r, None, None, None, None, cols=(ev.kind, ev.flags),
                                  picks=ev.picks)
            for _, t, b in bounds:
                self.now = max(self.now, t)
                self._batch_end(b)
        else:
            mod = self.modmap.lookup(ev.caller)
            outcome, old_size, old_hook, old_mod, runs = self._track(
                ev.ptr, ev.etype == 1, ev.size, ev.ts, ev.caller, ev.hook, mod)
            if ev.failed is not None:
                outcome[ev.failed] = FAILURE
            if bounds and ev.rec is not None:  # record index -> index of its first event
                at = np.searchsorted(ev.rec, [i for i, _, _ in bounds]).tolist()
                bounds = [(k, t, b) for k, (_, t, b) in zip(at, bounds, strict=True)]
            pre = self.state.c
            bt = _Batch(ev.ts, ev.size, outcome, np.empty(0), np.empty(0), np.empty(0),
                        np.empty(0), ev.hook, old_hook, mod, old_mod, ev.rec)
            self._aggregate(r, bt, old_size, bounds)
            if self.samples is not None:
                # the event where live bytes first reached a new peak, if this batch has one
                peak = (int(np.argmax(bt.cur_b)) if self.state.c.peak_bytes > pre.peak_bytes
                        else None)
                self.samples.feed(r, ev.ptr, ev.etype, ev.rec, peak,
                                  None if peak is None else int(ev.ts[peak]),
                                  cols=(ev.kind, ev.flags), runs=runs, picks=ev.picks)
        self.now = max(self.now, ev.last_ts)

    # -- tracking: classify each event against the live set --
    def _track(self, p, isalloc, size, ts, caller, hook, mod):  # noqa: ANN001, ANN202
        """Outcome per event (time order) and the size/hook/module of the block each free or
        replacement ends; updates the live table. Exact per-event semantics, vectorised. Also
        the events grouped by pointer (classify.PointerRuns) when one classify saw them all,
        else None."""
        ms = len(p)
        if not ms:
            return (np.empty(0, np.uint8), np.empty(0, np.uint64), np.empty(0, np.uint8),
                    np.empty(0, np.uint16), None)
        if native.KERNELS is not None:  # event by event, compiled: the limit included
            return track_compiled(self.table, self.config.max_tracked, p, isalloc, size, ts,
                                  caller, hook, mod)
        cols = (size, ts, caller, hook, mod)
        cap = self.config.max_tracked
        c0 = self.table.count
        res = classify(self.table, p, isalloc, *cols)
        e = ms
        if c0 + int(np.count_nonzero(isalloc)) > cap:
            o = res[0]
            run = c0 + np.cumsum((o == NEW).astype(np.int64) - (o == FREE_T))
            over = run > cap
            if over.any():
                e = int(over.argmax())
        if e == ms:  # the usual case: classify's arrays are the results
            apply_plan(self.table, res[4], *cols)
            return res[:4] + (res[5],)
        out = np.empty(ms, np.uint8)
        osz = np.empty(ms, np.uint64)
        ohk = np.empty(ms, np.uint8)
        omd = np.empty(ms, np.uint16)
        # Tracking fills up in this batch: the exact (slower) path. Stretches that cannot
        # overflow (no more allocations than free room) still go vectorised.
        self._segment(0, e, p, isalloc, cols, out, osz, ohk, omd)
        acum = np.cumsum(isalloc, dtype=np.intp)
        i = e
        while i < ms:
            room = cap - self.table.count
            base = int(acum[i - 1]) if i else 0
            j = int(np.searchsorted(acum, base + room, side="right"))
            if j - i >= 32:
                self._segment(i, j, p, isalloc, cols, out, osz, ohk, omd)
                i = j
                continue
            stop = min(ms, i + 64)
            for k in range(i, stop):
                self._step(k, p, isalloc, cols, out, osz, ohk, omd)
            i = stop
        return out, osz, ohk, omd, None

    def _segment(self, i, j, p, isalloc, cols, out, osz, ohk, omd) -> None:  # noqa: ANN001
        if j <= i:
            return
        sc = tuple(c[i:j] for c in cols)
        res = classify(self.table, p[i:j], isalloc[i:j], *sc)
        out[i:j], osz[i:j], ohk[i:j], omd[i:j] = res[:4]
        apply_plan(self.table, res[4], *sc)

    def _step(self, k, p, isalloc, cols, out, osz, ohk, omd) -> None:  # noqa: ANN001
        t = self.table
        key = int(p[k])
        slot = t.find1(key) if t.count and key else -1
        size, ts, caller, hook, mod = (c[k] for c in cols)
        osz[k] = ohk[k] = omd[k] = 0
        if slot >= 0:
            old = t.get(np.array([slot]))
            osz[k], ohk[k], omd[k] = old.size[0], old.hook[0], old.module[0]
        if isalloc[k]:
            if slot >= 0:
                out[k] = REPLACE
                t.write(np.array([slot]), LiveColumns(p[k:k + 1], *(c[k:k + 1] for c in cols)))
            elif t.count < self.config.max_tracked:
                out[k] = NEW
                t.insert(LiveColumns(p[k:k + 1], *(c[k:k + 1] for c in cols)))
            else:
                out[k] = OVERFLOW
        elif slot >= 0:
            out[k] = FREE_T
            t.delete(np.array([slot], dtype=np.intp))
        else:
            out[k] = FREE_U

    # -- aggregation and outputs --
    def _aggregate(self, r: np.ndarray, bt: _Batch, old_size: np.ndarray,
                   bounds: list[tuple[int, int, Batch]]) -> None:
        cfg = self.config
        c0 = self.state.c
        o = bt.outcome
        bt.records = r
        bt.minus = old_size.view(np.int64)  # 0 except where a live block ends
        m = len(o)
        # Running sums relative to the state before the batch (bases added when read).
        if native.KERNELS is not None:
            acum = self._sums_native(bt, old_size)
        else:
            bt.to_new = O_PLUS.take(o)
            bt.plus = bt.size.view(np.int64) * bt.to_new  # (np.where is ~2x slower)
            bt.delta = bt.plus - bt.minus
            bt.cur_b = np.cumsum(bt.delta)
            # allocations (low 32 bits) and live-count change (high, signed) in one running sum
            both = np.cumsum(_ALLOC_DCOUNT.take(o))
            acum = both & 0xFFFFFFFF
            bt.cur_c = (both - acum) >> 32
            bt.counts = np.bincount(o, minlength=7)
        a0 = c0.total_allocations
        a_end = a0 + int(acum[-1])
        points: list[tuple[int, int, str]] = []
        every = cfg.csv_every_allocs
        first_mult = (a0 // every + 1) * every
        if first_mult <= a_end:
            pts = np.searchsorted(acum, np.arange(first_mult - a0, a_end - a0 + 1, every),
                                  side="left")
            # frees so far = allocations less the live count's change, less overflows
            fcum = (acum - bt.cur_c if not bt.counts[OVERFLOW]
                    else np.cumsum(O_FREE.take(o), dtype=np.int64))
            # the running peak only at the CSV points: the max of each stretch between them
            runmax_b = iter(np.maximum.accumulate(np.maximum.reduceat(
                bt.cur_b[:int(pts[-1]) + 1], np.concatenate(([0], pts[:-1] + 1)))).tolist())
            points += [(k, 2, "csv") for k in pts.tolist()]
        big = np.flatnonzero(bt.size > np.uint64(cfg.large_alloc_bytes))
        points += [(k, 1, "perf") for k in big[O_ALLOC[o[big]]].tolist()]
        if not self._overflow_warned and bt.counts[OVERFLOW]:
            points.append((int(np.argmax(o == OVERFLOW)), 0, "overflow"))
        fidx = np.flatnonzero(o == FAILURE) if bt.counts[FAILURE] else None
        if fidx is not None:
            points += self._failure_points(bt.ts[fidx], fidx)
        jevery = cfg.json_every_allocs
        last_mult = (a_end // jevery) * jevery
        if last_mult > a0:
            points.append((int(np.searchsorted(acum, last_mult - a0, side="left")), 3, "snap"))
        points += [(k, -1, "batch") for k, _, _ in bounds]  # before the next batch's events
        batches = deque((t, b) for _, t, b in bounds)
        points.sort()
        h = self.health
        snap_state, snap_at = None, 0
        for k, _prio, what in points:
            if what == "batch":
                tb, b = batches.popleft()  # time reached by the records before it
                self.now = max(self.now, tb)
                self._batch_end(b)
                continue
            t = int(bt.ts[k])
            h.advance(t)
            if what == "csv":
                b0 = c0.current_bytes
                self._csv_row(t, a0 + int(acum[k]), c0.total_frees + int(fcum[k]),
                              b0 + int(bt.cur_b[k]), max(c0.peak_bytes, b0 + next(runmax_b)))
            elif what == "perf":
                ri = k if bt.rec is None else int(bt.rec[k])
                heap = self.heap_names[self._heap_of_hook[int(bt.hook[k])]]
                h.log(t, "PERF", f"Large allocation: {int(bt.size[k])} bytes took "
                      f"{int(r['dur_us'][ri])} microseconds ({heap} heap, "
                      f"{self.modmap.name(int(bt.mod[k]))})", tid=int(r["tid"][ri]))
            elif what == "overflow":
                self._overflow_warned = True
                h.log(t, "WARN", f"Tracking limit reached ({cfg.max_tracked} live allocations): "
                      "further allocations are counted but not tracked")
                h.degrade_persistent(t, "tracking limit reached")
            elif what == "failwarn":
                self._last_fail_warn = t
                heap = self.heap_names[self._heap_of_hook[int(bt.hook[k])]]
                so_far = c0.allocation_failures + int(np.searchsorted(fidx, k, side="right"))
                h.log(t, "WARN", f"Allocation failure: {int(bt.size[k])} bytes ({heap} heap); "
                      f"{so_far} failures so far")
                h.degrade_transient(t, "allocation failures")
            elif what == "failtouch":
                h.degrade_transient(t, "allocation failures")
            elif what == "snap":
                snap_state = self._state_span(bt, self.state, 0, k + 1)
                snap_at = k + 1
                self._emit_snapshot(t, snap_state)
        if snap_state is None or snap_at == m:
            self.state = snap_state or self._state_span(bt, self.state, 0, m)
        else:
            self.state = self._state_span(bt, snap_state, snap_at, m)
        assert self.state.c.current_allocations == self.table.count

    @staticmethod
    def _sums_native(bt: _Batch, old_size: np.ndarray) -> np.ndarray:
        """_aggregate's running sums in one compiled pass (kernels.c nvsm_sums); returns the
        running count of allocations."""
        m = len(bt.outcome)
        bt.to_new = np.empty(m, bool)
        bt.plus, bt.delta, bt.cur_b, bt.cur_c, acum = (np.empty(m, np.int64) for _ in range(5))
        bt.counts = np.zeros(7, np.int64)
        a = [np.ascontiguousarray(bt.outcome, np.uint8), np.ascontiguousarray(bt.size, np.uint64),
             np.ascontiguousarray(old_size, np.uint64), *_SUMS_TABLES, bt.to_new, bt.plus,
             bt.delta, bt.cur_b, bt.cur_c, acum, bt.counts]
        native.KERNELS.nvsm_sums(m, *(x.ctypes.data for x in a))
        return acum

    def _failure_points(self, fts: np.ndarray, fidx: np.ndarray) -> list:
        """WARN lines for failures at most one per warn_interval of stream time; in between, the
        last failure before each line (and the batch's last) restarts the recovery timer."""
        iv = self.config.warn_interval_us
        visits = []
        nxt = 0 if self._last_fail_warn is None else self._last_fail_warn + iv
        while True:
            i = int(np.searchsorted(fts, np.uint64(max(nxt, 0)), side="left"))
            if i >= len(fts):
                break
            visits.append(i)
            nxt = int(fts[i]) + iv
        pts = [(int(fidx[i]), 0, "failwarn") for i in visits]
        touch = {v - 1 for v in visits if v > 0} | {len(fidx) - 1}
        pts += [(int(fidx[i]), 0, "failtouch") for i in touch if i not in visits]
        return pts

    def _state_span(self, bt: _Batch, base: State, lo: int, hi: int) -> State:
        """State after events [lo, hi) of the batch, given `base`, the state before event lo
        (self.state is still the state before the batch)."""
        cb = base.c
        pre = self.state.c  # the running sums are relative to the state before the batch
        k = len(self.modmap.modules)
        sf = (_span_compiled if native.KERNELS is not None else _span_numpy)(bt, lo, hi, k)
        n = sf.counts
        n_new, n_rep, n_ovf = int(n[NEW]), int(n[REPLACE]), int(n[OVERFLOW])
        c = Counters(
            total_allocations=cb.total_allocations + n_new + n_rep + n_ovf,
            total_frees=cb.total_frees + int(n[FREE_T]) + n_rep,
            current_allocations=pre.current_allocations + int(bt.cur_c[hi - 1]),
            peak_allocations=max(cb.peak_allocations, pre.current_allocations + sf.max_c),
            total_bytes_allocated=cb.total_bytes_allocated + sf.plus + sf.ovf_bytes,
            total_bytes_freed=cb.total_bytes_freed + sf.minus,
            current_bytes=pre.current_bytes + int(bt.cur_b[hi - 1]),
            peak_bytes=max(cb.peak_bytes, pre.current_bytes + sf.max_b),
            allocation_failures=cb.allocation_failures + int(n[FAILURE]),
            untracked_frees=cb.untracked_frees + int(n[FREE_U]),
            replaced_live=cb.replaced_live + n_rep,
            overflow_allocations=cb.overflow_allocations + n_ovf,
            overflow_bytes=cb.overflow_bytes + sf.ovf_bytes,
        )
        heap_cur, heap_peak = self._heaps_span(bt, base, lo, hi, sf.max_b)
        mod_cur = base.mod_cur + np.rint(sf.dm).astype(np.int64)
        # Size classes of the allocations: `plus` is the size of each NEW/REPLACE and 0 for every
        # other event, so those land in bin 0 and are taken out of its count.
        sc = sf.size_bins
        sc[0] -= hi - lo - n_new - n_rep
        o = bt.outcome[lo:hi] if n_ovf else None
        return State(c, heap_cur, heap_peak, mod_cur, base.size_count + sc,
                     self._largest_span(bt, base.largest, lo, hi, o, sf.max_plus))

    def _largest_span(self, bt: _Batch, top: np.ndarray, lo: int, hi: int,
                      o: np.ndarray | None, max_plus: int) -> np.ndarray:
        """`top` with the allocations of events [lo, hi) that rank among the LARGEST (o: their
        outcomes when some went past the tracking limit). Once the list is full, one comparison
        pass: few events beat its smallest entry."""
        plus = bt.plus[lo:hi]  # the size of each NEW/REPLACE, 0 elsewhere
        size = plus.view(np.uint64)
        if len(top) == LARGEST:
            thr = int(top["size"][-1])
            # usually nothing beats it: one reduction, no mask
            cand = np.flatnonzero(plus > thr) if max_plus > thr else plus[:0]
        else:
            thr = -1
            cand = np.flatnonzero(bt.to_new[lo:hi])
        if o is not None:  # allocations past the tracking limit count too
            sz = bt.size[lo:hi]
            extra = np.flatnonzero((o == OVERFLOW) & (sz.view(np.int64) > thr))
            if len(extra):
                cand = np.union1d(cand, extra)
                size = np.where(o == OVERFLOW, sz, size)
        if not len(cand):
            return top
        cs = size[cand]
        if len(cand) > LARGEST:  # those at least as large as the LARGEST-th, ties included
            keep = cs >= np.partition(cs, len(cs) - LARGEST)[len(cs) - LARGEST]
            cand, cs = cand[keep], cs[keep]
        cand = cand[np.lexsort((cand, -cs.view(np.int64)))][:LARGEST]  # size desc, then order
        k = cand + lo
        ri = k if bt.rec is None else bt.rec[k]
        r = bt.records
        new = np.zeros(len(k), _LARGEST_DTYPE)
        new["size"], new["ts"], new["hook"], new["mod"] = size[cand], bt.ts[k], bt.hook[k], \
            bt.mod[k]
        new["dur"], new["tid"], new["caller"] = r["dur_us"][ri], r["tid"][ri], r["caller"][ri]
        both = np.concatenate((top, new))
        return both[np.argsort(-both["size"].view(np.int64), kind="stable")[:LARGEST]]

    def _heaps_span(self, bt: _Batch, base: State, lo: int, hi: int,
                    max_b: int) -> tuple[np.ndarray, np.ndarray]:
        st = self.state  # before the batch: heap runs are relative to it
        cur, peak = base.heap_cur.copy(), base.heap_peak.copy()
        nh = len(self.meta.hooks)
        if self._single_heap and int(bt.hook.max()) < nh and int(bt.old_hook.max()) < nh:
            off = st.heap_cur[0]
            cur[0] = bt.cur_b[hi - 1] + off
            peak[0] = max(peak[0], max_b + off)
            return cur, peak
        if not bt.heap_runs:
            # Each event's delta goes to one heap (the new block's, or the freed block's): per
            # heap, the positions of its events and the running sum of their deltas. Only a
            # REPLACE across heaps splits: +size to the new heap, -old size to the old one.
            o = bt.outcome
            hp = self._heap_of_hook.take(bt.hook)
            hm = self._heap_of_hook.take(bt.old_hook)
            ev_heap = hm + (hp - hm) * bt.to_new  # where(to_new, hp, hm), mod 256: faster
            split = np.empty(0, np.intp)
            if bt.counts[REPLACE]:
                split = np.flatnonzero(o == REPLACE)
                split = split[hp[split] != hm[split]]
            if not len(split):  # usual case: per heap, its events and their running sum
                # (a pass per heap: heaps are a handful; ~3x faster than an argsort by heap)
                for h in range(len(self.heap_names)):
                    idx = np.flatnonzero(ev_heap == h)
                    if len(idx):
                        bt.heap_runs[h] = (idx, np.cumsum(bt.delta[idx]))
            else:  # a REPLACE across heaps: per heap, with the split parts added
                for h in range(len(self.heap_names)):
                    idx = np.flatnonzero(ev_heap == h)
                    d = bt.delta[idx]
                    both = np.isin(idx, split)
                    d[both] += bt.minus[idx[both]]  # the new heap gets +size only
                    extra = split[hm[split] == h]  # the old heap gets -old size
                    if len(extra):
                        idx = np.concatenate((idx, extra))
                        d = np.concatenate((d, -bt.minus[extra]))
                        o2 = np.argsort(idx, kind="stable")
                        idx, d = idx[o2], d[o2]
                    if len(idx):
                        bt.heap_runs[h] = (idx, np.cumsum(d))
        for h, (idx, run) in bt.heap_runs.items():
            a, b = np.searchsorted(idx, (lo, hi)).tolist()
            if b > a:
                cur[h] = st.heap_cur[h] + run[b - 1]
                peak[h] = max(peak[h], st.heap_cur[h] + int(run[a:b].max()))
        return cur, peak

    def _csv_row(self, t: int, allocs: int, frees: int, cur_b: int, peak_b: int,
                 final: bool = False) -> None:
        dt = t - self._sample_ts
        if dt > 0:  # Δt = 0 (a burst within one µs): keep the previous rates
            self.rate_allocs = (allocs - self._sample_allocs) * 1e6 / dt
            self.rate_frees = (frees - self._sample_frees) * 1e6 / dt
        self._sample_ts, self._sample_allocs, self._sample_frees = t, allocs, frees
        self._out.append(CsvRow(t, self.rate_allocs, self.rate_frees, cur_b, peak_b))

    # -- snapshots --
    def _make_snapshot(self, ts: int, st: State, final: bool = False) -> Snapshot:
        c, h = st.c, self.health
        avg = c.total_bytes_allocated / c.total_allocations if c.total_allocations else 0.0
        return Snapshot(
            ts_us=int(ts), status=h.status, is_healthy=h.is_healthy, uptime_seconds=ts / 1e6,
            total_allocations=c.total_allocations, total_frees=c.total_frees,
            current_allocations=c.current_allocations, peak_allocations=c.peak_allocations,
            total_bytes_allocated=c.total_bytes_allocated, total_bytes_freed=c.total_bytes_freed,
            current_bytes_allocated=c.current_bytes, peak_bytes_allocated=c.peak_bytes,
            allocation_failures=c.allocation_failures, average_allocation_size=avg,
            allocations_per_second=self.rate_allocs, frees_per_second=self.rate_frees,
            error_count=h.error_count, warning_count=h.warning_count,
            critical_count=h.critical_count, last_error=h.last_error,
            tracked_allocations=c.current_allocations,
            max_tracked_allocations=self.config.max_tracked,
            log_counts=dict(h.log_counts), final=final, monitor=self._monitor(st),
        )

    def _largest_entries(self, largest: np.ndarray) -> list[dict]:
        if largest is not self._largest_cache[0]:  # the list changes rarely once full
            out = []
            for size, ts, dur, tid, hook, mod, caller in largest.tolist():
                where = f"0x{caller:x}"
                if mod < len(self.modmap.modules):  # the module that held the caller then
                    m = self.modmap.modules[mod]
                    where = f"{m.name}+0x{caller - m.base:x}"
                out.append({"bytes": size, "time_us": ts, "duration_us": dur, "thread": tid,
                            "heap": self.heap_names[self._heap_of_hook[hook]], "caller": where,
                            "function": self.symbols.get(caller)})
            self._largest_cache = (largest, out)
        return [dict(x) for x in self._largest_cache[1]]

    def _monitor(self, st: State) -> dict:
        m, c = self.meta, st.c
        heaps = {name: {"current_bytes": int(st.heap_cur[i]), "peak_bytes": int(st.heap_peak[i])}
                 for i, name in enumerate(self.heap_names)
                 if name != "unknown" or st.heap_peak[i]}
        mods: dict[str, int] = {}
        for i, v in enumerate(st.mod_cur.tolist()):
            if v:
                name = self.modmap.name(i)
                mods[name] = mods.get(name, 0) + v
        mon = {
            "target": m.target, "pid": m.pid, "profile": m.profile, "arch": m.arch,
            "platform": m.platform, "mode": m.mode,
            "hooks_installed": list(self.hooks_installed),
            "hooks_failed": [dict(x) for x in self.hooks_failed],
            "degradation_causes": self.health.causes,
            "dropped_events": self.dropped,
            "untracked_frees": c.untracked_frees,
            "replaced_live": c.replaced_live,
            "untracked_allocations_overflow": c.overflow_allocations,
            "untracked_bytes_overflow": c.overflow_bytes,
            "unknown_records": self.unknown_records + self.agent.unknown_records,
            "agent_counters": dataclasses.asdict(self.agent),
            # issue 13 (docs/files.md): the ring's policy, stalls, lost frees, uncertain fates
            "on_full": m.extra.get("on_full"),
            "max_wait_ms": m.extra.get("max_wait_ms"),
            "stalls": self.agent.stalls,
            "stall_total_us": self.agent.stall_us,
            "stall_max_us": self.agent.stall_max_us,
            "stall_bursts": self.stall_bursts,
            "dropped_frees": self.agent.dropped_frees,
            "uncertain_fate_until_us": self.uncertain_until,
            "leaks": None if self.leak_summary is None else dict(self.leak_summary),
            "heaps": heaps,
            "modules_live_bytes": mods,
            "allocation_sizes": _size_classes(st),
            "largest_allocations": self._largest_entries(st.largest),
        }
        fp = m.extra.get("agent_footprint")
        if isinstance(fp, dict):  # live sessions since 0.3 (docs/agent.md, "Footprint")
            mon["agent_footprint"] = {k: fp[k] for k in ("committed_bytes", "reserved_bytes",
                                                         "ring_bytes") if k in fp}
        sp = self.samples
        if sp is not None:  # issue 11, only when sampling (docs/attribution.md): counts of the
            # sampled calls; the per-stack estimates go to the report, not the JSON
            mon["sampling"] = {"sample_bytes": sp.sample_bytes,
                               "sampled_allocations": sp.sampled_allocations,
                               "sampled_live_blocks": len(sp.live), "stacks": len(sp.stacks),
                               "stackless_samples": sp.stackless,
                               "discarded_stacks": sp.discarded_stacks}
        if self.interrupted:  # only then: the files of a complete replay stay as they were
            mon["interrupted"] = True
        a = self.addrspace
        if a is not None:  # ia32 targets only: absent when nothing was sampled
            mon["address_space"] = {
                "mapped_bytes": a.mapped, "committed_bytes": a.committed,
                "reserved_bytes": a.reserved, "free_bytes": a.free,
                "largest_free_bytes": a.largest_free, "limit_bytes": a.limit,
                "regions": a.regions, "min_largest_free_bytes": self.min_largest_free,
                "samples": self.addrspace_samples,
                "warn_below_bytes": self.addrspace_warn_bytes,
                "low": ADDRSPACE_LOW in self.health.conditions,
            }
        return mon


# The agent's note when replaceFast refused an entry point and Interceptor.replace took it
# (agent.js); Frida's own words end in "please file a bug", which is not the case here.
_SLOW_PATH = re.compile(r" ?\(slow path: Interceptor\.replace, replaceFast said: (.*)\)$")


def _were(n: int) -> str:
    return "was" if n == 1 else "were"


def plain_hook_detail(detail: str) -> str:
    """A hook's detail as the log says it: the slow-path fallback in plain words."""
    m = _SLOW_PATH.search(detail)
    if m is None:
        return detail
    said = m.group(1).removesuffix("; please file a bug")
    why = ("the function is too short for the jump of Frida's fast hook"
           if said.startswith("unable to intercept") else f"Frida's fast hook refused it: {said}")
    return (f"{detail[:m.start()]}; {why}, so it is hooked the slower way (Interceptor.replace, "
            "~0.8 µs more a call): harmless, every call is recorded")


@dataclass
class _StallBurst:
    """Stalls rising in consecutive batches: counters before it and at its latest rise."""

    first_t: int  # time of the batch before its first rise (stalls happened after it)
    last_t: int  # time of its latest rise
    start: AgentCounters
    end: AgentCounters = field(default_factory=AgentCounters)
    degraded: bool = False


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


@dataclass
class _SpanFigures:
    """What _state_span needs from events [lo, hi) of a batch, one pass over them."""

    counts: np.ndarray  # events per outcome
    max_c: int  # max of cur_c
    max_b: int  # max of cur_b
    max_plus: int
    plus: int  # sums (int64, wrapping as numpy's)
    minus: int
    ovf_bytes: int  # bytes of the allocations past the tracking limit
    dm: np.ndarray  # float64 per module (k + 1: unknown last): change of live bytes
    size_bins: np.ndarray  # _size_bins of plus, plus those of the OVERFLOW sizes


def _span_numpy(bt: _Batch, lo: int, hi: int, k: int) -> _SpanFigures:
    whole = lo == 0 and hi == len(bt.outcome)
    o = bt.outcome if whole else bt.outcome[lo:hi]
    plus, minus = (bt.plus, bt.minus) if whole else (bt.plus[lo:hi], bt.minus[lo:hi])
    n = bt.counts if whole else np.bincount(o, minlength=7)
    ovf = bt.size[lo:hi][o == OVERFLOW] if n[OVERFLOW] else None
    mp = np.minimum(bt.mod[lo:hi], k)
    mm = np.minimum(bt.old_mod[lo:hi], k)
    # As for heaps: each event's delta goes to one module (the new block's, or the freed
    # block's); only a REPLACE across modules splits (+size new, -old size old).
    delta = bt.delta if whole else bt.delta[lo:hi]
    tn = bt.to_new if whole else bt.to_new[lo:hi]
    em = mm + (mp - mm) * tn  # where(tn, mp, mm)
    if len(em) and em.min() == em.max():  # usually one module: no weighted bincount
        dm = np.zeros(k + 1)
        dm[em[0]] = delta.sum()
    else:
        dm = np.bincount(em, weights=delta, minlength=k + 1)
    if n[REPLACE]:
        rp = np.flatnonzero(o == REPLACE)
        rp = rp[mp[rp] != mm[rp]]
        if len(rp):
            w = minus[rp]
            dm += np.bincount(mp[rp], weights=w, minlength=k + 1) - np.bincount(
                mm[rp], weights=w, minlength=k + 1)
    sc = _size_bins(plus.view(np.uint64))
    if ovf is not None:
        sc += _size_bins(ovf)
    return _SpanFigures(n, int(bt.cur_c[lo:hi].max()), int(bt.cur_b[lo:hi].max()),
                        int(plus.max()), int(plus.sum()), int(minus.sum()),
                        int(ovf.sum(dtype=np.uint64)) if ovf is not None else 0, dm, sc)


def _span_compiled(bt: _Batch, lo: int, hi: int, k: int) -> _SpanFigures:
    """_span_numpy in one compiled pass (kernels.c nvsm_span): the same figures."""
    f = np.zeros(13, np.int64)
    dm, rep_a, rep_b = (np.zeros(k + 1) for _ in range(3))
    sc, sc_ovf = np.zeros(_SIZE_BINS, np.int64), np.zeros(_SIZE_BINS, np.int64)
    a = [np.ascontiguousarray(x, dt) for x, dt in (
        (bt.outcome, np.uint8), (bt.plus, np.int64), (bt.minus, np.int64),
        (bt.delta, np.int64), (bt.cur_b, np.int64), (bt.cur_c, np.int64),
        (bt.size, np.uint64), (bt.mod, np.uint16), (bt.old_mod, np.uint16),
        (bt.to_new, bool))]
    native.KERNELS.nvsm_span(lo, hi, *(x.ctypes.data for x in a), k,
                             *(x.ctypes.data for x in (f, dm, rep_a, rep_b, sc, sc_ovf)),
                             _SIZE_BINS)
    if f[OVERFLOW]:
        sc += sc_ovf
    return _SpanFigures(f[:7], int(f[7]), int(f[8]), int(f[12]), int(f[9]), int(f[10]),
                        int(f[11]) & (2**64 - 1), dm, sc)


def _size_bins(sizes: np.ndarray) -> np.ndarray:
    """Count per raw size bin of u64 sizes (the float64 exponent field). Bytes per class would
    cost a weighted bincount per batch (~1 % of ingest): counts only."""
    e = sizes.astype(np.float64).view(np.int64)
    e >>= 52  # in place: a second 0.5 MiB temporary per batch cost 4x the whole count
    return np.bincount(e, minlength=_SIZE_BINS)


def _size_classes(st: State) -> list[dict[str, int]]:
    """The JSON's monitor.allocation_sizes: the non-empty bit-length classes, smallest first."""
    def classes(raw: np.ndarray) -> np.ndarray:
        c = np.concatenate((raw[:1], raw[1023:1087]))  # bin 0: size 0; 1023 + e: 2**e ..
        c[64] += raw[1087]  # 2**64 - 1 rounds up to 2**64 as a float
        return c

    count = classes(st.size_count)
    out = []
    for k in np.flatnonzero(count).tolist():
        lo = (1 << (k - 1)) if k else 0
        out.append({"min_bytes": lo, "max_bytes": max(2 * lo - 1, 0),
                    "allocations": int(count[k])})
    return out


__all__ = ["Counters", "Engine", "EngineConfig", "State"]
