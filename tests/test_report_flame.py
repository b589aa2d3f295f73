"""The report's sampled stacks (issue 11): flame graph views and the leak sites' callers."""

from __future__ import annotations

import dataclasses
import re

import pytest
from test_report import CHROMIUM, chart_dom, chromium
from test_samples import APP, LIB, Recs, frames, meta

from nvse_monitor.engine import Engine
from nvse_monitor.engine.samples import weights
from nvse_monitor.stream.messages import AgentCounters, SessionEnd
from nvse_monitor.stream.recording import write_recording
from nvse_monitor.stream.synthetic import generate, with_stacks
from nvse_monitor.views.report import build_report
from nvse_monitor.views.report import flame as flame_mod

N = 65536
LEAKER = APP.base + 0x1b  # the leaking call's return address
MAIN = [APP.base + 0x200, LIB.base + 0x300]  # its callers, innermost first


def session() -> list:
    """Thread 1 leaks 3 sampled blocks from one stack; thread 2 allocates and frees 2 from
    another; the peak is before thread 2's frees."""
    r = Recs()
    for i in range(3):
        r.stack([LEAKER, *MAIN]).alloc(0x1000 + 0x100 * i, 4000, caller=LEAKER, sampled=True)
    other = frames(3, LIB.base)
    for i in range(2):
        r.stack(other, tid=2).alloc(0x9000 + 0x100 * i, 30000, tid=2, caller=other[0],
                                    sampled=True)
    r.alloc(0x8000, 10, caller=LEAKER)  # a block of the leak site that was not sampled
    b1 = r.batch()
    b2 = Recs().free(0x9000, tid=2).free(0x9100, tid=2).batch()
    b2.records["ts_us"] += 100
    b2.now_us = 150
    c = AgentCounters()  # a recording has counters
    return [dataclasses.replace(b, counters=c) for b in (b1, b2)] + [
        SessionEnd(200, "end-of-recording", True, counters=c)]


@pytest.fixture
def report(tmp_path):
    rec = tmp_path / "s.nvmrec"
    write_recording(rec, meta(N), session())
    return build_report(rec, tmp_path / "r.html")


def test_views_and_leak_stacks(report):
    fl = report.data.flame
    assert fl is not None and fl.sample_bytes == N and fl.sampled_allocations == 5
    w4, w30 = float(weights(4000, N)[0]), float(weights(30000, N)[0])
    end, peak, alloc = (fl.views[k] for k in ("end", "peak", "allocated"))
    assert end.total == pytest.approx(3 * w4) and end.sampled == 3
    assert peak.total == pytest.approx(3 * w4 + 2 * w30) and peak.sampled == 5
    assert alloc.total == pytest.approx(peak.total)
    # the end's flame: root, then the outermost caller first, the allocating call on top
    assert end.labels == ["all sampled stacks", f"libx.so+0x{0x300:x}", "app+0x200",
                          f"app+0x{0x1b:x}"]
    assert end.parents == ["", "all", "n1", "n2"]
    assert end.values == pytest.approx([3 * w4] * 4)
    # the leak site's row lists its sampled blocks' stack, callers included
    site = ("app", 0x1b)
    assert [(s.frames, s.blocks) for s in fl.site_stacks[site]] == [
        (["app+0x1b", "app+0x200", "libx.so+0x300"], 3)]
    html = report.path.read_text()
    assert 'id="chart-flame"' in html and "Sampled stacks (estimates)" in html
    assert "sampled stacks of its live blocks" in html
    assert "<code>app+0x1b</code><br>&larr; <code>app+0x200</code>" in html
    assert report.data.doc["monitor"]["sampling"]["sampled_allocations"] == 5


def test_labels_use_the_engines_symbols():
    e = Engine(meta(N))
    for m in session()[:2]:
        e.feed(m)
    e.symbols = {LEAKER: "leak_here+0x1b", MAIN[1]: "main+0x10"}  # as issue 11's names add
    fl = flame_mod.gather(e)
    assert fl.views["end"].labels[1:] == ["libx.so!main+0x10", "app+0x200", "app!leak_here+0x1b"]


def test_no_sampling_no_section(tmp_path):
    rec = tmp_path / "s.nvmrec"
    write_recording(rec, meta(0), session())
    res = build_report(rec, tmp_path / "r.html")
    assert res.data.flame is None
    html = res.path.read_text()
    assert "chart-flame" not in html and "sampled stacks of its live blocks" not in html
    assert "sampling" not in res.data.doc["monitor"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_draws_the_flame_graph(tmp_path):
    m, msgs = generate(80_000, seed=5)
    m, msgs = with_stacks(m, msgs, 16384, seed=2)
    rec = tmp_path / "s.nvmrec"
    write_recording(rec, m, msgs)
    res = build_report(rec, tmp_path / "r.html")
    fl = res.data.flame
    assert all(v.total > 0 and len(v.ids) > 10 for v in fl.views.values())
    r = chromium(tmp_path, "--dump-dom", res.path.resolve().as_uri())
    s = re.search(r'id="report-status" data-charts="(\d+)/(\d+)" data-errors="([^"]*)"', r.stdout)
    assert s and s.group(1) == s.group(2) and s.group(3) == "", r.stdout[-2000:]
    dom = chart_dom(r.stdout, "flame")
    # the view shown first (live at the peak): a drawn slice per kept frame, the menu too
    assert dom.count('class="slice') >= len(fl.views["peak"].ids) - 1
    assert "live at the end" in dom and "allocated" in dom


def test_replay_writes_the_stacks_for_a_directory_report(tmp_path):
    """A replay (as a live session) writes `<prefix>_stacks.json` at its end: `report DIR` shows
    the same flame graph and leak stacks as the report of the recording."""
    from nvse_monitor.outputs.pipeline import replay

    m, msgs = generate(40_000, seed=9)
    m, msgs = with_stacks(m, msgs, 8192, seed=4)
    rec = tmp_path / "s.nvmrec"
    write_recording(rec, m, msgs)
    out = tmp_path / "out"
    replay(rec, out, "P")
    assert (out / "P_stacks.json").exists()
    d_dir = build_report(out, tmp_path / "d.html", prefix="P").data
    d_rec = build_report(rec, tmp_path / "r.html", prefix="P").data
    assert d_dir.flame is not None and d_rec.flame is not None
    assert d_dir.flame == d_rec.flame  # every view, every leak site's stacks, the peak's time
    assert d_rec.flame.site_stacks and d_rec.flame.peak_t is not None
    assert 'id="chart-flame"' in (tmp_path / "d.html").read_text()
    # a replay of the same recording: the same file, byte for byte
    replay(rec, tmp_path / "again", "P")
    assert (tmp_path / "again" / "P_stacks.json").read_bytes() == \
        (out / "P_stacks.json").read_bytes()


def test_directory_without_stacks_file_says_so(tmp_path):
    from nvse_monitor.outputs.pipeline import replay

    rec = tmp_path / "s.nvmrec"
    write_recording(rec, meta(N), session())
    replay(rec, tmp_path / "out", "P")
    (tmp_path / "out" / "P_stacks.json").unlink()
    d = build_report(tmp_path / "out", tmp_path / "d.html", prefix="P").data
    assert d.flame is None and any("P_stacks.json" in n for n in d.notes)
    write_recording(rec, meta(0), session())
    replay(rec, tmp_path / "off", "P")
    assert not (tmp_path / "off" / "P_stacks.json").exists()
