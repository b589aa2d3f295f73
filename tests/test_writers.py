"""Unit tests of the four writers: exact formats (the spec's own examples), atomic rewrites,
buffering, and write failures with retry."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from nvse_monitor import BUILD_DATE, __version__
from nvse_monitor.outputs import json as json_writer
from nvse_monitor.outputs import status as status_writer
from nvse_monitor.outputs.csv import HEADER, CsvWriter
from nvse_monitor.outputs.fileio import AppendFile, atomic_write_text
from nvse_monitor.outputs.files import FilePaths, OutputDirError, OutputFiles
from nvse_monitor.outputs.log import LogWriter
from nvse_monitor.outputs.rows import CsvRow, LogLine, Snapshot, Status
from nvse_monitor.stream.messages import SessionMeta

# The spec's example moment: its JSON "timestamp" and the counters it shows.
SPEC_WALL_US = 1697371092845234
ZERO_US = SPEC_WALL_US - 125_400_000  # wall clock at agent time zero


def make_snapshot(**kw) -> Snapshot:
    """The spec's example figures (memory_stats, performance, health, logging)."""
    d = dict(
        ts_us=125_400_000, status=Status.ACTIVE, is_healthy=True, uptime_seconds=125.4,
        total_allocations=2847, total_frees=2203, current_allocations=644,
        peak_allocations=892, total_bytes_allocated=15728640, total_bytes_freed=12582912,
        current_bytes_allocated=3145728, peak_bytes_allocated=4194304, allocation_failures=0,
        average_allocation_size=5524.8, allocations_per_second=22.7, frees_per_second=17.6,
        error_count=0, warning_count=2, critical_count=0, last_error="none",
        tracked_allocations=644, max_tracked_allocations=32768,
        log_counts={"DEBUG": 0, "INFO": 156, "WARN": 2, "ERROR": 0, "CRITICAL": 0, "PERF": 8},
    )
    d.update(kw)
    return Snapshot(**d)


def make_meta(**kw) -> SessionMeta:
    d = dict(target="test", pid=5678, arch="x64", platform="linux", profile="libc",
             wall_clock_zero_us=ZERO_US, utc_offset_s=0)
    d.update(kw)
    return SessionMeta(**d)


# The spec's JSON example, with `plugin` describing nvse-monitor and the added section.
SPEC_JSON = """{
  "plugin": {
    "name": "nvse-monitor",
    "version": "@VERSION@",
    "build_date": "@BUILD_DATE@",
    "status": "active",
    "uptime_seconds": 125.4,
    "is_healthy": true
  },
  "memory_stats": {
    "total_allocations": 2847,
    "total_frees": 2203,
    "current_allocations": 644,
    "peak_allocations": 892,
    "total_bytes_allocated": 15728640,
    "total_bytes_freed": 12582912,
    "current_bytes_allocated": 3145728,
    "peak_bytes_allocated": 4194304,
    "allocation_failures": 0,
    "average_allocation_size": 5524.8
  },
  "performance": {
    "allocations_per_second": 22.7,
    "frees_per_second": 17.6,
    "memory_usage_mb": 3.00,
    "peak_memory_usage_mb": 4.00
  },
  "health": {
    "error_count": 0,
    "warning_count": 2,
    "critical_count": 0,
    "last_error": "none",
    "tracked_allocations": 644,
    "max_tracked_allocations": 32768
  },
  "logging": {
    "debug_logs": 0,
    "info_logs": 156,
    "warning_logs": 2,
    "error_logs": 0,
    "critical_logs": 0,
    "performance_logs": 8
  },
  "timestamp": 1697371092845234,
  "monitor": {}
}
""".replace("@VERSION@", __version__).replace("@BUILD_DATE@", BUILD_DATE)

SPEC_STATUS = """MemoryPoolNVSE RPmalloc Status
==============================
Status: ACTIVE
Health: HEALTHY
Uptime: 125.4 seconds
Memory Usage: 3.00 MB
Peak Memory: 4.00 MB
Allocations: 2847
Errors: 0
Last Update: 1697371092845234
"""


# ---- JSON -----------------------------------------------------------------------------------

def test_json_renders_the_spec_example_exactly():
    assert json_writer.render(make_snapshot(), ZERO_US) == SPEC_JSON


def test_json_monitor_section_and_odd_values():
    snap = make_snapshot(
        status=Status.DEGRADED, is_healthy=False, average_allocation_size=float("nan"),
        frees_per_second=-0.01, last_error='bad "quote"\nnewline',
        monitor={"target": "fnv", "dropped": 3, "ratio": 0.25, "heaps": {"game": [1, 2]},
                 "empty": [], "status": Status.ERROR, "path": Path("/x")},
    )
    doc = json.loads(json_writer.render(snap, ZERO_US))
    assert doc["plugin"]["status"] == "degraded"
    assert doc["plugin"]["is_healthy"] is False
    assert doc["memory_stats"]["average_allocation_size"] is None  # NaN is not JSON
    assert str(doc["performance"]["frees_per_second"]) == "0.0"  # never "-0.0"
    assert doc["health"]["last_error"] == 'bad "quote"\nnewline'
    assert doc["monitor"] == {"target": "fnv", "dropped": 3, "ratio": 0.25,
                              "heaps": {"game": [1, 2]}, "empty": [], "status": "ERROR",
                              "path": "/x"}


def test_json_indentation_matches_json_dumps_for_plain_values():
    value = {"a": [1, {"b": None, "c": [True, "x"]}], "d": {}, "e": 1.5}
    assert json_writer.encode(value) == json.dumps(value, indent=2)


# ---- status ---------------------------------------------------------------------------------

def test_status_renders_the_spec_example_exactly():
    assert status_writer.render(make_snapshot(), ZERO_US, "MemoryPoolNVSE") == SPEC_STATUS


def test_status_unhealthy_and_other_prefix():
    text = status_writer.render(make_snapshot(status=Status.ERROR, is_healthy=False,
                                              error_count=4), ZERO_US, "Game")
    lines = text.splitlines()
    assert lines[:2] == ["Game RPmalloc Status", "=" * len("Game RPmalloc Status")]
    fields = status_writer.parse(text)
    assert (fields["Status"], fields["Health"], fields["Errors"]) == ("ERROR", "UNHEALTHY", "4")


def test_status_errors_count_what_made_the_session_unhealthy():
    """A target lost is a CRITICAL line, not an ERROR one: `Errors:` counts both (issue 12)."""
    text = status_writer.render(make_snapshot(status=Status.SHUTDOWN, is_healthy=False,
                                              error_count=0, critical_count=1), ZERO_US, "P")
    assert status_writer.parse(text)["Errors"] == "1"
    text = status_writer.render(make_snapshot(error_count=2, critical_count=3), ZERO_US, "P")
    assert status_writer.parse(text)["Errors"] == "5"


# ---- CSV ------------------------------------------------------------------------------------

def test_csv_header_rows_and_parse(tmp_path):
    w = CsvWriter(tmp_path / "p.csv", ZERO_US)
    w.start()
    w.add(CsvRow(125_400_000, 22.7, 17.6, 3145728, 4194304))
    w.add(CsvRow(130_400_000, 24.06, 19.25, 3356672, 4194304))
    assert (tmp_path / "p.csv").read_text() == HEADER  # buffered until flush
    w.flush()
    text = (tmp_path / "p.csv").read_text()
    assert text.splitlines()[:2] == [
        "timestamp,allocs_per_sec,frees_per_sec,memory_usage,peak_memory",
        "1697371092845234,22.7,17.6,3145728,4194304",  # the spec's first example row
    ]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["timestamp"]) for r in rows] == [SPEC_WALL_US, SPEC_WALL_US + 5_000_000]
    assert float(rows[1]["allocs_per_sec"]) == 24.1 and int(rows[1]["memory_usage"]) == 3356672


# ---- log ------------------------------------------------------------------------------------

def test_log_line_format_uses_recorded_offset_not_host_tz(tmp_path, monkeypatch):
    offset = -7 * 3600 + 1800
    w = LogWriter(tmp_path / "l.log", ZERO_US, offset)
    expected = datetime.fromtimestamp(SPEC_WALL_US / 1e6, timezone(timedelta(seconds=offset)))
    want = f"[{expected:%Y-%m-%d %H:%M:%S}.845234] [PERF] [TID:1234] Large allocation\n"
    for tz in ("UTC", "Asia/Tokyo", "America/New_York"):
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        assert w.format(LogLine(125_400_000, "PERF", 1234, "Large allocation")) == want
    monkeypatch.undo()
    time.tzset()


def test_log_time_cache_across_seconds_and_days(tmp_path):
    w = LogWriter(tmp_path / "l.log", 86_399_999_999, 0)  # 1970-01-01 23:59:59.999999
    assert w.format_time(0) == "1970-01-01 23:59:59.999999"
    assert w.format_time(1) == "1970-01-02 00:00:00.000000"
    assert w.format_time(0) == "1970-01-01 23:59:59.999999"


def test_log_buffers_until_error_or_flush(tmp_path):
    path = tmp_path / "l.log"
    w = LogWriter(path, ZERO_US)
    path.write_text("old session\n")
    w.start()
    assert path.read_text() == ""  # a new session truncates
    assert w.add(LogLine(1, "INFO", 1, "one")) is False
    assert w.add(LogLine(2, "WARN", 1, "two\nlines")) is False
    assert path.read_text() == ""
    assert w.add(LogLine(3, "ERROR", 2, "three")) is True  # caller flushes at once
    w.flush()
    lines = path.read_text().splitlines()
    assert [ln.split("] ", 3)[1:] for ln in lines] == [
        ["[INFO", "[TID:1", "one"],
        ["[WARN", "[TID:1", "two\\nlines"],
        ["[ERROR", "[TID:2", "three"],
    ]
    w.add(LogLine(4, "INFO", 1, "four"))
    w.flush()
    assert len(path.read_text().splitlines()) == 4  # appends within a session


# ---- OutputFiles: routing, failures, retry ---------------------------------------------------

def test_output_files_route_and_flush_on_error(tmp_path):
    files = OutputFiles(make_meta(), tmp_path / "out", "P", err=io.StringIO())
    files.open()
    p = FilePaths.of(tmp_path / "out", "P")
    assert files.paths == p
    assert [x.name for x in p.all()] == ["P_rpmalloc.log", "P_stats.json",
                                         "P_performance.csv", "P_status.txt"]
    assert files.write(LogLine(1, "INFO", 1, "hello")) == []
    assert files.write(CsvRow(2, 1.0, 0.0, 10, 10)) == []
    assert p.log.read_text() == "" and p.csv.read_text() == HEADER
    assert not p.json.exists()
    files.write(LogLine(3, "CRITICAL", 1, "boom"))
    assert len(p.log.read_text().splitlines()) == 2
    assert p.csv.read_text() == HEADER  # CSV waits for the snapshot
    assert files.write(make_snapshot()) == []
    assert len(p.csv.read_text().splitlines()) == 2
    assert p.json.read_text() == SPEC_JSON.replace("MemoryPool", "")  # no prefix in JSON
    assert p.status.read_text().startswith("P RPmalloc Status\n")


def test_open_fails_clearly_when_dir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    files = OutputFiles(make_meta(), tmp_path / "f" / "out")
    with pytest.raises(OutputDirError, match=r"cannot write to output directory .*f/out.*"):
        files.open()


def test_dir_replaced_by_file_mid_run_then_restored(tmp_path):
    out = tmp_path / "out"
    err = io.StringIO()
    files = OutputFiles(make_meta(), out, err=err)
    files.open()
    files.write(LogLine(1, "INFO", 1, "before"))
    assert files.write(make_snapshot(ts_us=1)) == []
    shutil.rmtree(out)
    out.write_text("not a directory")

    files.write(LogLine(2, "INFO", 1, "during 1"))
    files.write(CsvRow(2, 5.0, 4.0, 100, 200))
    failures = files.write(make_snapshot(ts_us=2))
    assert {f.path for f in failures} == set(files.paths.all())
    assert all(f.error == "Not a directory" for f in failures)
    assert len(err.getvalue().splitlines()) == 4
    assert "cannot write " + str(files.paths.log) + ": Not a directory" in err.getvalue()
    # Still failing: nothing reported twice, nothing lost.
    files.write(LogLine(3, "ERROR", 1, "during 2"))
    assert files.write(make_snapshot(ts_us=3)) == []
    assert len(err.getvalue().splitlines()) == 4

    out.unlink()
    out.mkdir()
    files.write(LogLine(4, "INFO", 1, "after"))
    assert files.write(make_snapshot(ts_us=4, total_allocations=99)) == []
    assert files.failing == set()
    assert "works again" in err.getvalue()
    msgs = [ln.rsplit("] ", 1)[1] for ln in files.paths.log.read_text().splitlines()]
    assert msgs == ["during 1", "during 2", "after"]  # "before" went with the old directory
    assert files.paths.csv.read_text().splitlines()[-1].endswith(",5.0,4.0,100,200")
    assert json.loads(files.paths.json.read_text())["memory_stats"]["total_allocations"] == 99
    assert "Allocations: 99\n" in files.paths.status.read_text()
    assert sorted(os.listdir(out)) == sorted(p.name for p in files.paths.all())  # no temp files


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_enospc_keeps_lines_bounded_and_reports(tmp_path):
    f = AppendFile(Path("/dev/full"), max_pending=100)
    f.lines += [f"line {i:03d}\n" for i in range(30)]  # 9 bytes each
    with pytest.raises(OSError) as e:
        f.flush()
    assert e.value.strerror == "No space left on device"
    assert f.lost_lines == 19  # 270 bytes kept down to 99: 11 whole lines
    f.path = tmp_path / "ok.log"
    f.flush()
    assert f.path.read_text() == "".join(f"line {i:03d}\n" for i in range(19, 30))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_log_notes_lost_lines_once_writable_again(tmp_path):
    w = LogWriter(Path("/dev/full"), ZERO_US)
    w.file.max_pending = 200
    for i in range(20):
        w.add(LogLine(i, "INFO", 7, f"message {i}"))
    with pytest.raises(OSError):
        w.flush(20)
    w.file.path = tmp_path / "l.log"
    w.flush(21)
    lines = w.file.path.read_text().splitlines()
    assert "log lines were lost" in lines[-1] or "log lines were lost" in lines[0]
    lost = int(next(ln for ln in lines if "were lost" in ln).split("nvse-monitor: ")[1].split()[0])
    assert lost + len(lines) - 1 == 20
    assert lines[-1].endswith("message 19")


def test_atomic_rewrites_never_show_partial_files(tmp_path):
    """A reader polling the files while a fast loop rewrites them sees only whole documents."""
    files = OutputFiles(make_meta(), tmp_path, err=io.StringIO())
    files.open()
    files.write(make_snapshot(ts_us=0, total_allocations=0, monitor={"pad": ""}))
    stop = threading.Event()
    seen = {"json": 0, "status": 0, "bad": []}

    def reader() -> None:
        while not stop.is_set():
            try:
                doc = json.loads(files.paths.json.read_text())
                assert doc["monitor"]["pad"] == "x" * doc["memory_stats"]["total_allocations"]
                seen["json"] += 1
                text = files.paths.status.read_text()
                assert text.endswith("\n") and len(text.splitlines()) == 10
                seen["status"] += 1
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                seen["bad"].append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.monotonic() + 1.5
    n = 0
    while time.monotonic() < deadline:
        n += 1
        size = (n * 7919) % 20000  # sizes vary so a torn read would show
        files.write(make_snapshot(ts_us=n, total_allocations=size, monitor={"pad": "x" * size}))
    stop.set()
    t.join()
    assert seen["bad"] == []
    assert seen["json"] > 50 and n > 200
    assert len(os.listdir(tmp_path)) == 4


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "missing" / "f.json", "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]
