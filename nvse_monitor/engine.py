"""The pure stats engine: stream messages in, outputs (log lines, CSV rows, snapshots) out.

No clock and no I/O: time comes only from the messages. Each Batch is processed with whole-array
numpy operations (docs/engine.md explains the steps and every counter rule):
1. records -> events: a realloc becomes free(old) + alloc(new); failures stay in place;
2. events are grouped by pointer (stable sort) so each event knows the state of its block from
   the previous event on the same pointer in the batch, or from the live table;
3. per-event deltas are cumulated in time order -> current/peak counts and bytes, CSV samples at
   every 1000th allocation, the 10,000-allocation snapshot point;
4. a short Python walk over the sparse points of interest (CSV rows, large allocations, failure
   reports, ...) emits the outputs in time order and drives the health machine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import BUILD_DATE, NAME, __version__
from .health import Health
from .modmap import ModuleMap
from .outputs import CsvRow, LogLine, Output, Snapshot
from .stream import (
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    ModuleEvent,
    SessionEnd,
    SessionMeta,
    StreamMessage,
)
from .tracking import LiveColumns, LiveTable

# Outcome of one event (after realloc expansion).
NEW = 1  # allocation, now tracked
REPLACE = 2  # allocation of a pointer already live: the old block counts as freed unseen
OVERFLOW = 3  # allocation while tracking is full: counted in totals, not tracked
FREE_T = 4  # free of a tracked block
FREE_U = 5  # free of a pointer not tracked (allocated before attach, double free, overflow)
FAILURE = 6  # allocation that returned NULL

_ALLOC, _FREE, _REALLOC, _FAILED = 1, 2, 3, 4


@dataclass
class EngineConfig:
    max_tracked: int = 8_000_000  # bound on live tracked allocations
    large_alloc_bytes: int = 1 << 20  # PERF line for allocations larger than this
    csv_every_allocs: int = 1000
    json_every_allocs: int = 10_000
    quiet_snapshot_us: int = 2_000_000  # snapshot at least this often (stream time) when quiet
    recovery_us: int = 30_000_000  # DEGRADED by transient causes -> ACTIVE after this long
    warn_interval_us: int = 1_000_000  # repeated WARN lines (failures, drops): at most one per


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

    def copy(self) -> State:
        return State(dataclasses.replace(self.c), self.heap_cur.copy(), self.heap_peak.copy(),
                     self.mod_cur.copy())


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
    heap_runs: dict[int, np.ndarray] = field(default_factory=dict)


class Engine:
    def __init__(self, meta: SessionMeta, config: EngineConfig | None = None) -> None:
        self.meta = meta
        self.config = config or EngineConfig()
        self.table = LiveTable()
        self._out: list[Output] = []
        self.health = Health(meta.pid, self.config.recovery_us, self._out)
        self.modmap = ModuleMap(meta.modules)
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
                           np.zeros(len(self.modmap.modules) + 1, np.int64))
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
        self.dropped = 0
        self._drops_unreported = 0
        self._last_drop_warn: int | None = None
        self._last_fail_warn: int | None = None
        self._overflow_warned = False
        self._hook_ok: dict[object, bool] = {}
        self._hooks_complete = False
        self.hooks_installed: list[str] = []
        self.hooks_failed: list[dict[str, str]] = []
        self._session_end: SessionEnd | None = None
        self._last_snap_ts: int | None = None
        self._last_snap_status = None
        self.started = False
        self.finished = False

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
        if isinstance(msg, Batch):
            self._feed_batch(msg)
        elif isinstance(msg, HookEvent):
            self._feed_hook(msg)
        elif isinstance(msg, ModuleEvent):
            self._feed_module(msg)
        elif isinstance(msg, AgentError):
            t = self._advance(msg.ts_us)
            self.health.fail(t, "ERROR", f"Agent error: {msg.message}", "agent error")
        elif isinstance(msg, SessionEnd):
            self._feed_end(msg)
        else:
            raise TypeError(f"not a stream message: {type(msg).__name__}")
        self._end_feed()
        return self._take()

    def note_write_failure(self, ts_us: int, path: str, error: str) -> list[Output]:
        if self.finished:
            return []
        t = self._advance(ts_us)
        self.health.log(t, "WARN", f"Failed to write {path}: {error}")
        self.health.degrade_transient(t, "output write failures")
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
        log(t, "INFO", f"Final statistics: {c.total_allocations} allocations, {c.total_frees} "
            f"frees, {c.total_bytes_allocated} bytes allocated, {c.total_bytes_freed} bytes freed, "
            f"{c.allocation_failures} failures")
        log(t, "INFO", f"Peak: {c.peak_allocations} live allocations, {c.peak_bytes} bytes")
        log(t, "INFO", f"Still live at end: {c.current_allocations} allocations, "
            f"{c.current_bytes} bytes")
        log(t, "INFO", f"Untracked frees: {c.untracked_frees}; dropped events: {self.dropped}; "
            f"untracked allocations (tracking full): {c.overflow_allocations}")
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
        hooks = ", ".join(f"{h.name} ({h.heap})" for h in m.hooks) or "none"
        log(t, "INFO", f"Hooks: {len(m.hooks)}: {hooks}")
        log(t, "INFO", f"Modules at start: {len(m.modules)}")
        log(t, "INFO", f"Tracking up to {cfg.max_tracked} live allocations; large allocation "
            f"threshold {cfg.large_alloc_bytes} bytes")
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
        detail = f" ({msg.detail})" if msg.detail else ""
        if msg.ok:
            h.log(t, "INFO", f"Hook installed: {msg.name}{detail}")
            self.hooks_installed.append(msg.name)
        else:
            h.log(t, "WARN", f"Hook failed: {msg.name}{detail}")
            self.hooks_failed.append({"name": msg.name, "detail": msg.detail})
        self._hook_ok[msg.hook if msg.hook >= 0 else ("name", msg.name)] = msg.ok
        nh = len(self.meta.hooks)
        if not self._hooks_complete and nh and all(i in self._hook_ok for i in range(nh)):
            self._hooks_complete = True
            ok = sum(self._hook_ok[i] for i in range(nh))
            if ok == 0:
                h.fail(t, "ERROR", f"All {nh} hooks failed to install", "all hooks failed")
                return
            h.log(t, "INFO", f"Hooks installed: {ok} of {nh}")
            if not msg.ok:
                h.degrade_persistent(t, f"hook {msg.name} failed")
            h.activate(t, "hooks installed")
        elif not msg.ok:
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
            self.health.log(t, "DEBUG", f"Module loaded: {m.name} at 0x{m.base:x} ({m.size} bytes)")
        else:
            self.modmap.remove(m)
            self.health.log(t, "DEBUG", f"Module unloaded: {m.name} at 0x{m.base:x}")

    def _feed_end(self, msg: SessionEnd) -> None:
        t = self._advance(msg.ts_us)
        self._session_end = msg
        if msg.counters is not None:
            self._agent_counters(t, msg.counters)
        if msg.expected:
            self.health.log(t, "INFO", f"Session ended: {msg.reason}")
        else:
            crash = f"; crash: {msg.crash}" if msg.crash else ""
            self.health.fail(t, "CRITICAL", f"Target lost unexpectedly: {msg.reason}{crash}",
                             "target lost")

    def _agent_counters(self, t: int, ac: AgentCounters) -> None:
        self.agent = ac
        new = ac.dropped - self.dropped
        if new > 0:
            self.dropped = ac.dropped
            self._drops_unreported += new
            self._report_drops(t)
            self.health.degrade_transient(t, "dropped events")
        else:
            self._report_drops(t)

    def _report_drops(self, t: int, force: bool = False) -> None:
        if not self._drops_unreported:
            return
        last = self._last_drop_warn
        if force or last is None or t - last >= self.config.warn_interval_us:
            self.health.log(t, "WARN", f"Dropped {self._drops_unreported} events (agent ring "
                            f"full); {self.dropped} dropped so far")
            self._drops_unreported = 0
            self._last_drop_warn = t

    # -- batches --
    def _feed_batch(self, b: Batch) -> None:
        recs = b.records
        t0 = self._advance(int(recs["ts_us"][0]) if len(recs) else b.now_us)
        self.health.activate(t0, "first batch")
        if len(recs):
            self._process_records(recs)
        t = self._advance(b.now_us)
        self._agent_counters(t, b.counters)

    def _process_records(self, r: np.ndarray) -> None:
        n = len(r)
        kind = r["kind"]
        ptr = r["ptr"]
        size = r["size"]
        ts = np.maximum.accumulate(r["ts_us"])  # publication order; keep output time monotonic
        if ts[0] < self.now:
            ts = np.maximum(ts, np.uint64(self.now))
        is_a = kind == _ALLOC
        is_f = kind == _FREE
        is_r = kind == _REALLOC
        nullres = ptr == 0
        allocish = is_a | (is_r & (size != 0))
        fail = (kind == _FAILED) | (allocish & nullres)
        apart = allocish & ~nullres
        any_r = bool(is_r.any())
        if any_r:
            old = r["old_ptr"]
            fpart = (is_f & ~nullres) | (is_r & (old != 0) & ~fail)
        else:
            fpart = is_f & ~nullres
        cnt = apart.view(np.int8) + fpart.view(np.int8) + fail.view(np.int8)
        self.unknown_records += int(np.count_nonzero(kind > _FAILED) + np.count_nonzero(kind == 0))
        if not any_r and bool((cnt == 1).all()):
            rec = None
            etype = np.where(fail, 2, np.where(fpart, 0, 1)).astype(np.int8)
            evp = ptr
        else:
            ci = cnt.astype(np.intp)
            rec = np.repeat(np.arange(n), ci)
            if not len(rec):
                return
            start = np.cumsum(ci) - ci
            j = np.arange(len(rec)) - start[rec]
            etype = np.where(fail[rec], 2, np.where(fpart[rec] & (j == 0), 0, 1)).astype(np.int8)
            freeptr = np.where(is_r, old, ptr) if any_r else ptr
            evp = np.where(etype == 0, freeptr[rec], ptr[rec])

        def g(a: np.ndarray) -> np.ndarray:
            return a if rec is None else a[rec]

        ev_ts, ev_size, ev_hook, ev_caller = g(ts), g(size), g(r["hook"]), g(r["caller"])
        m = len(ev_ts)
        nfail = int(np.count_nonzero(etype == 2))
        if nfail:
            tr = np.flatnonzero(etype != 2)
            s = (evp[tr], etype[tr] == 1, ev_size[tr], ev_ts[tr], ev_caller[tr], ev_hook[tr])
        else:
            s = (evp, etype == 1, ev_size, ev_ts, ev_caller, ev_hook)
        s_mod = self.modmap.lookup(s[4])
        out, osz, ohk, omd = self._track(*s, s_mod)
        if nfail:
            outcome = np.full(m, FAILURE, np.uint8)
            outcome[tr] = out
            old_size = np.zeros(m, np.uint64)
            old_size[tr] = osz
            old_hook = np.zeros(m, np.uint8)
            old_hook[tr] = ohk
            old_mod = np.zeros(m, np.uint16)
            old_mod[tr] = omd
            mod = np.zeros(m, np.uint16)
            mod[tr] = s_mod
        else:
            outcome, old_size, old_hook, old_mod, mod = out, osz, ohk, omd, s_mod
        self._aggregate(r, _Batch(ev_ts, ev_size, outcome, np.empty(0), np.empty(0), np.empty(0),
                                  np.empty(0), ev_hook, old_hook, mod, old_mod, rec), old_size)
        self.now = max(self.now, int(ts[-1]))

    # -- tracking: classify each event against the live set --
    def _track(self, p, isalloc, size, ts, caller, hook, mod):  # noqa: ANN001, ANN202
        """Outcome per event (time order) and the size/hook/module of the block each free or
        replacement ends; updates the live table. Exact per-event semantics, vectorised."""
        ms = len(p)
        out = np.empty(ms, np.uint8)
        osz = np.empty(ms, np.uint64)
        ohk = np.empty(ms, np.uint8)
        omd = np.empty(ms, np.uint16)
        if not ms:
            return out, osz, ohk, omd
        cols = (size, ts, caller, hook, mod)
        cap = self.config.max_tracked
        c0 = self.table.count
        res = self._classify(p, isalloc, *cols)
        e = ms
        if c0 + int(np.count_nonzero(isalloc)) > cap:
            o = res[0]
            run = c0 + np.cumsum((o == NEW).astype(np.int64) - (o == FREE_T))
            over = run > cap
            if over.any():
                e = int(over.argmax())
        if e == ms:
            out[:], osz[:], ohk[:], omd[:] = res[:4]
            self._apply(res[4], *cols)
            return out, osz, ohk, omd
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
        return out, osz, ohk, omd

    def _segment(self, i, j, p, isalloc, cols, out, osz, ohk, omd) -> None:  # noqa: ANN001
        if j <= i:
            return
        sc = tuple(c[i:j] for c in cols)
        res = self._classify(p[i:j], isalloc[i:j], *sc)
        out[i:j], osz[i:j], ohk[i:j], omd[i:j] = res[:4]
        self._apply(res[4], *sc)

    def _step(self, k, p, isalloc, cols, out, osz, ohk, omd) -> None:  # noqa: ANN001
        t = self.table
        key = int(p[k])
        slot = t.find1(key) if t.count else -1
        size, ts, caller, hook, mod = (c[k] for c in cols)
        osz[k] = ohk[k] = omd[k] = 0
        if slot >= 0:
            osz[k] = t.cols["size"][slot]
            ohk[k] = t.cols["hook"][slot]
            omd[k] = t.cols["module"][slot]
        if isalloc[k]:
            if slot >= 0:
                out[k] = REPLACE
                for name, v in zip(("size", "ts", "caller", "hook", "module"),
                                   (size, ts, caller, hook, mod), strict=True):
                    t.cols[name][slot] = v
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

    def _classify(self, p, isalloc, size, ts, caller, hook, mod):  # noqa: ANN001, ANN202
        """Outcomes of a run of events assuming no tracking limit, without touching the table.
        Events on one pointer are consecutive after a stable sort by pointer; an event's block
        state is the previous event's (an alloc leaves it live, a free leaves it not) or, for the
        first event of a pointer, whether the table holds it."""
        m = len(p)
        order = np.argsort(p, kind="stable")
        sp = p[order]
        first = np.empty(m, dtype=bool)
        first[0] = True
        np.not_equal(sp[1:], sp[:-1], out=first[1:])
        gstart = np.flatnonzero(first)
        slots = self.table.lookup(sp[gstart])
        found = slots >= 0
        sa = isalloc[order]
        live = np.empty(m, dtype=bool)
        live[1:] = sa[:-1]
        live[gstart] = found
        prev = np.empty(m, dtype=np.intp)
        prev[0] = 0
        prev[1:] = order[:-1]
        osz_s, ohk_s, omd_s = size[prev], hook[prev], mod[prev]
        fs = gstart[found]
        if len(fs):
            tv = self.table.get(slots[found])
            osz_s[fs] = tv.size
            ohk_s[fs] = tv.hook
            omd_s[fs] = tv.module
        res_s = np.where(sa, np.where(live, REPLACE, NEW), np.where(live, FREE_T, FREE_U))
        out = np.empty(m, np.uint8)
        out[order] = res_s
        osz = np.empty(m, np.uint64)
        osz[order] = osz_s
        ohk = np.empty(m, np.uint8)
        ohk[order] = ohk_s
        omd = np.empty(m, np.uint16)
        omd[order] = omd_s
        glast = np.empty(len(gstart), dtype=np.intp)
        glast[:-1] = gstart[1:] - 1
        glast[-1] = m - 1
        plan = (sp[gstart], slots, found, sa[glast], order[glast])
        return out, osz, ohk, omd, plan

    def _apply(self, plan, size, ts, caller, hook, mod) -> None:  # noqa: ANN001
        """Make the table match the end of the classified run."""
        keys, slots, found, fin, last = plan
        t = self.table
        upd = found & fin
        if upd.any():
            li = last[upd]
            t.write(slots[upd], LiveColumns(keys[upd], size[li], ts[li], caller[li], hook[li],
                                            mod[li]))
        dele = found & ~fin
        if dele.any():
            t.delete(slots[dele])
        ins = ~found & fin
        if ins.any():
            li = last[ins]
            t.insert(LiveColumns(keys[ins], size[li], ts[li], caller[li], hook[li], mod[li]))

    # -- aggregation and outputs --
    def _aggregate(self, r: np.ndarray, bt: _Batch, old_size: np.ndarray) -> None:
        cfg = self.config
        st0 = self.state
        c0 = st0.c
        o = bt.outcome
        is_new = o == NEW
        is_rep = o == REPLACE
        is_ft = o == FREE_T
        plus_m = is_new | is_rep
        cnt_alloc = plus_m | (o == OVERFLOW)
        cnt_free = is_ft | is_rep
        szi = bt.size.view(np.int64)
        bt.plus = np.where(plus_m, szi, 0)
        bt.minus = np.where(cnt_free, old_size.view(np.int64), 0)
        bt.cur_b = np.cumsum(bt.plus - bt.minus) + c0.current_bytes
        bt.cur_c = np.cumsum(is_new.view(np.int8).astype(np.int64) - is_ft) + \
            c0.current_allocations
        acum = np.cumsum(cnt_alloc) + c0.total_allocations
        m = len(o)
        a_end = int(acum[-1])
        points: list[tuple[int, int, str, int]] = []
        every = cfg.csv_every_allocs
        first_mult = (c0.total_allocations // every + 1) * every
        fcum = None
        pts = np.empty(0, np.intp)
        if first_mult <= a_end:
            pts = np.searchsorted(acum, np.arange(first_mult, a_end + 1, every), side="left")
            fcum = np.cumsum(cnt_free) + c0.total_frees
            runmax_b = np.maximum(np.maximum.accumulate(bt.cur_b), c0.peak_bytes)
            points += [(int(k), 2, "csv", i) for i, k in enumerate(pts)]
        big = np.flatnonzero(cnt_alloc & (bt.size > np.uint64(cfg.large_alloc_bytes)))
        points += [(int(k), 1, "perf", 0) for k in big]
        if not self._overflow_warned:
            ov = np.flatnonzero(o == OVERFLOW)
            if len(ov):
                points.append((int(ov[0]), 0, "overflow", 0))
        fidx = np.flatnonzero(o == FAILURE)
        if len(fidx):
            points += self._failure_points(bt.ts[fidx], fidx)
        jevery = cfg.json_every_allocs
        last_mult = (a_end // jevery) * jevery
        if last_mult > c0.total_allocations:
            points.append((int(np.searchsorted(acum, last_mult, side="left")), 3, "snap", 0))
        points.sort()
        h = self.health
        fail_cum = None
        for k, _prio, what, _arg in points:
            t = int(bt.ts[k])
            h.advance(t)
            if what == "csv":
                self._csv_row(t, int(acum[k]), int(fcum[k]), int(bt.cur_b[k]), int(runmax_b[k]))
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
                if fail_cum is None:
                    fail_cum = np.cumsum(o == FAILURE) + c0.allocation_failures
                self._last_fail_warn = t
                heap = self.heap_names[self._heap_of_hook[int(bt.hook[k])]]
                h.log(t, "WARN", f"Allocation failure: {int(bt.size[k])} bytes ({heap} heap); "
                      f"{int(fail_cum[k])} failures so far")
                h.degrade_transient(t, "allocation failures")
            elif what == "failtouch":
                h.degrade_transient(t, "allocation failures")
            elif what == "snap":
                self._emit_snapshot(t, self._state_after(bt, k + 1))
        self.state = self._state_after(bt, m)
        assert self.state.c.current_allocations == self.table.count

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
        pts = [(int(fidx[i]), 0, "failwarn", 0) for i in visits]
        touch = {v - 1 for v in visits if v > 0} | {len(fidx) - 1}
        pts += [(int(fidx[i]), 0, "failtouch", 0) for i in touch if i not in visits]
        return pts

    def _state_after(self, bt: _Batch, e: int) -> State:
        """State after the first e events of the batch."""
        c0 = self.state.c
        o = bt.outcome[:e]
        plus, minus = bt.plus[:e], bt.minus[:e]
        c = Counters()
        n_new = int(np.count_nonzero(o == NEW))
        n_rep = int(np.count_nonzero(o == REPLACE))
        ovf = o == OVERFLOW
        n_ovf = int(np.count_nonzero(ovf))
        ovf_bytes = int(bt.size[:e][ovf].sum(dtype=np.uint64)) if n_ovf else 0
        c.total_allocations = c0.total_allocations + n_new + n_rep + n_ovf
        c.total_frees = c0.total_frees + int(np.count_nonzero(o == FREE_T)) + n_rep
        c.current_allocations = int(bt.cur_c[e - 1])
        c.peak_allocations = max(c0.peak_allocations, int(bt.cur_c[:e].max()))
        c.total_bytes_allocated = c0.total_bytes_allocated + int(plus.sum()) + ovf_bytes
        c.total_bytes_freed = c0.total_bytes_freed + int(minus.sum())
        c.current_bytes = int(bt.cur_b[e - 1])
        c.peak_bytes = max(c0.peak_bytes, int(bt.cur_b[:e].max()))
        c.allocation_failures = c0.allocation_failures + int(np.count_nonzero(o == FAILURE))
        c.untracked_frees = c0.untracked_frees + int(np.count_nonzero(o == FREE_U))
        c.replaced_live = c0.replaced_live + n_rep
        c.overflow_allocations = c0.overflow_allocations + n_ovf
        c.overflow_bytes = c0.overflow_bytes + ovf_bytes
        heap_cur, heap_peak = self._heaps_after(bt, e)
        k = len(self.modmap.modules)
        mp = np.minimum(bt.mod[:e], k)
        mm = np.minimum(bt.old_mod[:e], k)
        dm = np.bincount(mp, weights=plus, minlength=k + 1) - np.bincount(
            mm, weights=minus, minlength=k + 1)
        mod_cur = self.state.mod_cur + np.rint(dm).astype(np.int64)
        return State(c, heap_cur, heap_peak, mod_cur)

    def _heaps_after(self, bt: _Batch, e: int) -> tuple[np.ndarray, np.ndarray]:
        st = self.state
        cur, peak = st.heap_cur.copy(), st.heap_peak.copy()
        if self._single_heap and int(bt.hook.max()) < len(self.meta.hooks) and (
                not len(bt.old_hook) or int(bt.old_hook.max()) < len(self.meta.hooks)):
            run = bt.cur_b[:e] - st.c.current_bytes + cur[0]
            cur[0] = run[-1]
            peak[0] = max(peak[0], int(run.max()))
            return cur, peak
        if not bt.heap_runs:
            hp = self._heap_of_hook[bt.hook]
            hm = self._heap_of_hook[bt.old_hook]
            for hi in range(len(self.heap_names)):
                d = np.where(hp == hi, bt.plus, 0) - np.where(hm == hi, bt.minus, 0)
                if d.any():
                    bt.heap_runs[hi] = np.cumsum(d)
        for hi, run in bt.heap_runs.items():
            cur[hi] = st.heap_cur[hi] + run[e - 1]
            peak[hi] = max(peak[hi], st.heap_cur[hi] + int(run[:e].max()))
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
        return {
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
            "unknown_records": self.unknown_records,
            "agent_counters": dataclasses.asdict(self.agent),
            "heaps": heaps,
            "modules_live_bytes": mods,
        }


__all__ = ["Engine", "EngineConfig", "Counters", "LogLine"]
