"""Leak report on hand-made streams: grouping by module and call site, the log lines and the
CSV, checked against a plain-Python reference (docs/views.md)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np
import pytest

from nvse_monitor.engine import Engine, leaks
from nvse_monitor.outputs.pipeline import Pipeline
from nvse_monitor.stream.events import RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import (
    AgentCounters,
    Batch,
    HookInfo,
    Module,
    ModuleEvent,
    SessionMeta,
)

pytestmark = pytest.mark.usefixtures("kernels")  # compiled and numpy paths

HOOKS = [HookInfo("malloc", "libc", "alloc"), HookInfo("free", "libc", "free"),
         HookInfo("GameHeap::Allocate", "game", "alloc")]
EXE = Module("Game.exe", 0x400000, 0x100000)
PLUG = Module("plugin.dll", 0x10000000, 0x10000)
LATE = Module("late.dll", 0x20000000, 0x10000)


def meta() -> SessionMeta:
    return SessionMeta("Game.exe", 77, "ia32", "windows", "test", hooks=list(HOOKS),
                       modules=[EXE, PLUG], wall_clock_zero_us=1_700_000_000_000_000)


def records(rows: list[tuple[int, int, int, int, int, int]]) -> np.ndarray:
    """rows: (kind, ptr, size, ts, caller, hook)."""
    a = np.zeros(len(rows), RECORD_DTYPE)
    for i, (kind, ptr, size, ts, caller, hook) in enumerate(rows):
        a[i]["kind"], a[i]["ptr"], a[i]["size"], a[i]["ts_us"] = kind, ptr, size, ts
        a[i]["caller"], a[i]["hook"], a[i]["seq"] = caller, hook, i
    return a


def known_stream() -> tuple[list, dict]:
    """Blocks from known call sites, some freed; the expected groups by hand."""
    rows = []
    ptr = 0x1000
    ts = 10

    def alloc(n: int, size: int, caller: int, hook: int = 0, free_every: int = 0) -> None:
        nonlocal ptr, ts
        for i in range(n):
            rows.append((Kind.ALLOC, ptr, size, ts, caller, hook))
            if free_every and i % free_every == 0:
                rows.append((Kind.FREE, ptr, 0, ts, caller, 1))
            ptr += 0x100
            ts += 1

    alloc(10, 48, EXE.base + 0x1234)  # 10 x 48 live
    alloc(9, 100, EXE.base + 0x2000, hook=2, free_every=3)  # 6 x 100 live, game heap
    alloc(5, 7, EXE.base + 0x2000, hook=0)  # same site, libc heap: 5 x 7
    alloc(4, 1000, PLUG.base + 0x10)  # 4 x 1000
    alloc(3, 5, 0x7000_0000)  # outside every module
    alloc(20, 64, EXE.base + 0x3000, free_every=1)  # all freed: no group
    want = {
        ("Game.exe", 0x1234): (10, 480),
        ("Game.exe", 0x2000): (11, 635),
        ("plugin.dll", 0x10): (4, 4000),
        ("unknown", 0x7000_0000): (3, 15),
    }
    return rows, want


def test_groups_by_site_and_module():
    rows, want = known_stream()
    eng = Engine(meta())
    eng.start()
    eng.feed(Batch(1000, AgentCounters(), records(rows)))
    rep = leaks.from_engine(eng)
    got = {(g.module, g.offset): (g.allocations, g.bytes) for g in rep.sites}
    assert got == want
    # most bytes first
    assert [(g.module, g.offset) for g in rep.sites][0] == ("plugin.dll", 0x10)
    mods = {g.module: (g.allocations, g.bytes, g.sites) for g in rep.modules}
    assert mods == {"Game.exe": (21, 1115, 2), "plugin.dll": (1 * 4, 4000, 1),
                    "unknown": (3, 15, 1)}
    assert rep.allocations == 28 and rep.bytes == 480 + 635 + 4000 + 15
    site = next(g for g in rep.sites if g.offset == 0x2000)
    assert site.heaps == ("game", "libc") and (site.min_size, site.max_size) == (7, 100)
    assert site.where == "Game.exe+0x2000"


def test_csv_and_log_lines_round_trip(tmp_path):
    rows, want = known_stream()
    eng = Engine(meta())
    eng.start()
    eng.feed(Batch(1000, AgentCounters(), records(rows)))
    rep = leaks.from_engine(eng)
    text = rep.csv_text(1_700_000_000_000_000)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0]) == list(leaks.CSV_COLUMNS)
    assert [r["scope"] for r in parsed] == ["module"] * 3 + ["site"] * 4
    assert parsed[3]["offset"] == "0x10" and parsed[3]["module"] == "plugin.dll"
    assert int(parsed[3]["oldest_timestamp"]) >= 1_700_000_000_000_000
    path = tmp_path / "x_leaks.csv"
    path.write_text(text)
    back = leaks.read_csv(path)
    assert {(g.module, g.offset): (g.allocations, g.bytes) for g in back.sites} == want
    lines = rep.log_lines(top=2, csv_name="x_leaks.csv")
    assert lines[0].startswith("Leak report: 28 allocations, 5130 bytes still live from 4 call "
                               "sites in 3 modules")
    assert len(lines) == 1 + 2 + 2
    assert "Live at end from plugin.dll+0x10: 4 allocations, 4000 bytes (size 1000, libc)" \
        in lines


def test_module_loaded_later_and_unloaded_keeps_its_blocks():
    eng = Engine(meta())
    eng.start()
    eng.feed(ModuleEvent(5, "add", LATE))
    eng.feed(Batch(100, AgentCounters(), records(
        [(Kind.ALLOC, 0x9000 + i * 16, 24, 10 + i, LATE.base + 0x44, 0) for i in range(6)])))
    eng.feed(ModuleEvent(200, "remove", LATE))
    rep = leaks.from_engine(eng)
    assert [(g.module, g.offset, g.allocations, g.bytes) for g in rep.sites] == \
        [("late.dll", 0x44, 6, 144)]


def test_matches_reference_on_random_blocks():
    rng = np.random.default_rng(5)
    n = 20_000
    mods = [EXE, PLUG]
    callers = rng.choice(np.array([EXE.base + 0x10, EXE.base + 0x99, PLUG.base + 4, 0x123],
                                  np.uint64), n)
    mod = np.where(callers >= PLUG.base, 1, np.where(callers >= EXE.base, 0, 0xFFFF))
    live = {"caller": callers, "module": mod.astype(np.uint16),
            "size": rng.integers(1, 5000, n).astype(np.uint64),
            "ts": rng.integers(0, 10**6, n).astype(np.uint64),
            "heap": rng.integers(0, 2, n).astype(np.uint8)}
    rep = leaks.group_live(live, mods, ["libc", "game", "unknown"])
    ref: dict = defaultdict(lambda: [0, 0])
    for c, m, s in zip(callers.tolist(), mod.tolist(), live["size"].tolist(), strict=True):
        key = (mods[m].name, c - mods[m].base) if m != 0xFFFF else ("unknown", c)
        ref[key][0] += 1
        ref[key][1] += s
    assert {(g.module, g.offset): [g.allocations, g.bytes] for g in rep.sites} == dict(ref)
    assert rep.bytes == int(live["size"].sum())


def test_pipeline_writes_leaks_csv_and_warn_lines(tmp_path):
    rows, want = known_stream()
    pipe = Pipeline(meta(), tmp_path, "P")
    pipe.start()
    pipe.feed(Batch(1000, AgentCounters(), records(rows)))
    pipe.finish()
    assert pipe.leaks_path == tmp_path / "P_leaks.csv"
    back = leaks.read_csv(pipe.leaks_path)
    assert {(g.module, g.offset): (g.allocations, g.bytes) for g in back.sites} == want
    log = (tmp_path / "P_rpmalloc.log").read_text().splitlines()
    warn = [ln for ln in log if "[WARN]" in ln and "Live at end" in ln]
    assert len(warn) == 3 + 4
    # the WARN lines come before the SHUTDOWN summary and are counted in the JSON
    assert log.index(next(ln for ln in log if "Leak report:" in ln)) < \
        log.index(next(ln for ln in log if "Final statistics" in ln))
    import json
    doc = json.loads((tmp_path / "P_stats.json").read_text())
    assert doc["logging"]["warning_logs"] == sum("[WARN]" in ln for ln in log)


def test_nothing_live_gives_header_only_and_no_lines(tmp_path):
    pipe = Pipeline(meta(), tmp_path, "P")
    pipe.start()
    pipe.feed(Batch(10, AgentCounters(), records(
        [(Kind.ALLOC, 0x50, 8, 1, EXE.base, 0), (Kind.FREE, 0x50, 0, 2, EXE.base, 1)])))
    pipe.finish()
    assert pipe.leaks_path.read_text() == ",".join(leaks.CSV_COLUMNS) + "\n"
    assert "Leak report" not in (tmp_path / "P_rpmalloc.log").read_text()


# -- issue 13: blocks whose free may have been dropped are uncertain, never leaks --

def ring_meta(**extra) -> SessionMeta:
    m = meta()
    m.extra.update(extra)
    return m


def lossy_session(tmp_path, m: SessionMeta, **lost) -> Pipeline:
    """Block A (site 0x100) allocated, then a batch reports lost records (`lost`: counters),
    then block B (site 0x200) allocated and block C (site 0x300) allocated and freed."""
    pipe = Pipeline(m, tmp_path, "P")
    pipe.start()
    pipe.feed(Batch(100, AgentCounters(), records(
        [(Kind.ALLOC, 0xA000, 40, 50, EXE.base + 0x100, 0)])))
    # in the real session A's free was among the dropped records: it looks live at the end
    pipe.feed(Batch(200, AgentCounters(**lost), records([])))
    pipe.feed(Batch(300, AgentCounters(**lost), records(
        [(Kind.ALLOC, 0xB000, 7, 250, EXE.base + 0x200, 0),
         (Kind.ALLOC, 0xC000, 9, 260, EXE.base + 0x300, 0),
         (Kind.FREE, 0xC000, 0, 270, EXE.base + 0x300, 1)])))
    pipe.finish()
    return pipe


def test_dropped_free_sets_older_blocks_aside_and_later_ones_stay_leaks(tmp_path):
    pipe = lossy_session(tmp_path, ring_meta(on_full="drop"), dropped=1, dropped_frees=1)
    rep = pipe.leak_report
    assert (rep.allocations, rep.bytes) == (1, 7)  # B: allocated after the lost free
    assert [(g.module, g.offset) for g in rep.sites] == [("Game.exe", 0x200)]
    assert (rep.uncertain_allocations, rep.uncertain_bytes) == (1, 40)  # A: fate unknown
    assert [(g.scope, g.offset) for g in rep.uncertain_sites] == [("uncertain-site", 0x100)]
    assert rep.uncertain_until_us == 200
    # the CSV: leaks first, then the uncertain rows; read back the same
    rows = list(csv.DictReader(io.StringIO(pipe.leaks_path.read_text())))
    assert [(r["scope"], r["offset"], r["bytes"]) for r in rows] == [
        ("module", "", "7"), ("site", "0x200", "7"),
        ("uncertain-module", "", "40"), ("uncertain-site", "0x100", "40")]
    back = leaks.read_csv(pipe.leaks_path)
    assert (back.allocations, back.bytes, back.uncertain_allocations, back.uncertain_bytes) == \
        (1, 7, 1, 40)
    # the log: the leak lines name B only; one line says what was set aside and why
    log = (tmp_path / "P_rpmalloc.log").read_text()
    assert "Leak report: 1 allocation, 7 bytes still live from 1 call site in 1 module" in log
    assert "Live at end from Game.exe+0x100" not in log
    assert ("Leak report: 1 allocation, 40 bytes still live set aside as uncertain, not leaks: "
            "allocated at or before 0.000200 s, when free records were lost (1 free/realloc "
            "record was dropped); rows uncertain-* in P_leaks.csv") in log
    import json
    mon = json.loads((tmp_path / "P_stats.json").read_text())["monitor"]
    assert mon["leaks"] == {"leaked_allocations": 1, "leaked_bytes": 7,
                            "uncertain_allocations": 1, "uncertain_bytes": 40}
    assert mon["uncertain_fate_until_us"] == 200 and mon["dropped_frees"] == 1


def test_dropped_allocations_only_change_nothing(tmp_path):
    # a session that counts dropped frees (it knows its policy): none were frees
    pipe = lossy_session(tmp_path, ring_meta(on_full="drop"), dropped=1, dropped_frees=0)
    rep = pipe.leak_report
    assert (rep.allocations, rep.uncertain_allocations) == (2, 0)
    assert "uncertain" not in pipe.leaks_path.read_text()


def test_older_recording_any_drop_sets_older_blocks_aside(tmp_path):
    # before issue 13 the counters did not say which records were frees
    pipe = lossy_session(tmp_path, meta(), dropped=1)
    rep = pipe.leak_report
    assert (rep.allocations, rep.bytes, rep.uncertain_allocations, rep.uncertain_bytes) == \
        (1, 7, 1, 40)
    assert "1 event was dropped (the recording does not say which were frees)" in \
        (tmp_path / "P_rpmalloc.log").read_text()


def test_nothing_dropped_nothing_uncertain(tmp_path):
    pipe = lossy_session(tmp_path, ring_meta(on_full="wait"))
    rep = pipe.leak_report
    assert (rep.allocations, rep.uncertain_allocations) == (2, 0)
    assert rep.uncertain_sites == [] and rep.uncertain_until_us is None


def test_leaks_csv_with_an_unknown_scope_is_refused(tmp_path):
    path = tmp_path / "x_leaks.csv"
    path.write_text(",".join(leaks.CSV_COLUMNS) + "\nbogus,a,,1,1,1,1,1,libc,0,0\n")
    with pytest.raises(ValueError, match="unknown scope 'bogus'"):
        leaks.read_csv(path)
