"""Property tests: the vectorised engine against an obviously-correct per-event reference model,
over random streams (reallocs, untracked and double frees, pointer reuse, failures, tiny
tracking limits), and independence from how the stream is cut into batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvse_monitor.engine import Engine, EngineConfig
from nvse_monitor.outputs.rows import CsvRow, LogLine, Snapshot
from nvse_monitor.stream.events import RECORD_DTYPE
from nvse_monitor.stream.messages import AgentCounters, Batch, HookInfo, Module, SessionMeta

pytestmark = pytest.mark.usefixtures("kernels")  # compiled and numpy paths

HOOKS = [HookInfo("malloc", "a", "alloc"), HookInfo("free", "a", "free"),
         HookInfo("game_alloc", "b", "alloc")]
MODS = [Module("one.so", 0x10000, 0x1000), Module("two.so", 0x20000, 0x1000)]
CALLERS = [0x10010, 0x10800, 0x20020, 0x90000]  # the last is in no module
HEAP_OF_HOOK = {0: "a", 1: "a", 2: "b"}


def meta() -> SessionMeta:
    return SessionMeta(target="prop", pid=7, arch="x64", platform="linux", profile="test",
                       hooks=list(HOOKS), modules=list(MODS))


def module_of(caller: int) -> str:
    for m in MODS:
        if m.base <= caller < m.base + m.size:
            return m.name
    return "unknown"


class Reference:
    """Per-event, dict-based model of the counter rules in docs/engine.md."""

    def __init__(self, cap: int, every: int, large: int) -> None:
        self.cap, self.every, self.large = cap, every, large
        self.live: dict[int, tuple[int, int, str]] = {}  # ptr -> (size, hook, module)
        self.c = dict(total_allocations=0, total_frees=0, peak_allocations=0,
                      total_bytes_allocated=0, total_bytes_freed=0, current_bytes=0,
                      peak_bytes=0, allocation_failures=0, untracked_frees=0, replaced_live=0,
                      overflow_allocations=0, overflow_bytes=0)
        self.heap_cur: dict[str, int] = {}
        self.heap_peak: dict[str, int] = {}
        self.mod_cur: dict[str, int] = {}
        self.now = 0
        self.rows: list[tuple] = []
        self.perf: list[tuple] = []
        self.s_ts = self.s_a = self.s_f = 0
        self.ra = self.rf = 0.0

    def _heap(self, heap: str, d: int) -> None:
        self.heap_cur[heap] = self.heap_cur.get(heap, 0) + d

    def _free_block(self, ptr: int) -> None:
        size, hook, mod = self.live.pop(ptr)
        c = self.c
        c["total_frees"] += 1
        c["total_bytes_freed"] += size
        c["current_bytes"] -= size
        self._heap(HEAP_OF_HOOK[hook], -size)
        self.mod_cur[mod] -= size

    def _alloc(self, t, ptr, size, hook, caller, tid, dur) -> None:
        c = self.c
        c["total_allocations"] += 1
        c["total_bytes_allocated"] += size
        if size > self.large:
            self.perf.append((t, tid, size, dur))
        tracked = True
        if ptr in self.live:
            c["replaced_live"] += 1
            self._free_block(ptr)
        elif len(self.live) >= self.cap:
            c["overflow_allocations"] += 1
            c["overflow_bytes"] += size
            tracked = False
        if tracked:
            mod = module_of(caller)
            self.live[ptr] = (size, hook, mod)
            c["current_bytes"] += size
            self._heap(HEAP_OF_HOOK[hook], size)
            self.mod_cur[mod] = self.mod_cur.get(mod, 0) + size
        self._peaks()
        if c["total_allocations"] % self.every == 0:
            dt = t - self.s_ts
            if dt > 0:
                self.ra = (c["total_allocations"] - self.s_a) * 1e6 / dt
                self.rf = (c["total_frees"] - self.s_f) * 1e6 / dt
            self.s_ts, self.s_a, self.s_f = t, c["total_allocations"], c["total_frees"]
            self.rows.append((t, self.ra, self.rf, c["current_bytes"], c["peak_bytes"]))

    def _free(self, ptr: int) -> None:
        if ptr in self.live:
            self._free_block(ptr)
        else:
            self.c["untracked_frees"] += 1
        self._peaks()

    def _peaks(self) -> None:
        c = self.c
        c["peak_allocations"] = max(c["peak_allocations"], len(self.live))
        c["peak_bytes"] = max(c["peak_bytes"], c["current_bytes"])
        for h, v in self.heap_cur.items():
            self.heap_peak[h] = max(self.heap_peak.get(h, 0), v)

    def feed(self, recs: np.ndarray) -> None:
        for r in recs.tolist():
            ts, ptr, old, size, caller, tid, dur, kind, hook, _flags, _seq = r
            t = self.now = max(self.now, ts)
            if kind == 1:
                if ptr:
                    self._alloc(t, ptr, size, hook, caller, tid, dur)
                else:
                    self.c["allocation_failures"] += 1
            elif kind == 2:
                if ptr:
                    self._free(ptr)
            elif kind == 3:
                if size and not ptr:
                    self.c["allocation_failures"] += 1
                    continue
                if old:
                    self._free(old)
                if size:
                    self._alloc(t, ptr, size, hook, caller, tid, dur)
            elif kind == 4:
                self.c["allocation_failures"] += 1


# -- random streams -------------------------------------------------------------------------------
record = st.tuples(
    st.sampled_from([1, 1, 1, 2, 2, 2, 3, 4]),  # kind
    st.integers(0, 9),  # ptr slot (0 = NULL)
    st.integers(0, 9),  # old ptr slot
    st.sampled_from([0, 1, 8, 24, 100, 4096, 5000]),  # size
    st.integers(0, 3),  # ts increment (0: same µs)
    st.integers(0, 2),  # hook
    st.integers(0, 3),  # caller
)


def build(recs: list[tuple]) -> np.ndarray:
    a = np.zeros(len(recs), RECORD_DTYPE)
    t = 0
    for i, (kind, p, o, size, dt, hook, caller) in enumerate(recs):
        t += dt
        a[i] = (t, p * 16, o * 16, size, CALLERS[caller], 100 + hook, size // 10, kind, hook, 0, i)
    return a


def run_engine(a: np.ndarray, cuts: list[int], cfg: EngineConfig) -> tuple[Engine, list]:
    eng = Engine(meta(), cfg)
    outs = eng.start()
    bounds = [0, *sorted({c % (len(a) + 1) for c in cuts} - {0}), len(a)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = a[lo:hi]
        if not len(part) and lo:
            continue  # an empty batch carries its own time; only the split matters here
        now = int(part["ts_us"].max()) if len(part) else 0
        outs += eng.feed(Batch(now, AgentCounters(), part))
        check_invariants(eng)
    outs += eng.finish()
    return eng, outs


def check_invariants(eng: Engine) -> None:
    s = eng.snapshot()
    c = eng.state.c
    assert s.current_allocations == eng.table.count == s.tracked_allocations
    assert s.current_allocations == s.total_allocations - s.total_frees - c.overflow_allocations
    assert s.current_bytes_allocated == (s.total_bytes_allocated - s.total_bytes_freed
                                         - c.overflow_bytes)
    assert s.peak_allocations >= s.current_allocations >= 0
    assert s.peak_bytes_allocated >= s.current_bytes_allocated >= 0
    assert min(s.total_frees, s.total_bytes_freed, s.allocation_failures,
               s.monitor["untracked_frees"]) >= 0
    for h in s.monitor["heaps"].values():
        assert h["peak_bytes"] >= h["current_bytes"] >= 0
    assert all(v > 0 for v in s.monitor["modules_live_bytes"].values())


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(record, max_size=120), st.lists(st.integers(0, 200), max_size=6),
       st.sampled_from([1, 2, 3, 5, 1000]), st.sampled_from([1, 2, 3, 7]))
def test_engine_matches_reference(recs, cuts, cap, every) -> None:
    a = build(recs)
    cfg = EngineConfig(max_tracked=cap, csv_every_allocs=every, json_every_allocs=every * 3,
                       large_alloc_bytes=4096)
    eng, outs = run_engine(a, cuts, cfg)
    ref = Reference(cap, every, 4096)
    ref.feed(a)
    final = outs[-1]
    assert isinstance(final, Snapshot) and final.final
    c = eng.state.c
    for k, v in ref.c.items():
        got = getattr(c, k)
        assert got == v, (k, got, v)
    assert final.current_allocations == len(ref.live)
    assert final.current_bytes_allocated == ref.c["current_bytes"]
    assert final.average_allocation_size == (
        ref.c["total_bytes_allocated"] / ref.c["total_allocations"]
        if ref.c["total_allocations"] else 0.0)
    rows = [(r.ts_us, r.allocs_per_sec, r.frees_per_sec, r.memory_usage, r.peak_memory)
            for r in outs if isinstance(r, CsvRow)]
    assert rows[:-1] == ref.rows  # the last row is the final one
    perf = [(x.ts_us, x.tid, x.message) for x in outs if isinstance(x, LogLine)
            and x.level == "PERF"]
    assert [(t, tid) for t, tid, _ in perf] == [(t, tid) for t, tid, _s, _d in ref.perf]
    assert [m.split(" (")[0] for _, _, m in perf] == [
        f"Large allocation: {s} bytes took {d} microseconds" for _t, _tid, s, d in ref.perf]
    heaps = final.monitor["heaps"]
    for h, v in ref.heap_cur.items():
        assert heaps[h]["current_bytes"] == v
        assert heaps[h]["peak_bytes"] == ref.heap_peak[h]
    assert final.monitor["modules_live_bytes"] == {k: v for k, v in ref.mod_cur.items() if v}
    # live_allocations() is exactly the reference's live set
    la = eng.live_allocations()
    assert la["ptr"].tolist() == sorted(ref.live)
    assert la["size"].tolist() == [ref.live[p][0] for p in sorted(ref.live)]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(record, min_size=1, max_size=150), st.lists(st.integers(0, 200), max_size=8),
       st.lists(st.integers(0, 200), max_size=8), st.sampled_from([2, 4, 1000]))
def test_batch_split_does_not_change_outputs(recs, cuts1, cuts2, cap) -> None:
    a = build(recs)
    cfg = EngineConfig(max_tracked=cap, csv_every_allocs=3, json_every_allocs=9,
                       large_alloc_bytes=4096, warn_interval_us=5, recovery_us=20)
    e1, o1 = run_engine(a, cuts1, cfg)
    e2, o2 = run_engine(a, cuts2, cfg)
    assert e1.state.c == e2.state.c
    assert [o for o in o1 if not isinstance(o, Snapshot)] == [
        o for o in o2 if not isinstance(o, Snapshot)]
    assert o1[-1] == o2[-1]  # final snapshots equal


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(record, min_size=1, max_size=150), st.lists(st.integers(0, 200), max_size=10),
       st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 12), max_size=4),
       st.sampled_from([2, 1000]))
def test_feed_many_gives_the_same_lines_and_rows(recs, cuts, extra, groups, cap) -> None:
    """Replay can feed runs of batches at once: same log lines and CSV rows as one by one,
    with batch times after their records, drops, and control messages between batches."""
    from nvse_monitor.stream.messages import ModuleEvent

    a = build(recs)
    bounds = [0, *sorted({c % (len(a) + 1) for c in cuts}), len(a)]
    msgs = []
    dropped = 0
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        part = a[lo:hi]
        now = (int(part["ts_us"].max()) if len(part) else 0) + extra[i % len(extra)] if extra else 0
        dropped += i % 3 == 1
        msgs.append(Batch(now, AgentCounters(dropped=dropped), part))
        if i in groups:
            msgs.append(ModuleEvent(now, "add", Module(f"m{i}.so", 0x40000 + i * 0x1000, 0x100)))
    cfg = EngineConfig(max_tracked=cap, csv_every_allocs=3, json_every_allocs=9,
                       large_alloc_bytes=4096, warn_interval_us=4, recovery_us=15)
    e1 = Engine(meta(), cfg)
    o1 = e1.start()
    for m in msgs:
        o1 += e1.feed(m)
    o1 += e1.finish()
    e2 = Engine(meta(), cfg)
    o2 = e2.start() + e2.feed_many(msgs) + e2.finish()
    assert [o for o in o1 if not isinstance(o, Snapshot)] == [
        o for o in o2 if not isinstance(o, Snapshot)]
    assert o1[-1] == o2[-1]
