"""`nvse-monitor report`: the HTML report from a recording and from an output directory; its
figures agree with the replay's files; headless Chromium draws every chart without errors."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from nvse_monitor.outputs.pipeline import replay
from nvse_monitor.stream.events import Kind
from nvse_monitor.views.report import build_report
from nvse_monitor.views.report import data as report_data
from nvse_monitor.views.report import html as report_html

FIXTURE = REPO / "fixtures" / "synthetic-mixed.nvmrec"


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvse_monitor", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay")
    replay(FIXTURE, out)
    return out


@pytest.fixture(scope="module")
def from_recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "rec.html"
    return path, build_report(FIXTURE, path)


@pytest.fixture(scope="module")
def from_dir(tmp_path_factory, replayed):
    path = tmp_path_factory.mktemp("rep") / "dir.html"
    return path, build_report(replayed, path)


def test_recording_report_figures_match_the_replay(from_recording, replayed):
    path, res = from_recording
    doc = json.loads((replayed / "MemoryPoolNVSE_stats.json").read_text())
    d = res.data
    assert res.error is None
    assert d.doc == doc  # the same engine pass as the replay, leak report lines included
    # every successful allocation of the recording is in exactly one size class, which holds
    # its size (checked against the records themselves)
    assert sum(h.allocations for h in d.hist) == doc["memory_stats"]["total_allocations"]
    assert [h.allocations for h in d.hist] == record_size_classes()
    # the leak table is the leaks CSV's
    csv_rows = (replayed / "MemoryPoolNVSE_leaks.csv").read_text().splitlines()
    lk = d.leaks
    assert len(lk.sites) + len(lk.modules) + len(lk.uncertain_sites) + \
        len(lk.uncertain_modules) == len(csv_rows) - 1
    # the fixture dropped frees: blocks allocated before the last such drop are set aside
    assert lk.uncertain_allocations and lk.allocations
    assert lk.bytes + lk.uncertain_bytes == doc["memory_stats"]["current_bytes_allocated"]
    assert (lk.allocations + lk.uncertain_allocations
            == doc["memory_stats"]["current_allocations"])
    assert doc["monitor"]["leaks"] == {
        "leaked_allocations": lk.allocations, "leaked_bytes": lk.bytes,
        "uncertain_allocations": lk.uncertain_allocations,
        "uncertain_bytes": lk.uncertain_bytes}
    until = doc["monitor"]["uncertain_fate_until_us"]
    assert lk.uncertain_until_us == until
    assert all(g.oldest_us > until for g in lk.sites)
    assert all(g.newest_us <= until for g in lk.uncertain_sites)
    # the peak is marked at its value, within the series' time span
    assert max(d.peak) == doc["memory_stats"]["peak_bytes_allocated"]
    assert d.t[0] <= d.peak_t <= d.t[-1]
    # largest allocations: the 20 largest records, with their µs, thread and call site, and
    # every PERF line of the log at least as large is among them
    want = largest_records()
    assert [(x.size, x.dur_us, x.tid, round(x.t * 1e6)) for x in d.largest] == want
    assert all(re.fullmatch(r"[\w.]+\+0x[0-9a-f]+|0x[0-9a-f]+", x.where) for x in d.largest)
    perf = re.findall(r"Large allocation: (\d+) bytes took (\d+) micro",
                      (replayed / "MemoryPoolNVSE_rpmalloc.log").read_text())
    top = {(x.size, x.dur_us) for x in d.largest}
    assert perf and {(int(a), int(b)) for a, b in perf if int(a) >= want[-1][0]} <= top
    # live (the module series' sample nearest the peak) and leaked bytes per module
    assert d.module_peak_t is not None and abs(d.module_peak_t - d.peak_t) < 0.1
    i = d.module_t.index(d.module_peak_t)
    assert {m: v for m, v in d.module_peak.items() if v} == \
        {m: v[i] for m, v in d.module_series.items() if v[i]}
    bars = dict(report_html.module_bars(d))
    leaked = next(v for k, v in bars.items() if k.startswith("leaked"))
    assert leaked == {g.module: g.bytes for g in d.leaks.modules}
    unc = {g.module: g.bytes for g in d.leaks.uncertain_modules}
    assert {m: leaked.get(m, 0) + unc.get(m, 0) for m in {*leaked, *unc}} == \
        {k: v for k, v in doc["monitor"]["modules_live_bytes"].items()}
    html = path.read_text()
    assert f"Uncertain: {lk.uncertain_allocations:,} blocks" in html
    assert f'<div class="k">uncertain blocks</div><div class="v">' \
        f"{lk.uncertain_allocations:,}</div>" in html
    assert f'<div class="k">lost frees</div><div class="v">' \
        f'{doc["monitor"]["dropped_frees"]:,}</div>' in html
    assert html.count('class="plotly-graph-div"') == 6
    assert "<script src=" not in html  # everything inline: opens offline


def records():
    from nvse_monitor.stream.messages import Batch
    from nvse_monitor.stream.recording import read_recording

    _meta, msgs = read_recording(FIXTURE)
    return np.concatenate([m.records for m in msgs if isinstance(m, Batch)])


def successful_allocations(r: np.ndarray) -> np.ndarray:
    """Records that allocated a block: malloc-like with a pointer, realloc to a size > 0."""
    ok = (r["ptr"] != 0) & ((r["kind"] == Kind.ALLOC) | ((r["kind"] == Kind.REALLOC)
                                                        & (r["size"] > 0)))
    return r[ok]


def record_size_classes() -> list[int]:
    bits = [int(s).bit_length() for s in successful_allocations(records())["size"]]
    return [bits.count(k) for k in range(min(bits), max(bits) + 1)]


def largest_records() -> list[tuple[int, int, int, int]]:
    ok = successful_allocations(records())
    order = sorted(range(len(ok)), key=lambda i: -int(ok["size"][i]))[:20]  # stable: earliest
    return [(int(ok["size"][i]), int(ok["dur_us"][i]), int(ok["tid"][i]), int(ok["ts_us"][i]))
            for i in order]


def test_directory_report_reads_the_files(from_dir, replayed):
    path, res = from_dir
    d = res.data
    doc = json.loads((replayed / "MemoryPoolNVSE_stats.json").read_text())
    assert d.doc == doc
    assert d.status[0][1:3] == ("UNINITIALIZED", "INITIALIZING") and d.status[0][0] == 0
    assert d.status[-1][2] == "SHUTDOWN"
    n_warn = doc["logging"]["warning_logs"] + doc["logging"]["error_logs"] + \
        doc["logging"]["critical_logs"]
    assert len(d.messages) + d.messages_omitted == n_warn
    assert d.leaks is not None and d.leaks.bytes + d.leaks.uncertain_bytes == \
        doc["memory_stats"]["current_bytes_allocated"]
    assert d.leaks.uncertain_bytes == doc["monitor"]["leaks"]["uncertain_bytes"] > 0
    assert d.leaks.uncertain_until_us == doc["monitor"]["uncertain_fate_until_us"]
    # rates: the CSV's integrated, in round time buckets over the session; the peak marked at
    # the first row whose running peak is the final peak
    rows = list(csv.DictReader(io.StringIO((replayed / "MemoryPoolNVSE_performance.csv")
                                           .read_text())))
    assert d.bucket_s == report_data.bucket_width(d.end_t)
    assert d.rate_t[0] == 0 and d.rate_t[-1] < d.end_t and 100 <= len(d.rate_t) <= 250
    total = sum(r * d.bucket_s for r in d.alloc_rate[:-1]) + d.alloc_rate[-1] * (
        d.end_t - d.rate_t[-1])
    assert total == pytest.approx(doc["memory_stats"]["total_allocations"], rel=1e-3)
    assert d.avg_alloc_rate == pytest.approx(doc["memory_stats"]["total_allocations"]
                                             / doc["plugin"]["uptime_seconds"])
    first_peak = next(r for r in rows if int(r["peak_memory"]) == max(d.peak))
    assert d.peak_t == pytest.approx((int(first_peak["timestamp"]) - doc["timestamp"]) / 1e6
                                     + doc["plugin"]["uptime_seconds"], abs=0.06)
    # the size classes and largest allocations come from the JSON: as from the records
    assert [h.allocations for h in d.hist] == record_size_classes()
    assert [(x.size, x.dur_us, x.tid, round(x.t * 1e6)) for x in d.largest] == largest_records()
    # live (last snapshot) and leaked bytes per module
    bars = report_html.module_bars(d)
    assert [k for k, _ in bars] == ["live at the last snapshot", "leaked (still live at the end)"]
    assert bars[0][1] == doc["monitor"]["modules_live_bytes"]
    assert bars[1][1] == {g.module: g.bytes for g in d.leaks.modules}
    html = path.read_text()
    assert html.count('class="plotly-graph-div"') == 5
    assert d.notes == []


def test_both_sources_tell_the_same_story(from_recording, from_dir):
    rec, dire = from_recording[1].data, from_dir[1].data
    assert [h.allocations for h in rec.hist] == [h.allocations for h in dire.hist]
    assert rec.largest == dire.largest
    # health changes: the same transitions, at the same times (the log has µs)
    assert [s[1:] for s in rec.status] == [s[1:] for s in dire.status]
    assert [s[0] for s in rec.status] == pytest.approx([s[0] for s in dire.status], abs=1e-6)
    assert [m[1:] for m in rec.messages] == [m[1:] for m in dire.messages]
    assert max(rec.peak) == max(dire.peak) and rec.peak_t == pytest.approx(dire.peak_t, abs=0.01)
    # the same rate buckets; the directory's rows, 1,000 allocations apart, are interpolated
    # between: at most 1,000 allocations off at each bucket edge
    assert rec.bucket_s == dire.bucket_s and rec.rate_t == pytest.approx(dire.rate_t)
    for r, d in zip(rec.alloc_rate, dire.alloc_rate, strict=True):
        assert abs(r - d) * rec.bucket_s <= 2000 + 1e-6
    # the recording's memory series is finer than the CSV's (a point per 1,000 allocations)
    assert len(rec.t) > len(dire.t)


def test_older_json_without_the_added_sections(tmp_path, replayed):
    """A stats JSON of an older nvse-monitor (no allocation_sizes / largest_allocations): no
    histogram, the largest allocations from the PERF lines, both said in notes."""
    old = tmp_path / "old"
    shutil.copytree(replayed, old)
    doc = json.loads((old / "MemoryPoolNVSE_stats.json").read_text())
    del doc["monitor"]["allocation_sizes"], doc["monitor"]["largest_allocations"]
    (old / "MemoryPoolNVSE_stats.json").write_text(json.dumps(doc))
    res = build_report(old, tmp_path / "old.html")
    d = res.data
    assert d.hist is None and any("allocation_sizes" in n for n in d.notes)
    perf = re.findall(r"\[TID:(\d+)\] Large allocation: (\d+) bytes took (\d+) micro",
                      (old / "MemoryPoolNVSE_rpmalloc.log").read_text())
    want = sorted(((int(b), int(c), int(a)) for a, b, c in perf), key=lambda x: -x[0])[:20]
    assert [(x.size, x.dur_us, x.tid) for x in d.largest] == want and want
    assert "no allocation size classes" in (tmp_path / "old.html").read_text()


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("report", empty, "-o", tmp_path / "x.html")
    assert r.returncode == 2 and "no MemoryPoolNVSE_stats.json" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.html").exists()
    cut = tmp_path / "cut.nvmrec"
    cut.write_bytes(FIXTURE.read_bytes()[:60_000])
    r = cli("report", cut, "-o", tmp_path / "cut.html")
    assert r.returncode == 2 and "cut.nvmrec: truncated frame" in r.stderr, r.stderr
    assert "The recording is damaged" in (tmp_path / "cut.html").read_text()


# ---- headless Chromium -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000",
             # offline: every request would go to a proxy that is not there (and fail loudly)
             "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


def chart_dom(dom: str, name: str) -> str:
    """The DOM of one chart's div (up to the next chart)."""
    start = dom.index(f'id="chart-{name}"')
    end = dom.find('id="chart-', start + 1)
    return dom[start:end if end > 0 else None]


def png_busy_fraction(png: bytes) -> float:
    """Share of the decoded image bytes that are not white (0xFF); 0 for a blank page."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    return 1 - raw.count(0xFF) / len(raw)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y "
                    "chromium): the report is not rendered")
@pytest.mark.parametrize("which", ["from_recording", "from_dir"])
def test_chromium_draws_every_chart_without_errors(which, request, tmp_path):
    path, res = request.getfixturevalue(which)
    url = path.resolve().as_uri()
    r = chromium(tmp_path, "--dump-dom", url)
    m = re.search(r'id="report-status" data-charts="(\d+)/(\d+)" data-errors="([^"]*)"', r.stdout)
    assert m, r.stdout[-2000:]
    drawn, total, errors = int(m.group(1)), int(m.group(2)), m.group(3)
    assert total >= 5 and drawn == total and errors == ""
    assert r.stdout.count('class="main-svg"') >= total  # plotly's SVG layers are in the DOM
    # what was drawn: the peak's label as SVG text, one bar per size class and per module
    d = res.data
    peak = d.doc["memory_stats"]["peak_bytes_allocated"] / 2**20
    assert re.search(rf'<text [^>]*>peak {peak:.2f} MiB</text>', r.stdout)
    assert chart_dom(r.stdout, "sizes").count('class="point"') == len(d.hist) > 10
    bars = report_html.module_bars(d)
    n_mods = len({m for _, b in bars for m in b})
    assert chart_dom(r.stdout, "modules").count('class="point"') == len(bars) * n_mods
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert console == []
    shot = tmp_path / "shot.png"
    r = chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", url)
    assert shot.exists(), r.stderr[-2000:]
    assert png_busy_fraction(shot.read_bytes()) > 0.05


def test_console_error_detection_works(tmp_path):
    """The checks above would see a broken page: an uncaught error reaches the DOM marker and
    Chromium's stderr."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    from nvse_monitor.views.report import html as report_html

    tpl = (Path(report_html.__file__).parent / "template.html").read_text()
    page = tpl.replace("$body", "<script>undefinedFunction();</script>").replace(
        "$plotlyjs", "")
    bad = tmp_path / "bad.html"
    bad.write_text(page)
    r = chromium(tmp_path, "--dump-dom", bad.as_uri())
    assert 'data-errors="Uncaught ReferenceError: undefinedFunction is not defined"' in r.stdout
    assert any("Uncaught ReferenceError" in ln for ln in r.stderr.splitlines())


def test_chromium_here_is_offline(tmp_path):
    """The flags above cut the network: a page that needed plotly.js from a CDN would not get
    it, so the 'every chart drawn' check also proves the report needs no network."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    page = tmp_path / "net.html"
    page.write_text('<html><body><script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>'
                    '<script>document.body.setAttribute("data-p", typeof Plotly)</script>'
                    "</body></html>")
    r = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert 'data-p="undefined"' in r.stdout, r.stdout[-500:]


@pytest.mark.parametrize("kind", ["recording", "directory"])
def test_report_shows_stalls_and_uncertain_blocks(tmp_path, kind):
    import ring_session

    rec = ring_session.write(tmp_path / "ring.nvmrec")
    source = rec
    if kind == "directory":
        source = tmp_path / "out"
        replay(rec, source)
    build_report(source, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert '<div class="k">stalls</div><div class="v">250 <span class="note">(1.50 s, longest ' \
        '50.0 ms)</span></div>' in html
    assert '<div class="k">uncertain blocks</div><div class="v">1</div>' in html
    assert "Uncertain: 1 block, 40 bytes set aside, not leaks" in html
    assert "allocated at or before 0.200000 s, when free records were lost (1 free/realloc " \
        "record was dropped)" in html
    assert "Leaks: 1 block, 7 bytes live at end" in html
    assert "Stall burst: 250 hooked calls waited for a free ring slot" in html
