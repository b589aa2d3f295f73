"""The single-file nvse-monitor.exe (PyInstaller, tests/windows/build_exe.sh) as a player runs
it, with no Python: attach, launch through nvse_loader, report; exact against the fakes."""

from __future__ import annotations

import time
from pathlib import Path

from windows.fakes import PeInstall
from windows.winlane import (
    Monitor,
    assert_exact,
    game_env,
    run_monitor,
    running_game,
    wait_truth,
    winpath,
)


def test_exe_attach(exe: str, pe: PeInstall, tmp_path: Path) -> None:
    with running_game(pe.game, tmp_path) as (_, pid):
        mon = Monitor(["attach", "FalloutNV.exe", "--out", winpath(tmp_path / "o"), "--record",
                       winpath(tmp_path / "a.nvmrec")], cwd=tmp_path, exe=exe)
        try:
            mon.wait_for("monitoring ")
            (tmp_path / "go").touch()
            truth = wait_truth(tmp_path / "truth.txt")
            time.sleep(2)
            mon.ctrl_c()
            assert mon.wait() == 0, mon.stderr[-1500:]
        finally:
            mon.close()
    assert f"(PID {pid}," in mon.stderr
    assert_exact(truth, tmp_path / "a.nvmrec")


def test_exe_launch_and_report(exe: str, pe: PeInstall, tmp_path: Path) -> None:
    out = tmp_path / "o"
    p = run_monitor(["launch", winpath(pe.root), "--out", winpath(out), "--record",
                     winpath(tmp_path / "l.nvmrec")], cwd=tmp_path, exe=exe,
                    env=game_env(FAKE_GAME_TRUTH=winpath(tmp_path / "truth.txt")))
    assert p.returncode == 0, p.stderr[-1500:]
    truth = wait_truth(tmp_path / "truth.txt", 5)
    assert truth.injected
    assert_exact(truth, tmp_path / "l.nvmrec")
    r = run_monitor(["report", winpath(out), "-o", winpath(tmp_path / "r.html")], cwd=tmp_path,
                    exe=exe)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "nvse-monitor report: FalloutNV.exe" in (tmp_path / "r.html").read_text("utf-8")
