"""The offline commands through click (CliRunner) and one run of the installed entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_writers import ZERO_US, make_snapshot

from nvse_monitor import __version__
from nvse_monitor.cli import main
from nvse_monitor.outputs import status as status_writer
from nvse_monitor.outputs.files import FilePaths
from nvse_monitor.outputs.pipeline import Pacer, replay
from nvse_monitor.outputs.rows import Status
from nvse_monitor.stream.recording import write_recording
from nvse_monitor.stream.synthetic import generate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rec") / "s.nvmrec"
    meta, msgs = generate(60_000, seed=7, rate_eps=15_000)  # 4 s: several 1-s chunks
    write_recording(path, meta, msgs)
    return path


@pytest.fixture(scope="module")
def truncated(recording: Path) -> Path:
    data = recording.read_bytes()
    path = recording.with_name("cut.nvmrec")
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_replay_writes_four_files(recording, tmp_path):
    r = run("replay", recording, "--out", tmp_path / "o", "--prefix", "P")
    assert r.exit_code == 0, r.output
    paths = FilePaths.of(tmp_path / "o", "P")
    assert all(p.stat().st_size > 0 for p in paths.all())
    doc = json.loads(paths.json.read_text())
    assert doc["plugin"]["status"] == "shutdown"
    assert doc["memory_stats"]["total_allocations"] > 10_000
    events = doc["monitor"]["agent_counters"]["published"]  # records the agent sent
    assert r.stdout.startswith(f"{events:,} events replayed into ") and r.stderr == ""


def test_replay_default_out_dir(recording, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("replay", recording).exit_code == 0
    assert (tmp_path / "nvse-monitor-out" / "MemoryPoolNVSE_status.txt").exists()
    r = run("status")  # the same default directory
    assert r.exit_code == 0 and r.stdout.startswith("MemoryPoolNVSE RPmalloc Status\n")


def test_truncated_recording_exit_2_one_line_and_files_written(truncated, tmp_path):
    r = run("replay", truncated, "-o", tmp_path)
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and str(truncated) in lines[0] and " at byte " in lines[0]
    offset = int(lines[0].rsplit(" at byte ", 1)[1])
    assert 0 < offset < truncated.stat().st_size
    paths = FilePaths.of(tmp_path)
    assert "Status: SHUTDOWN\n" in paths.status.read_text()
    assert paths.log.read_text().splitlines()[-1].endswith("monitoring stopped ===")
    doc = json.loads(paths.json.read_text())
    assert doc["memory_stats"]["total_allocations"] > 0
    assert len(paths.csv.read_text().splitlines()) > 2


@pytest.mark.parametrize("content,problem", [
    (None, "cannot open recording (No such file or directory)"),
    (b"", "truncated header"),
    (b"PK\x03\x04 zip file", "not an nvse-monitor recording (bad magic) at byte 0"),
])
def test_unreadable_recording_one_line_exit_2_no_files(tmp_path, content, problem):
    rec = tmp_path / "r.nvmrec"
    if content is not None:
        rec.write_bytes(content)
    r = run("replay", rec, "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and problem in r.stderr and str(rec) in r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_replay_unwritable_out_dir(recording, tmp_path):
    (tmp_path / "f").write_text("")
    r = run("replay", recording, "-o", tmp_path / "f" / "o")
    assert r.exit_code == 2
    assert r.stderr.strip() == "nvse-monitor: error: cannot write to output directory " \
        f"{tmp_path}/f/o: Not a directory"


def test_replay_progress_reports_bytes(recording, tmp_path):
    seen: list[int] = []
    result = replay(recording, tmp_path, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == recording.stat().st_size
    assert result.messages == len(seen) and result.error is None
    assert result.final is not None and result.final.final


def test_pacer_waits_by_event_time():
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    p = Pacer(clock=lambda: now[0], sleep=sleep)
    p.wait(5_000_000)  # first message: time zero
    p.wait(5_500_000)
    now[0] += 2.0  # processing fell behind: no sleep
    p.wait(6_000_000)
    p.wait(9_000_000)
    assert slept == [0.5, pytest.approx(1.5)]  # the schedule is kept: catches up, then waits


def test_replay_realtime_takes_the_recordings_time(tmp_path):
    rec = tmp_path / "slow.nvmrec"
    meta, msgs = generate(3000, seed=3, rate_eps=10_000)  # about 0.3 s of events
    write_recording(rec, meta, msgs)
    t0 = time.monotonic()
    r = run("replay", rec, "-o", tmp_path / "o", "--realtime")
    elapsed = time.monotonic() - t0
    span = json.loads((tmp_path / "o" / "MemoryPoolNVSE_stats.json").read_text())
    assert r.exit_code == 0
    assert elapsed >= span["plugin"]["uptime_seconds"] * 0.8


# ---- status ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status,healthy,code", [
    (Status.ACTIVE, True, 0), (Status.ACTIVE, False, 1), (Status.DEGRADED, True, 1),
    (Status.DEGRADED, False, 1), (Status.ERROR, False, 2), (Status.SHUTDOWN, True, 0),
    (Status.SHUTDOWN, False, 2), (Status.INITIALIZING, True, 3),
    (Status.UNINITIALIZED, True, 3),
])
def test_status_exit_codes(tmp_path, status, healthy, code):
    text = status_writer.render(make_snapshot(status=status, is_healthy=healthy), ZERO_US, "Q")
    FilePaths.of(tmp_path, "Q").status.write_text(text)
    r = run("status", tmp_path, "--prefix", "Q")
    assert r.exit_code == code
    assert r.stdout == text


def test_status_missing_or_garbage_is_unknown(tmp_path):
    r = run("status", tmp_path)
    assert r.exit_code == 3 and "cannot read" in r.stderr and "No such file" in r.stderr
    FilePaths.of(tmp_path).status.write_text("hello\n")
    r = run("status", tmp_path)
    assert r.exit_code == 3 and "no 'Status:' line" in r.stderr
    FilePaths.of(tmp_path).status.write_bytes(b"\xff\xfe\x00")
    r = run("status", tmp_path)
    assert r.exit_code == 3 and "not a status file" in r.stderr


# ---- info -----------------------------------------------------------------------------------

def test_info_intact_and_damaged(recording, truncated):
    r = run("info", recording)
    assert r.exit_code == 0
    assert "target: synthetic-workload" in r.stdout and "ended cleanly: yes" in r.stdout
    assert "records: 60000 (ALLOC" in r.stdout
    r = run("info", truncated)
    assert r.exit_code == 2
    assert "modules (" in r.stdout and "ended cleanly: no" in r.stdout  # the intact part
    err = r.stderr.splitlines()
    assert len(err) == 1 and str(truncated) in err[0] and " at byte " in err[0]


def test_info_missing_file(tmp_path):
    r = run("info", tmp_path / "nope.nvmrec")
    assert r.exit_code == 2 and r.stdout == "" and "cannot open recording" in r.stderr


# ---- the installed entry point --------------------------------------------------------------

def test_installed_entry_point(tmp_path):
    exe = shutil.which("nvse-monitor")
    if exe is None:
        pytest.skip("nvse-monitor is not installed on PATH (pip install -e .)")
    v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and __version__ in v.stdout
    # the compiled per-record loops are built with the package here (setup.py; CI has gcc)
    assert "host kernels: native (_kernels" in v.stdout, v.stdout
    fixture = ROOT / "fixtures" / "synthetic-small.nvmrec"
    r = subprocess.run([exe, "replay", str(fixture), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar: stderr is not a terminal
    expected = ROOT / "fixtures" / "expected" / "synthetic-small"
    for p in FilePaths.of(tmp_path).all():
        assert p.read_bytes() == (expected / p.name).read_bytes()
    s = subprocess.run([exe, "status", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert s.returncode == 0 and "Status: SHUTDOWN" in s.stdout


def test_progress_bar_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal: click's progress bar reaches 100%; stdout stays clean."""
    import os
    import pty
    import sys

    fixture = ROOT / "fixtures" / "synthetic-small.nvmrec"
    primary, secondary = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "nvse_monitor", "replay", str(fixture), "-o",
                            str(tmp_path)], stdin=secondary, stdout=subprocess.PIPE,
                           stderr=secondary, timeout=120)
    finally:
        os.close(secondary)
    seen = b""
    try:
        while chunk := os.read(primary, 65536):
            seen += chunk
    except OSError:  # EIO: the terminal's other side is closed
        pass
    finally:
        os.close(primary)
    assert r.returncode == 0
    assert b"replaying" in seen and b"100%" in seen
    assert b"replayed into" in r.stdout and b"\r" not in r.stdout


def test_replay_counts_events_in_words(tmp_path):
    meta, msgs = generate(1, seed=5)
    rec = tmp_path / "one.nvmrec"
    write_recording(rec, meta, list(msgs))
    r = run("replay", rec, "-o", tmp_path / "o")
    assert r.stdout.startswith("1 event replayed into "), r.stdout
    log = FilePaths.of(tmp_path / "o").log.read_text()
    assert "Final statistics: 1 allocation, " in log, log
    import re

    assert not re.search(r"\b1 (allocations|frees|bytes|failures|events|call sites|modules)\b",
                         log), log


def test_plural():
    from nvse_monitor.words import plural

    assert plural(1, "event") == "1 event" and plural(0, "event") == "0 events"
    assert plural(1234, "call site", sep=True) == "1,234 call sites"
    assert plural(2, "entry", "entries") == "2 entries"


def test_interrupted_replay_says_so_everywhere(tmp_path):
    """A real SIGINT to a real `nvse-monitor replay --realtime`: the log, the JSON and the
    status say the replay was interrupted, `status` exits 2 (not 0), and no leak report."""
    import signal
    import sys

    meta, msgs = generate(50_000, seed=3, rate_eps=5_000)  # ~10 s of events at --realtime
    rec = tmp_path / "long.nvmrec"
    write_recording(rec, meta, list(msgs))
    out = tmp_path / "o"
    out.mkdir()
    stale = FilePaths.of(out).json.parent / "MemoryPoolNVSE_leaks.csv"
    stale.write_text("an earlier run's leak report\n")
    p = subprocess.Popen([sys.executable, "-m", "nvse_monitor", "replay", str(rec), "--realtime",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    paths = FilePaths.of(out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # under way: a batch has gone through
        if paths.log.exists() and "ACTIVE" in paths.log.read_text():
            break
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.startswith("nvse-monitor: replay interrupted: stopped by SIGINT (Ctrl-C) at "
                             "byte "), stderr
    log = paths.log.read_text()
    assert "[ERROR]" in log and "Replay interrupted, figures cover only the part before it: " \
        "stopped by SIGINT (Ctrl-C)" in log
    assert "Status: ERROR -> SHUTDOWN" in log
    assert "Leak report" not in log and "Live at end" not in log
    assert "No leak report: the replay was interrupted" in log
    assert not stale.exists()  # no leak report, not even an earlier one
    doc = json.loads(paths.json.read_text())
    assert doc["plugin"]["status"] == "shutdown" and doc["plugin"]["is_healthy"] is False
    assert doc["health"]["last_error"].startswith("Replay interrupted")
    assert doc["monitor"]["interrupted"] is True
    total = doc["monitor"]["agent_counters"]
    assert 0 < total["allocs"] < 50_000  # a part, not all of it
    fields = status_writer.parse(paths.status.read_text())
    assert (fields["Status"], fields["Health"], fields["Errors"]) == ("SHUTDOWN", "UNHEALTHY", "1")
    r = run("status", out)
    assert r.exit_code == 2
    assert r.stdout.splitlines()[-1].startswith("Last Error: Replay interrupted")


def test_complete_replay_json_has_no_interrupted_key(recording, tmp_path):
    run("replay", recording, "-o", tmp_path / "o")
    doc = json.loads(FilePaths.of(tmp_path / "o").json.read_text())
    assert "interrupted" not in doc["monitor"] and doc["plugin"]["is_healthy"] is True
    assert (tmp_path / "o" / "MemoryPoolNVSE_leaks.csv").exists()


def test_info_example_in_docs_is_current():
    """docs/cli.md's `info` example: every line it shows is in the command's output, in order
    (`...` stands for lines left out)."""
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    block = doc.split("$ nvse-monitor info ", 1)[1].split("```", 1)[0].splitlines()
    rec, shown = block[0].strip(), [ln for ln in block[1:] if ln.strip() and ln != "..."]
    r = run("info", Path(__file__).parent.parent / rec)
    out = [ln.replace(str(Path(__file__).parent.parent) + "/", "") for ln in r.stdout.splitlines()]
    pos = 0
    for line in shown:
        assert line in out[pos:], f"docs/cli.md shows {line!r}; info prints:\n" + "\n".join(out)
        pos = out.index(line, pos) + 1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_import_starts_no_blas_threads_and_leaves_the_environment():
    """nvse_monitor imports numpy with one OpenBLAS thread (its workers busy-wait at start-up)
    and puts the environment back, so a spawned target gets the user's."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    count = ("import os; "
             "print(len(os.listdir('/proc/self/task')), 'OPENBLAS_NUM_THREADS' in os.environ)")

    def run(imports: str) -> list[str]:
        r = subprocess.run([sys.executable, "-c", f"{imports}; {count}"], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    plain = run("import numpy")
    if plain[0] == "1":
        pytest.skip("this numpy starts no BLAS threads here (one CPU, or no OpenBLAS)")
    assert run("import nvse_monitor, numpy") == ["1", "False"]
    assert run("import nvse_monitor.engine.engine, nvse_monitor.cli") == ["1", "False"]
