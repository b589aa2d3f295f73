"""The report's charts over time (issue 12): rates resampled into round time buckets sized to
the session, a memory curve for short sessions of a few large blocks, every time axis spanning
exactly the session, the per-module chart at the memory chart's sample times."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import REPO
from test_engine import HOOKS, batch, recs

from nvse_monitor.stream.events import Kind
from nvse_monitor.stream.messages import AgentCounters, Batch, Module, SessionEnd, SessionMeta
from nvse_monitor.stream.recording import read_recording, write_recording
from nvse_monitor.views.report import build_report
from nvse_monitor.views.report.data import bucket_width

FIXTURE = REPO / "fixtures" / "synthetic-mixed.nvmrec"
MIB = 1 << 20


def test_bucket_width_is_round_and_sized_to_the_session():
    for span in (2e-4, 0.0123, 0.8, 2.0, 37.0, 600.0, 36_000.0):
        w = bucket_width(span)
        mant = w / 10 ** np.floor(np.log10(w) + 1e-9)
        assert round(mant, 9) in (1, 2, 5), (span, w)
        assert 80 <= span / w <= 200 + 1e-6, (span, w)
    assert bucket_width(1e-9) == 1e-6


def successful_allocs(r: np.ndarray) -> np.ndarray:
    ok = (r["ptr"] != 0) & ((r["kind"] == Kind.ALLOC) | ((r["kind"] == Kind.REALLOC)
                                                        & (r["size"] > 0)))
    return r[ok]


def test_recording_rates_are_the_records_per_bucket(tmp_path):
    """Each bucket's allocations/s times its width is the number of successful allocations
    whose time falls in it (the series is sampled at least every 1/1000 of the time so far:
    at most the allocations of one sample interval off at an edge)."""
    res = build_report(FIXTURE, tmp_path / "r.html")
    d = res.data
    _meta, msgs = read_recording(FIXTURE)
    ts = successful_allocs(np.concatenate([m.records for m in msgs if isinstance(m, Batch)]))
    ts = ts["ts_us"].astype(np.float64) / 1e6
    edges = np.append(d.rate_t, d.end_t)
    want = np.histogram(ts, edges)[0]
    got = np.array(d.alloc_rate) * np.diff(edges)
    assert got.sum() == pytest.approx(len(ts))
    per_q = np.histogram(ts, np.arange(0, d.end_t + 2e-4, 2e-4))[0].max()  # in 200 µs at most
    assert np.abs(got - want).max() <= 2 * max(per_q, 1), (got - want)
    # the mean of the buckets is the session's average, which the chart draws and names
    assert d.avg_alloc_rate == pytest.approx(len(ts) / d.end_t, rel=1e-9)
    html = res.path.read_text().replace("\\u002f", "/")  # plotly's JSON escapes "/"
    assert f"averages {report_si(d.avg_alloc_rate)} allocations/s" in html


def report_si(x: float) -> str:
    from nvse_monitor.views.report.html import si

    return si(x)


def few_large_blocks(path) -> None:
    """`sort big.txt` in small: one drained batch holds the whole session (a 500 MiB buffer at
    80 ms, freed at 750 ms; a few small blocks), the session ends at 800 ms."""
    meta = SessionMeta(target="sort", pid=42, arch="x64", platform="linux", profile="p",
                       hooks=list(HOOKS), modules=[Module("sort", 0x400000, 0x100000)])
    rows = [(Kind.ALLOC, 0x1000 + 16 * i, 100, 20_000 + 100 * i) for i in range(10)]
    rows += [(Kind.ALLOC, 0x7F00_0000_0000, 500 * MIB, 80_000),
             (Kind.ALLOC, 0x2000, 1024, 300_000),
             (Kind.FREE, 0x7F00_0000_0000, 0, 750_000)]
    b = batch(recs(*rows), now=790_000, allocs=12, frees=1, published=13)
    end = SessionEnd(800_000, "target-exited", True, "", AgentCounters(allocs=12, frees=1,
                                                                        published=13))
    write_recording(path, meta, [b, end])


def test_short_session_of_few_large_blocks(tmp_path):
    rec = tmp_path / "sort.nvmrec"
    few_large_blocks(rec)
    res = build_report(rec, tmp_path / "r.html")
    d = res.data
    assert d.end_t == pytest.approx(0.8)
    # memory: the buffer is drawn from its allocation to its free, not a lone peak marker
    cur = lambda t: np.interp(t, d.t, d.current)  # noqa: E731
    assert cur(0.079) < MIB and cur(0.081) >= 500 * MIB
    assert cur(0.5) >= 500 * MIB and cur(0.749) >= 500 * MIB and cur(0.751) < MIB
    assert d.peak_t == pytest.approx(0.3, abs=1e-3)  # the 1 KiB block tops the buffer's level
    # rates: round buckets over exactly the session, the 10 small blocks in the 20 ms bucket
    assert d.bucket_s == 0.005 and d.rate_t[0] == 0 and d.rate_t[-1] < d.end_t
    # [20, 25) ms: within a sample interval the count is interpolated (the state before a
    # run holds until 1 µs before its first record): off by a fraction of one allocation
    assert d.alloc_rate[4] * d.bucket_s == pytest.approx(10, abs=0.05)
    assert sum(r * d.bucket_s for r in d.alloc_rate) == pytest.approx(12)
    # every chart over time spans 0 .. the session's end, no wider
    html = (tmp_path / "r.html").read_text()
    for name in ("memory", "rates", "health", "modules-time"):
        layout = figure_layout(html, name)
        assert layout["xaxis"]["range"] == [0, pytest.approx(0.8)], name


def figure_layout(html: str, name: str) -> dict:
    """The layout plotly was given for chart `name` (Plotly.newPlot(id, data, layout, ...))."""
    start = html.index(f'"chart-{name}",')
    m = re.compile(r"\[.*?\],\s*(\{.*?\}),\s*\{\"displaylogo\"", re.S).search(html, start)
    assert m, name
    return json.loads(m.group(1))


def test_module_chart_at_the_memory_charts_sample_times(tmp_path):
    res = build_report(FIXTURE, tmp_path / "r.html")
    d = res.data
    assert d.module_t == d.t
    for i, cur in enumerate(d.current):
        assert sum(v[i] for v in d.module_series.values()) == cur


def test_rates_chart_draws_both_lines_distinctly(tmp_path):
    html = build_report(FIXTURE, tmp_path / "r.html").path.read_text()
    start = html.index('"chart-rates",')
    traces = json.loads(re.compile(r"(\[.*?\]),\s*\{", re.S).search(html, start).group(1))
    byname = {t["name"]: t for t in traces}
    allocs, frees = byname["allocations/s"], byname["frees/s"]
    assert allocs["line"]["width"] > frees["line"]["width"] and frees["line"]["dash"] == "dash"
    assert [t["name"] for t in traces].index("frees/s") > [t["name"] for t in traces].index(
        "allocations/s")  # drawn over it: equal rates still show both
    assert allocs["line"]["shape"] == frees["line"]["shape"] == "hv"  # a bucket is a step
