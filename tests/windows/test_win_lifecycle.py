"""How a Windows session ends under Wine (Ctrl-C is in test_win_sessions' attach tests):
--duration, a target that crashes, a host that is killed; then the views from the Windows Python
(status, report, top --once, /metrics) and every fixture replayed byte-identical to Linux."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from test_golden import recording_for

from windows.fakes import PeInstall
from windows.winlane import (
    Monitor,
    assert_exact,
    game_env,
    read_truth,
    run_monitor,
    running_game,
    wait_truth,
    winpath,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_duration_ends_the_session(pe: PeInstall, tmp_path: Path) -> None:
    with running_game(pe.game, tmp_path) as (_, pid):
        p = run_monitor(["attach", str(pid), "--duration", "4", "--out", winpath(tmp_path / "o")],
                        cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "session ended: duration" in p.stderr
    status = (tmp_path / "o" / "MemoryPoolNVSE_status.txt").read_text()
    assert "Status: SHUTDOWN" in status


def test_target_that_crashes(pe: PeInstall, tmp_path: Path) -> None:
    """The game dies of an access violation after its workload: the session ends on its own,
    says so, and its files hold every call up to the crash."""
    p = run_monitor(["spawn", "--out", winpath(tmp_path / "o"), "--record",
                     winpath(tmp_path / "c.nvmrec"), "--", "FalloutNV.exe"], cwd=pe.root,
                    env=game_env(FAKE_GAME_TRUTH=winpath(tmp_path / "truth.txt"),
                                 FAKE_GAME_CRASH="1"))
    truth = wait_truth(tmp_path / "truth.txt", 5)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "crashed: access-violation at FalloutNV.exe+" in p.stderr, p.stderr[-1500:]
    assert_exact(truth, tmp_path / "c.nvmrec")
    assert "bye" not in (tmp_path / "truth.txt").read_text()  # it did crash
    stats = json.loads((tmp_path / "o" / "MemoryPoolNVSE_stats.json").read_text())
    assert stats["monitor"]["dropped_events"] == 0


def _host_pids(token: str) -> list[int]:
    """Unix PIDs of the Windows python.exe whose command line holds `token`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and "python.exe" in args and token in args \
                and "start.exe" not in args:
            pids.append(int(proc.name))
    return pids


def test_killed_host_leaves_the_game_running(pe: PeInstall, tmp_path: Path) -> None:
    """SIGKILL to the Windows Python while it monitors: the agent unloads, the game finishes its
    work unharmed and exits 0."""
    token = winpath(tmp_path / "killed")
    with running_game(pe.game, tmp_path) as (game, pid):
        mon = Monitor(["attach", str(pid), "--out", token], cwd=tmp_path)
        try:
            mon.wait_for("monitoring ")
            (tmp_path / "go").touch()
            wait_truth(tmp_path / "truth.txt")
            pids = _host_pids(token)
            assert pids, "the Windows python.exe of the monitor was not found"
            for hp in pids:
                os.kill(hp, signal.SIGKILL)
            mon.wait(timeout=60)
        finally:
            mon.close()
        (tmp_path / "hold").touch()
        assert game.wait(timeout=120) == 0, read_truth(tmp_path / "truth.txt").error
    assert "bye" in (tmp_path / "truth.txt").read_text()


@pytest.fixture(scope="module")
def session_dir(pe: PeInstall, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("win-views")
    p = run_monitor(["spawn", "--out", winpath(work / "o"), "--record", winpath(work / "v.nvmrec"),
                     "--", "FalloutNV.exe"], cwd=pe.root,
                    env=game_env(FAKE_GAME_TRUTH=winpath(work / "truth.txt")))
    assert p.returncode == 0, p.stderr[-1500:]
    return work


def test_status_from_windows(session_dir: Path) -> None:
    p = run_monitor(["status", winpath(session_dir / "o")], cwd=session_dir)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Status: SHUTDOWN" in p.stdout


def test_report_from_windows(session_dir: Path) -> None:
    for source in ("o", "v.nvmrec"):
        html = session_dir / f"r-{source}.html"
        p = run_monitor(["report", winpath(session_dir / source), "-o", winpath(html)],
                        cwd=session_dir)
        assert p.returncode == 0, p.stderr[-1500:]
        text = html.read_text(encoding="utf-8")
        assert "nvse-monitor report: FalloutNV.exe" in text


def test_top_once_from_windows(session_dir: Path) -> None:
    p = run_monitor(["top", winpath(session_dir / "o"), "--once"], cwd=session_dir)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "FalloutNV.exe" in p.stdout and "fnvplugin_late.dll" in p.stdout


def test_metrics_from_windows(pe: PeInstall, tmp_path: Path) -> None:
    """/metrics served by the Windows Python during an attach session (Wine's sockets are the
    host's: scraped from Linux)."""
    port = 19000 + os.getpid() % 1000
    with running_game(pe.game, tmp_path) as (_, pid):
        mon = Monitor(["attach", str(pid), "--out", winpath(tmp_path / "o"),
                       "--metrics-port", str(port)], cwd=tmp_path)
        try:
            mon.wait_for("monitoring ")
            (tmp_path / "go").touch()
            wait_truth(tmp_path / "truth.txt")
            time.sleep(2)
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
            mon.ctrl_c()
            assert mon.wait() == 0, mon.stderr[-1500:]
        finally:
            mon.close()
    text = body.decode()
    assert "nvse_" in text and 'heap="game"' in text, text[:1500]


@pytest.mark.parametrize("case", sorted(p.name for p in (FIXTURES / "expected").iterdir()))
def test_fixture_replays_byte_identical(case: str, tmp_path: Path) -> None:
    """The Windows replay of each golden case (a damaged one too: a fixture cut short, as in
    tests/test_golden.py) writes the golden files byte for byte (one line ending, '\\n', on
    every platform: docs/files.md) and, when damaged, the same one-line error."""
    rec = recording_for(case, tmp_path)
    out = tmp_path / "out"
    p = run_monitor(["replay", winpath(rec), "--out", winpath(out)], cwd=tmp_path)
    golden = FIXTURES / "expected" / case
    error = golden / "error.txt"
    if error.exists():
        assert p.returncode != 0 and error.read_text().strip() in p.stderr, p.stderr[-1500:]
    else:
        assert p.returncode == 0, p.stderr[-1500:]
    want = {f.name: f.read_bytes() for f in golden.iterdir() if f.name != "error.txt"}
    got = {f.name: f.read_bytes() for f in out.iterdir()}
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        assert got[name] == data, name
