"""`nvse-monitor report`: the HTML report from a recording and from an output directory; its
figures agree with the replay's files; headless Chromium draws every chart without errors."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import REPO

from nvse_monitor.pipeline import replay
from nvse_monitor.report import build_report

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
    assert d.doc["memory_stats"] == doc["memory_stats"]
    # every successful allocation of the recording is in exactly one size bin
    assert sum(h[1] for h in d.hist) == doc["memory_stats"]["total_allocations"]
    assert sum(h[2] for h in d.hist) == doc["memory_stats"]["total_bytes_allocated"]
    # the leak table is the leaks CSV's
    csv_rows = (replayed / "MemoryPoolNVSE_leaks.csv").read_text().splitlines()
    assert len(d.leaks.sites) + len(d.leaks.modules) == len(csv_rows) - 1
    assert d.leaks.bytes == doc["memory_stats"]["current_bytes_allocated"]
    # the peak is marked at its value, within the series' time span
    assert max(d.peak) == doc["memory_stats"]["peak_bytes_allocated"]
    assert d.t[0] <= d.peak_t <= d.t[-1]
    # largest allocations: sorted, and every PERF line of the log is among them (sizes)
    sizes = [x.size for x in d.largest]
    assert sizes == sorted(sizes, reverse=True)
    perf = re.findall(r"Large allocation: (\d+) bytes took (\d+) micro",
                      (replayed / "MemoryPoolNVSE_rpmalloc.log").read_text())
    top = {(x.size, x.dur_us) for x in d.largest}
    assert perf and {(int(a), int(b)) for a, b in perf if int(a) >= sizes[-1]} <= top
    html = path.read_text()
    assert html.count('class="plotly-graph-div"') == 6
    assert "<script src=" not in html  # everything inline: opens offline


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
    assert d.leaks is not None and d.leaks.bytes == doc["memory_stats"]["current_bytes_allocated"]
    assert d.hist is None  # needs a recording
    html = path.read_text()
    assert html.count('class="plotly-graph-div"') == 4
    assert "the size histogram needs a recording" in html


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
             "--virtual-time-budget=10000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


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
    path, _res = request.getfixturevalue(which)
    url = path.resolve().as_uri()
    r = chromium(tmp_path, "--dump-dom", url)
    m = re.search(r'id="report-status" data-charts="(\d+)/(\d+)" data-errors="([^"]*)"', r.stdout)
    assert m, r.stdout[-2000:]
    drawn, total, errors = int(m.group(1)), int(m.group(2)), m.group(3)
    assert total >= 4 and drawn == total and errors == ""
    assert r.stdout.count('class="main-svg"') >= total  # plotly's SVG layers are in the DOM
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
    from nvse_monitor.report import html as report_html

    tpl = (Path(report_html.__file__).parent / "template.html").read_text()
    page = tpl.replace("$body", "<script>undefinedFunction();</script>").replace(
        "$plotlyjs", "")
    bad = tmp_path / "bad.html"
    bad.write_text(page)
    r = chromium(tmp_path, "--dump-dom", bad.as_uri())
    assert 'data-errors="Uncaught ReferenceError: undefinedFunction is not defined"' in r.stdout
    assert any("Uncaught ReferenceError" in ln for ln in r.stderr.splitlines())
