"""`nvse-monitor top`: frames rendered into a recording rich Console, the directory source
following a --realtime replay, and real terminals in tmux (`top DIR` with keys, `attach --top`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Target
from rich.console import Console

from nvse_monitor.pipeline import replay
from nvse_monitor.top import SPARK, Dashboard, DirSource, sparkline

FIXTURE = REPO / "fixtures" / "synthetic-mixed.nvmrec"


def text_of(dash: Dashboard, width: int = 110) -> str:
    con = Console(record=True, width=width, file=open("/dev/null", "w"))  # noqa: SIM115
    con.print(dash.render(width))
    return con.export_text()


def test_sparkline_scales_to_the_maximum():
    assert sparkline([0, 5, 10], 10) == SPARK[0] + SPARK[4] + SPARK[-1]
    assert sparkline([3] * 50, 8) == SPARK[-1] * 8  # the last `width` values
    assert sparkline([], 5) == "" and sparkline([0, 0], 5) == SPARK[0] * 2


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay")
    replay(FIXTURE, out)
    return out


def test_frame_from_a_finished_directory(replayed):
    dash = Dashboard(DirSource(replayed, "MemoryPoolNVSE"))
    dash.poll()
    doc = json.loads((replayed / "MemoryPoolNVSE_stats.json").read_text())
    out = text_of(dash)
    ms = doc["memory_stats"]
    assert "SHUTDOWN" in out and "HEALTHY" in out
    assert f"{ms['total_allocations']:,}" in out and f"{ms['total_frees']:,}" in out
    assert f"{ms['peak_bytes_allocated'] / 2**20:,.2f} MB" in out
    assert f"{doc['monitor']['dropped_events']:,}" in out
    top_mod = max(doc["monitor"]["modules_live_bytes"].items(), key=lambda kv: kv[1])[0]
    assert top_mod in out
    assert "Dropped" in out  # a WARN line of the log
    dash.toggle_leaks()
    dash.poll()
    out = text_of(dash)
    assert "live now by call site" in out and "FalloutNV.exe+0x" in out


def test_waiting_for_a_session():
    dash = Dashboard(DirSource(Path("/nonexistent-dir"), "P"))
    dash.poll()
    assert "waiting for /nonexistent-dir/P_stats.json" in text_of(dash)


def test_follows_a_directory_being_written(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nvse_monitor", "replay", FIXTURE, "-o", out,
                             "--realtime"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        dash = Dashboard(DirSource(out, "MemoryPoolNVSE"))
        rates = []
        while proc.poll() is None:
            dash.poll()
            rates.append(dash.rates[0])
            time.sleep(0.1)
        dash.poll()
    finally:
        proc.kill()
    assert len(dash.mem) >= 3  # several snapshots seen: the sparkline has history
    assert max(rates) > 0
    assert "SHUTDOWN" in text_of(dash)


# ---- real terminals ------------------------------------------------------------------------------

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y "
                                "tmux): no terminal test")


class Tmux:
    def __init__(self, name: str, cmd: list[str], width: int = 120, height: int = 50) -> None:
        self.name = name
        cmdline = " ".join(f"'{c}'" for c in cmd)
        subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", str(width), "-y",
                        str(height), f"cd {REPO} && env -u COLUMNS -u LINES {cmdline}; sleep 30"],
                       check=True)  # pytest exports COLUMNS=80: let the program see the pane

    def screen(self) -> str:
        r = subprocess.run([TMUX, "capture-pane", "-p", "-t", self.name], capture_output=True,
                           text=True)
        return r.stdout

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.screen()
            if text in s:
                return s
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not on the screen:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        subprocess.run([TMUX, "send-keys", "-t", self.name, *keys], check=True)

    def kill(self) -> None:
        subprocess.run([TMUX, "kill-session", "-t", self.name], capture_output=True)


@needs_tmux
def test_top_dir_in_tmux_with_keys(replayed):
    t = Tmux(f"nvse-top-{time.monotonic_ns()}", [sys.executable, "-m", "nvse_monitor", "top",
                                                 str(replayed)])
    try:
        s = t.wait_for("nvse-monitor top")
        assert "SHUTDOWN" in t.wait_for("allocs/s") and "l: leak report" in s
        t.keys("l")
        assert "FalloutNV.exe+0x" in t.wait_for("live now by call site")
        t.keys("q")
        time.sleep(0.8)
        # after q the alternate screen is gone and the last frame is printed once
        s = t.screen()
        assert s.count("nvse-monitor top") == 1
    finally:
        t.kill()


@needs_tmux
@pytest.mark.frida
def test_attach_top_in_tmux(targets, tmp_path, live_procs):
    exe = targets.build("hammer", "x64")
    target = Target([exe, "--seconds", "8", "--rate", "20000"])
    live_procs.append(target)
    target.wait_ready()
    target.go()
    out = tmp_path / "out"
    t = Tmux(f"nvse-attach-top-{time.monotonic_ns()}",
             [sys.executable, "-m", "nvse_monitor", "attach", str(target.pid), "--out", str(out),
              "--top", "--duration", "2.5"])
    try:
        s = t.wait_for("ACTIVE")
        assert "nvse-monitor top" in s and "allocs/s" in s and "hammer" in s
        s = t.wait_for("session ended: duration", 30)
        doc = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
        assert doc["plugin"]["status"] == "shutdown" and doc["memory_stats"]["total_allocations"]
    finally:
        t.kill()
