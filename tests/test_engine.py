"""Counter rules of the engine on hand-built record arrays (docs/engine.md, "Counters")."""

from __future__ import annotations

import numpy as np
import pytest

from nvse_monitor.engine import Engine, EngineConfig
from nvse_monitor.outputs.rows import CsvRow, LogLine, Snapshot
from nvse_monitor.stream.events import RECORD_DTYPE
from nvse_monitor.stream.messages import AgentCounters, Batch, HookInfo, Module, SessionMeta

pytestmark = pytest.mark.usefixtures("kernels")  # compiled and numpy paths

A, F, R, X = 1, 2, 3, 4
HOOKS = [HookInfo("malloc", "libc", "alloc"), HookInfo("free", "libc", "free"),
         HookInfo("GameHeap::Allocate", "game", "alloc")]


def meta(**kw) -> SessionMeta:
    d = dict(target="t.exe", pid=1234, arch="ia32", platform="windows", profile="fnv",
             hooks=list(HOOKS), modules=[Module("FalloutNV.exe", 0x400000, 0x1000000),
                                         Module("plugin.dll", 0x10000000, 0x10000)])
    d.update(kw)
    return SessionMeta(**d)


def recs(*rows) -> np.ndarray:
    """rows: (kind, ptr, size, ts) or (kind, ptr, size, ts, dict of other fields)."""
    a = np.zeros(len(rows), RECORD_DTYPE)
    for i, row in enumerate(rows):
        kind, ptr, size, ts = row[:4]
        a[i]["kind"], a[i]["ptr"], a[i]["size"], a[i]["ts_us"] = kind, ptr, size, ts
        a[i]["caller"] = 0x401000
        a[i]["seq"] = i
        for k, v in (row[4] if len(row) > 4 else {}).items():
            a[i][k] = v
    return a


def batch(a: np.ndarray, now: int | None = None, **counters) -> Batch:
    if now is None:
        now = int(a["ts_us"].max()) if len(a) else 0
    return Batch(now, AgentCounters(**counters), a)


def run(*batches, config: EngineConfig | None = None, finish: bool = True,
        m: SessionMeta | None = None) -> tuple[Engine, list]:
    e = Engine(m or meta(), config)
    out = e.start()
    for b in batches:
        out += e.feed(b)
    if finish:
        out += e.finish()
    return e, out


def logs(out, level=None) -> list[LogLine]:
    return [o for o in out if isinstance(o, LogLine) and (level is None or o.level == level)]


def test_alloc_free_counters_and_peaks() -> None:
    e, out = run(batch(recs((A, 0x10, 100, 1), (A, 0x20, 50, 2), (F, 0x10, 0, 3),
                            (A, 0x30, 10, 4))))
    s = out[-1]
    assert isinstance(s, Snapshot) and s.final
    assert (s.total_allocations, s.total_frees, s.current_allocations, s.peak_allocations) == (
        3, 1, 2, 2)
    assert (s.total_bytes_allocated, s.total_bytes_freed, s.current_bytes_allocated,
            s.peak_bytes_allocated) == (160, 100, 60, 150)
    assert s.average_allocation_size == pytest.approx(160 / 3)
    assert s.tracked_allocations == 2 and s.max_tracked_allocations == 8_000_000


def test_realloc_is_free_plus_alloc_and_null_and_zero_forms() -> None:
    e, out = run(batch(recs(
        (A, 0x10, 100, 1),
        (R, 0x40, 300, 2, {"old_ptr": 0x10}),  # move: free 0x10 (100), alloc 0x40 (300)
        (R, 0x50, 8, 3, {"old_ptr": 0}),  # realloc(NULL, 8) = alloc
        (R, 0x0, 0, 4, {"old_ptr": 0x50}),  # realloc(p, 0) = free, result ignored
        (R, 0x0, 64, 5, {"old_ptr": 0x40}),  # realloc that failed: old block stays live
    )))
    c = e.state.c
    assert (c.total_allocations, c.total_frees, c.current_allocations) == (3, 2, 1)
    assert (c.total_bytes_allocated, c.total_bytes_freed, c.current_bytes) == (408, 108, 300)
    assert c.allocation_failures == 1
    assert e.live_allocations()["ptr"].tolist() == [0x40]


def test_realloc_in_place_keeps_pointer_with_new_size() -> None:
    e, _ = run(batch(recs((A, 0x10, 100, 1), (R, 0x10, 200, 2, {"old_ptr": 0x10}))))
    la = e.live_allocations()
    assert la["ptr"].tolist() == [0x10] and la["size"].tolist() == [200]
    assert e.state.c.peak_bytes == 200  # the free of the old size comes first


def test_untracked_and_double_frees_change_nothing_else() -> None:
    e, out = run(batch(recs((F, 0x99, 0, 1), (A, 0x10, 5, 2), (F, 0x10, 0, 3),
                            (F, 0x10, 0, 4))))
    s = out[-1]
    assert s.monitor["untracked_frees"] == 2
    assert (s.total_frees, s.current_allocations, s.total_bytes_freed) == (1, 0, 5)


def test_alloc_of_live_pointer_replaces_it_as_a_free() -> None:
    e, out = run(batch(recs((A, 0x10, 100, 1))), batch(recs((A, 0x10, 30, 2))))
    s = out[-1]
    assert s.monitor["replaced_live"] == 1
    assert (s.total_allocations, s.total_frees, s.current_allocations) == (2, 1, 1)
    assert (s.total_bytes_freed, s.current_bytes_allocated, s.peak_bytes_allocated) == (100, 30,
                                                                                         100)


def test_failures_count_and_are_not_allocations() -> None:
    e, out = run(batch(recs((X, 0, 1 << 30, 1), (A, 0, 16, 2), (A, 0x10, 1, 3))))
    s = out[-1]
    assert s.allocation_failures == 2 and s.total_allocations == 1


def test_tracking_limit_counts_overflow_and_warns_once() -> None:
    cfg = EngineConfig(max_tracked=2)
    e, out = run(batch(recs((A, 0x10, 1, 1), (A, 0x20, 2, 2), (A, 0x30, 4, 3), (A, 0x40, 8, 4),
                            (F, 0x30, 0, 5), (F, 0x10, 0, 6), (A, 0x50, 16, 7))),
                 config=cfg)
    c = e.state.c
    assert c.overflow_allocations == 2 and c.overflow_bytes == 12
    assert c.total_allocations == 5 and c.current_allocations == 2
    assert c.untracked_frees == 1  # 0x30 was never tracked
    assert c.current_bytes == c.total_bytes_allocated - c.total_bytes_freed - c.overflow_bytes
    assert sorted(e.live_allocations()["ptr"].tolist()) == [0x20, 0x50]
    warns = [x for x in logs(out, "WARN") if "Tracking limit" in x.message]
    assert len(warns) == 1 and warns[0].ts_us == 3
    # untracked allocations still count in the size classes and the largest allocations
    mon = out[-1].monitor
    assert [(c["min_bytes"], c["allocations"]) for c in mon["allocation_sizes"]] == [
        (1, 1), (2, 1), (4, 1), (8, 1), (16, 1)]
    assert [(x["bytes"], x["time_us"]) for x in mon["largest_allocations"]] == [
        (16, 7), (8, 4), (4, 3), (2, 2), (1, 1)]


def test_tracking_limit_slow_path_matches_reference_on_a_long_stream() -> None:
    # Long enough that vectorised stretches run between per-event steps near the limit.
    from test_engine_props import Reference  # noqa: PLC0415

    rng = np.random.default_rng(5)
    n = 20_000
    a = np.zeros(n, RECORD_DTYPE)
    a["kind"] = rng.choice([A, A, F, R], n)
    a["ptr"] = rng.integers(1, 2000, n, dtype=np.uint64) * 16
    a["old_ptr"] = rng.integers(0, 2000, n, dtype=np.uint64) * 16
    a["size"] = rng.integers(0, 100, n, dtype=np.uint64)
    a["ts_us"] = np.arange(n)
    a["caller"] = 0x10010
    cfg = EngineConfig(max_tracked=600, csv_every_allocs=100)
    e, out = run(*(batch(a[i:i + 3000]) for i in range(0, n, 3000)), config=cfg)
    ref = Reference(600, 100, 1 << 20)
    ref.feed(a)
    for k, v in ref.c.items():
        assert getattr(e.state.c, k) == v, k
    rows = [(r.ts_us, r.allocs_per_sec, r.frees_per_sec, r.memory_usage, r.peak_memory)
            for r in out if isinstance(r, CsvRow)]
    assert rows[:-1] == ref.rows


def test_csv_row_every_1000th_allocation_with_interval_rates() -> None:
    n = 2800
    a = recs(*[(A, 0x10 * (i + 1), 8, 10 * (i + 1)) for i in range(n)])
    a[1500:1800]["kind"] = F  # 300 frees (of pointers never seen: untracked, not counted)
    a[1800:2100]["kind"] = F
    a[1800:2100]["ptr"] = a[0:300]["ptr"]  # 300 tracked frees
    e, out = run(batch(a))
    rows = [o for o in out if isinstance(o, CsvRow)]
    # allocations: records 0-1499, then 2100-2799: the 1000th is record 999, the 2000th 2599
    assert [r.ts_us for r in rows[:-1]] == [10_000, 26_000]
    assert rows[0].allocs_per_sec == pytest.approx(1000 / 0.01)
    assert rows[0].frees_per_sec == 0
    # second interval: 1000 allocs and 300 tracked frees in 16 ms
    assert rows[1].allocs_per_sec == pytest.approx(1000 / 0.016)
    assert rows[1].frees_per_sec == pytest.approx(300 / 0.016)
    assert rows[-1].ts_us == out[-1].ts_us  # final row at finish
    assert rows[1].memory_usage == 1700 * 8 and rows[1].peak_memory == 1700 * 8


def test_csv_rate_with_zero_interval_keeps_previous_rates() -> None:
    a = recs(*[(A, 0x10 * (i + 1), 8, 5) for i in range(2000)])
    cfg = EngineConfig(csv_every_allocs=1000)
    e, out = run(batch(a), config=cfg)
    rows = [o for o in out if isinstance(o, CsvRow)]
    assert rows[0].allocs_per_sec == pytest.approx(1000 / 5e-6)
    assert rows[1].allocs_per_sec == rows[0].allocs_per_sec  # Δt = 0: carried over


def test_snapshot_every_10000_allocations_at_that_allocation() -> None:
    a = recs(*[(A, 0x10 * (i + 1), 1, i + 1) for i in range(25_000)])
    e, out = run(batch(a[:12_000]), batch(a[12_000:]), finish=False)
    snaps = [o for o in out if isinstance(o, Snapshot)]
    at = {s.ts_us: s for s in snaps}
    assert at[10_000].total_allocations == 10_000  # exact state at the 10,000th allocation
    assert at[20_000].total_allocations == 20_000
    assert at[20_000].current_bytes_allocated == 20_000


def test_quiet_stream_still_snapshots_and_uptime_advances() -> None:
    e = Engine(meta(), EngineConfig(quiet_snapshot_us=2_000_000))
    e.start()
    out = e.feed(batch(recs((A, 0x10, 1, 1))))
    assert any(isinstance(o, Snapshot) for o in out)
    assert not any(isinstance(o, Snapshot) for o in e.feed(batch(recs(), now=1_500_000)))
    snaps = [o for o in e.feed(batch(recs(), now=2_100_000)) if isinstance(o, Snapshot)]
    assert len(snaps) == 1 and snaps[0].uptime_seconds == pytest.approx(2.1)


def test_perf_line_for_large_allocations_only() -> None:
    a = recs((A, 0x10, 1 << 20, 1, {"dur_us": 7, "tid": 99}),
             (A, 0x20, (1 << 20) + 1, 2, {"dur_us": 1250, "tid": 77, "hook": 2}),
             (R, 0x30, 2 << 20, 3, {"old_ptr": 0x20, "dur_us": 5, "tid": 78}))
    e, out = run(batch(a))
    perf = logs(out, "PERF")
    assert [p.tid for p in perf] == [77, 78]
    assert perf[0].message.startswith("Large allocation: 1048577 bytes took 1250 microseconds")
    assert "game heap" in perf[0].message and "FalloutNV.exe" in perf[0].message
    assert out[-1].log_counts["PERF"] == 2


def test_time_never_goes_backwards_in_outputs() -> None:
    a = recs((A, 0x10, 1, 50), (A, 0x20, 1, 40), (X, 0, 5, 45))  # threads publish out of order
    e, out = run(batch(a))
    ts = [o.ts_us for o in out]
    assert ts == sorted(ts)
    assert [x.ts_us for x in logs(out, "WARN")] == [50]


def test_per_heap_and_per_module_live_bytes() -> None:
    a = recs((A, 0x10, 100, 1, {"hook": 0, "caller": 0x10000010}),
             (A, 0x20, 7, 2, {"hook": 2, "caller": 0x401000}),
             (A, 0x30, 5, 3, {"hook": 2, "caller": 0x5}),
             (F, 0x10, 0, 4, {"hook": 1}))
    e, out = run(batch(a))
    mon = out[-1].monitor
    assert mon["heaps"]["libc"] == {"current_bytes": 0, "peak_bytes": 100}
    assert mon["heaps"]["game"] == {"current_bytes": 12, "peak_bytes": 12}
    assert mon["modules_live_bytes"] == {"FalloutNV.exe": 7, "unknown": 5}


def test_module_loaded_later_gets_attribution() -> None:
    from nvse_monitor.stream.messages import ModuleEvent

    e = Engine(meta())
    e.start()
    e.feed(ModuleEvent(1, "add", Module("late.dll", 0x20000000, 0x1000)))
    e.feed(batch(recs((A, 0x10, 9, 2, {"caller": 0x20000100}))))
    e.feed(ModuleEvent(3, "remove", Module("late.dll", 0x20000000, 0x1000)))
    e.feed(batch(recs((A, 0x20, 4, 4, {"caller": 0x20000100}))))
    assert e.snapshot().monitor["modules_live_bytes"] == {"late.dll": 9, "unknown": 4}


def test_monitor_section_has_session_facts_and_agent_counters() -> None:
    e, out = run(batch(recs((A, 0x10, 1, 1)), allocs=1, published=1))
    mon = out[-1].monitor
    assert (mon["target"], mon["pid"], mon["profile"], mon["arch"]) == ("t.exe", 1234, "fnv",
                                                                        "ia32")
    assert mon["agent_counters"]["allocs"] == 1 and mon["dropped_events"] == 0


def test_log_counts_count_every_line_by_level() -> None:
    e, out = run(batch(recs((A, 0x10, 2 << 20, 1), (X, 0, 1, 2))))
    lines = logs(out)
    final = out[-1]
    for lvl in final.log_counts:
        assert final.log_counts[lvl] == sum(1 for x in lines if x.level == lvl)
    assert final.warning_count == final.log_counts["WARN"] == 1


def test_monitor_lines_use_pid_as_tid_and_banner_comes_first() -> None:
    e, out = run(batch(recs((A, 0x10, 1, 1))))
    lines = logs(out)
    assert all(x.tid == 1234 for x in lines if x.level != "PERF")
    msgs = [x.message for x in lines[:9]]
    assert any("Process ID: 1234" in x for x in msgs) and any("Profile: fnv" in x for x in msgs)
    assert any("malloc (libc)" in x for x in msgs)


def test_finish_is_idempotent_and_feed_after_finish_is_ignored() -> None:
    e, out = run(batch(recs((A, 0x10, 1, 1))))
    assert e.finish() == [] and e.feed(batch(recs((A, 0x20, 1, 2)))) == []
    assert sum(isinstance(o, Snapshot) and o.final for o in out) == 1


def test_unknown_record_kinds_are_counted_not_applied() -> None:
    e, out = run(batch(recs((9, 0x10, 1, 1), (0, 0x20, 1, 2))))
    assert out[-1].monitor["unknown_records"] == 2 and out[-1].total_allocations == 0


def test_pointers_with_colliding_grouping_hashes_match_reference() -> None:
    from test_engine_props import Reference  # noqa: PLC0415
    from test_tracking import _colliding  # noqa: PLC0415

    rng = np.random.default_rng(11)
    ptrs = _colliding(8)
    n = 3000
    a = np.zeros(n, RECORD_DTYPE)
    a["kind"] = rng.choice([A, A, F, R], n)
    a["ptr"] = rng.choice(ptrs, n)
    a["old_ptr"] = rng.choice(ptrs, n)
    a["size"] = rng.integers(1, 50, n, dtype=np.uint64)
    a["ts_us"] = np.arange(n)
    a["caller"] = 0x10010
    cfg = EngineConfig(csv_every_allocs=50)
    e, out = run(*(batch(a[i:i + 700]) for i in range(0, n, 700)), config=cfg)
    ref = Reference(1 << 30, 50, 1 << 20)
    ref.feed(a)
    for k, v in ref.c.items():
        assert getattr(e.state.c, k) == v, k
    assert e.live_allocations()["ptr"].tolist() == sorted(ref.live)


@pytest.mark.parametrize("name", ["synthetic-mixed", "synthetic-small", "live-x64", "live-ia32"])
def test_feed_many_on_a_bundled_recording_matches_feed(name) -> None:
    from pathlib import Path

    from nvse_monitor.stream.recording import read_recording

    path = Path(__file__).parent.parent / "fixtures" / f"{name}.nvmrec"
    meta_, msgs = read_recording(path)
    lines, _e1, _e2 = assert_feed_many_matches_feed(meta_, msgs, run=50)
    assert len(lines) > 20


def assert_feed_many_matches_feed(meta_, msgs, run: int | None = None):
    """One engine fed message by message, another by feed_many (in runs of `run` messages as a
    replay hands over a chunk's, or all at once): the same lines and the same final snapshot.
    Returns the lines and both engines."""
    e1 = Engine(meta_)
    o1 = e1.start()
    for m in msgs:
        o1 += e1.feed(m)
    o1 += e1.finish()
    e2 = Engine(meta_)
    o2 = e2.start()
    step = run or max(1, len(msgs))
    for i in range(0, len(msgs), step):
        o2 += e2.feed_many(msgs[i:i + step])
    o2 += e2.finish()
    lines1 = [o for o in o1 if not isinstance(o, Snapshot)]
    assert lines1 == [o for o in o2 if not isinstance(o, Snapshot)]
    assert o1[-1] == o2[-1]
    return lines1, e1, e2


def test_banner_lines_and_plugins_are_logged_as_info():
    from nvse_monitor.engine import Engine
    from nvse_monitor.stream.messages import Module, ModuleEvent, SessionMeta

    meta = SessionMeta(target="FalloutNV.exe", pid=7, arch="ia32", platform="windows",
                       profile="fnv-1.4.0.525",
                       extra={"banner": ["Game: FalloutNV.exe 1.4.0.525", "NVSE: 6.3.1"]})
    e = Engine(meta)
    lines = [(o.level, o.message) for o in e.start() if hasattr(o, "level")]
    assert ("INFO", "Game: FalloutNV.exe 1.4.0.525") in lines and ("INFO", "NVSE: 6.3.1") in lines
    plugin = Module("jip_nvse.dll", 0x10000000, 0x1000,
                    r"C:\Games\FNV\Data\NVSE\Plugins\jip_nvse.dll")
    other = Module("d3d9.dll", 0x20000000, 0x1000, r"C:\Windows\SysWOW64\d3d9.dll")
    # spawn mode: NVSE and a heap replacer load after the banner was written
    nvse = Module("nvse_1_4.dll", 0x30000000, 0x1000, r"C:\Games\FNV\nvse_1_4.dll")
    nvhr = Module("nvhr_sse2.dll", 0x40000000, 0x1000, r"C:\Games\FNV\nvhr_sse2.dll")
    out = []
    for i, m in enumerate((plugin, other, nvse, nvhr)):
        out += e.feed(ModuleEvent(ts_us=5 + i, action="add", module=m))
    levels = {o.message.split(":")[0]: o.level for o in out if hasattr(o, "level")}
    assert levels == {"Plugin loaded": "INFO", "Module loaded": "DEBUG", "NVSE loaded": "INFO",
                      "Heap replacer loaded": "INFO"}


def test_size_classes_and_largest_allocations_match_a_reference_at_every_snapshot() -> None:
    """monitor.allocation_sizes (successful allocations: tracked, replacing or past the tracking
    limit, by bit length of the size) and monitor.largest_allocations, exact at each snapshot,
    including mid-batch ones."""
    rng = np.random.default_rng(17)
    n = 30_000
    a = np.zeros(n, RECORD_DTYPE)
    a["kind"] = rng.choice([A, A, A, F, R, X], n)
    a["ptr"] = rng.integers(0, 3000, n, dtype=np.uint64) * 16  # some NULL: failures
    a["old_ptr"] = rng.integers(0, 3000, n, dtype=np.uint64) * 16
    bits = rng.integers(0, 41, n, dtype=np.uint64)
    a["size"] = np.where(rng.random(n) < 0.2, np.uint64(1) << bits,  # exact powers of two too
                         rng.integers(0, 1 << 20, n, dtype=np.uint64) >> bits)
    a["ts_us"] = np.arange(n)
    a["caller"] = rng.choice([0x10010, 0x400000 + 0x1234, 0x10000000 + 0x20], n)
    a["dur_us"] = rng.integers(0, 10_000, n)
    a["tid"] = rng.integers(1, 5, n)
    a["hook"] = rng.choice([0, 2], n)
    cfg = EngineConfig(max_tracked=1500, json_every_allocs=777)  # overflow; snapshots mid-batch
    e, out = run(*(batch(a[i:i + 1000]) for i in range(0, n, 1000)), config=cfg)
    # successful allocations in order: alloc with a pointer, realloc to a size with a pointer
    ok = (a["ptr"] != 0) & ((a["kind"] == A) | ((a["kind"] == R) & (a["size"] != 0)))
    sizes = a["size"][ok].tolist()
    where = {0x10010: "0x10010", 0x401234: "FalloutNV.exe+0x1234", 0x10000020: "plugin.dll+0x20"}
    allocs = [{"bytes": int(x["size"]), "time_us": int(x["ts_us"]), "duration_us": int(x["dur_us"]),
               "thread": int(x["tid"]), "heap": "libc" if x["hook"] == 0 else "game",
               "caller": where[int(x["caller"])], "function": None} for x in a[ok]]

    def reference(k: int) -> list[dict[str, int]]:
        by: dict[int, int] = {}
        for s in sizes[:k]:
            by[s.bit_length()] = by.get(s.bit_length(), 0) + 1
        return [{"min_bytes": 1 << (b - 1) if b else 0, "max_bytes": (1 << b) - 1,
                 "allocations": c} for b, c in sorted(by.items())]

    snaps = [o for o in out if isinstance(o, Snapshot)]
    assert e.state.c.overflow_allocations > 0 and len(snaps) > 20
    assert any(s.total_allocations % 777 == 0 and not s.final for s in snaps)
    for s in snaps:
        assert s.monitor["allocation_sizes"] == reference(s.total_allocations), s.ts_us
        # the 20 largest so far: size desc, the earliest first among equal sizes
        top = sorted(allocs[:s.total_allocations], key=lambda x: -x["bytes"])[:20]
        assert s.monitor["largest_allocations"] == top, s.ts_us
    final = snaps[-1].monitor["allocation_sizes"]
    assert sum(c["allocations"] for c in final) == e.state.c.total_allocations == len(sizes)
    assert final[0]["min_bytes"] == 0 and final[-1]["max_bytes"] >= 1 << 40


# -- issue 13: the shared ring's counters (stalls, lost frees, invalid records) --

RING = {"on_full": "wait", "max_wait_ms": 50}


def empty(now: int, **counters) -> Batch:
    return batch(recs(), now, **counters)


def test_stall_bursts_one_warn_each_and_a_summary() -> None:
    e, out = run(
        empty(100_000),
        empty(200_000, stalls=3, stall_us=300, stall_max_us=150),  # burst 1 starts
        empty(300_000, stalls=7, stall_us=1_000, stall_max_us=400),  # rises again: same burst
        empty(900_000, stalls=7, stall_us=1_000, stall_max_us=400),  # quiet, < 1 s
        empty(1_300_000, stalls=7, stall_us=1_000, stall_max_us=400),  # 1 s quiet: burst over
        empty(5_000_000, stalls=9, stall_us=1_500, stall_max_us=400),  # burst 2, open at end
        empty(5_100_000, stalls=9, stall_us=1_500, stall_max_us=400),
        m=meta(extra=dict(RING)))
    warn = [(ln.ts_us, ln.message) for ln in logs(out, "WARN")]
    assert warn == [
        (1_300_000, "Stall burst: 7 hooked calls waited for a free ring slot, 1000 microseconds "
         "in total, within 200000 microseconds (longest wait so far 400 microseconds; 7 "
         "stalls so far)"),
        # within: from the batch before its first rise (the stalls came after it) to its last
        (5_100_000, "Stall burst: 2 hooked calls waited for a free ring slot, 500 microseconds "
         "in total, within 3700000 microseconds (longest wait so far 400 microseconds; 9 stalls so "
         "far)"),
    ]
    info = [ln.message for ln in logs(out, "INFO")]
    assert "Full-ring policy: wait (a hooked call waits up to 50 ms for a free slot, then drops "\
        "its event)" in info
    assert info[-3] == ("Stalls: 9 hooked calls waited for a free ring slot, 1500 microseconds "
                        "in total, longest 400 microseconds, in 2 bursts; policy wait, at most "
                        "50 ms per call")
    mon = e.snapshot().monitor
    assert (mon["stalls"], mon["stall_total_us"], mon["stall_max_us"], mon["stall_bursts"],
            mon["on_full"], mon["max_wait_ms"]) == (9, 1500, 400, 2, "wait", 50)
    # stalls are not errors: short bursts leave health alone
    assert e.health.causes == [] and e.health.warning_count == 2


def test_a_long_stall_burst_degrades_until_quiet() -> None:
    cfg = EngineConfig(recovery_us=2_000_000)
    e, out = run(
        empty(100_000),
        empty(200_000, stalls=100, stall_us=600_000, stall_max_us=50_000),
        empty(300_000, stalls=200, stall_us=1_200_000, stall_max_us=50_000),  # >= 1 s waited
        empty(400_000, stalls=250, stall_us=1_500_000, stall_max_us=50_000),
        empty(2_000_000, stalls=250, stall_us=1_500_000, stall_max_us=50_000),
        config=cfg, finish=False, m=meta(extra=dict(RING)))
    assert "Status: ACTIVE -> DEGRADED (long stalls)" in [ln.message for ln in logs(out)]
    assert e.health.causes == ["long stalls"]
    out = e.feed(empty(2_500_000, stalls=250, stall_us=1_500_000, stall_max_us=50_000))
    assert e.health.causes == []  # recovery_us after the burst's last rise (400 ms + 2 s)
    out += e.finish()
    summary = [ln for ln in logs(out) if ln.message.startswith("Stalls: 250 hooked calls")]
    assert [ln.level for ln in summary] == ["WARN"]  # a burst degraded: the summary warns


def test_no_stall_lines_for_a_recording_from_before_the_ring_counters() -> None:
    _, out = run(batch(recs((A, 0x10, 8, 5))))
    assert not [ln for ln in logs(out) if "Stall" in ln.message or "policy" in ln.message]


def test_dropped_free_makes_older_blocks_uncertain() -> None:
    e, _ = run(
        batch(recs((A, 0x10, 8, 5), (A, 0x20, 16, 7)), 10),
        batch(recs((A, 0x30, 32, 15)), 20, dropped=1, dropped_frees=1),  # a free was lost
        batch(recs((A, 0x40, 64, 25)), 30, dropped=2, dropped_frees=1),  # an alloc was lost
        finish=False, m=meta(extra=dict(RING)))
    assert e.uncertain_until == 20
    assert e.uncertain_reason == "1 free/realloc record was dropped"
    assert e.snapshot().monitor["uncertain_fate_until_us"] == 20
    assert e.snapshot().monitor["dropped_frees"] == 1


def test_dropped_allocs_only_leave_fates_certain() -> None:
    e, _ = run(batch(recs((A, 0x10, 8, 5)), 10, dropped=5, dropped_frees=0),
               finish=False, m=meta(extra=dict(RING)))
    assert e.uncertain_until is None
    assert e.snapshot().monitor["uncertain_fate_until_us"] is None


def test_older_recording_any_drop_makes_fates_uncertain() -> None:
    # no on_full in the metadata and no dropped_frees counted: any drop may have been a free
    e, _ = run(batch(recs((A, 0x10, 8, 5)), 10),
               batch(recs((A, 0x20, 8, 15)), 20, dropped=3),
               batch(recs((A, 0x30, 8, 25)), 30, dropped=3), finish=False)
    assert e.uncertain_until == 20
    assert "3 events were dropped" in e.uncertain_reason


def test_drop_seen_only_at_session_end_covers_every_block() -> None:
    from nvse_monitor.stream.messages import SessionEnd

    e = Engine(meta(extra=dict(RING)))
    e.start()
    e.feed(batch(recs((A, 0x10, 8, 5)), 10))
    e.feed(SessionEnd(50, "target-exited", True,
                      counters=AgentCounters(dropped=1, dropped_frees=1)))
    assert e.uncertain_until == 50


def test_invalid_ring_records_warn_degrade_and_make_fates_uncertain() -> None:
    e, out = run(batch(recs((A, 0x10, 8, 5)), 10),
                 batch(recs(), 20, unknown_records=4),
                 m=meta(extra=dict(RING)))
    assert "Skipped 4 invalid records from the shared ring; 4 so far" in \
        [ln.message for ln in logs(out, "WARN")]
    assert "Status: ACTIVE -> DEGRADED (invalid ring records)" in [ln.message for ln in logs(out)]
    assert e.uncertain_until == 20
    snaps = [o for o in out if isinstance(o, Snapshot)]
    assert snaps[-1].monitor["unknown_records"] == 4


def test_feed_many_matches_feed_with_ring_counters(tmp_path) -> None:
    import ring_session

    from nvse_monitor.stream.recording import read_recording

    meta_, msgs = read_recording(ring_session.write(tmp_path / "ring.nvmrec"))
    lines, e1, e2 = assert_feed_many_matches_feed(meta_, msgs)
    assert any("Stall burst: 250 " in getattr(o, "message", "") for o in lines)
    assert e1.uncertain_until == e2.uncertain_until == 200_000
