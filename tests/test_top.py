"""`nvse-monitor top`: frames rendered into a recording rich Console, the directory source
following a --realtime replay, and real terminals in tmux (`top DIR` with keys, `attach --top`)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Target
from rich.console import Console

from nvse_monitor.outputs.pipeline import replay
from nvse_monitor.views.top import SPARK, Dashboard, DirSource, sparkline

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
    ms, mon = doc["memory_stats"], doc["monitor"]
    # status, health and uptime on the first line
    assert re.search(rf"SHUTDOWN\s+HEALTHY\s+uptime {doc['plugin']['uptime_seconds']:,.1f} s", out)
    assert re.search(rf"allocations\s+{ms['total_allocations']:,}\b", out)
    assert re.search(rf"frees\s+{ms['total_frees']:,}\b", out)
    # the session has ended: rates are its averages, and the title says so
    up = doc["plugin"]["uptime_seconds"]
    assert "session ended: rates are averages" in out
    assert re.search(rf"allocs/s\s+{ms['total_allocations'] / up:,.0f}\b", out)
    assert re.search(rf"frees/s\s+{ms['total_frees'] / up:,.0f}\b", out)
    assert re.search(rf"current\s+{ms['current_bytes_allocated'] / 2**20:,.2f} MiB", out)
    assert re.search(rf"peak\s+{ms['peak_bytes_allocated'] / 2**20:,.2f} MiB", out)
    assert "modules holding bytes at the end" in out and "live now" not in out
    assert re.search(rf"dropped\s+{mon['dropped_events']:,}\b", out) and mon["dropped_events"]
    assert re.search(rf"untracked frees\s+{mon['untracked_frees']:,}\b", out)
    # the modules holding the most live bytes, most first
    mods = sorted(mon["modules_live_bytes"].items(), key=lambda kv: -kv[1])
    assert [out.index(name) for name, _ in mods] == sorted(out.index(name) for name, _ in mods)
    assert "Dropped 773 events" in out  # the last WARN lines of the log
    dash.toggle_leaks()
    dash.poll()
    out = text_of(dash)
    assert "live at the end by call site" in out and "FalloutNV.exe+0x" in out
    assert "live now" not in out


def test_pipeline_source_gives_the_json_files_document(tmp_path):
    """attach/spawn --top reads the engine between feeds: the same document the JSON file
    would hold, built without encoding and parsing it."""
    from nvse_monitor.outputs.json import render
    from nvse_monitor.outputs.pipeline import Pipeline
    from nvse_monitor.stream.recording import read_recording
    from nvse_monitor.views.top import PipelineSource

    meta, msgs = read_recording(FIXTURE)
    pipe = Pipeline(meta, tmp_path)
    src = PipelineSource(pipe)
    assert src.poll() is None  # not started
    pipe.start()
    pipe.feed_all(msgs[: len(msgs) // 2])
    doc = src.poll()
    assert doc == json.loads(render(pipe.snapshot_now(), meta.wall_clock_zero_us))
    assert isinstance(doc["plugin"]["uptime_seconds"], float) and doc["monitor"]["heaps"]
    pipe.finish()


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
    out = text_of(dash)
    assert "SHUTDOWN" in out
    assert re.search(rf"history\s+{sparkline(list(dash.mem), 60)}", out)
    assert len(set(sparkline(list(dash.mem), 60))) >= 2  # memory moved: not a flat line


def doc_at(base: dict, ts_us: int, allocs: int, frees: int, live: int) -> dict:
    d = json.loads(json.dumps(base))
    d["timestamp"], d["plugin"]["uptime_seconds"] = ts_us, ts_us / 1e6
    d["plugin"]["status"] = "active"  # a session under way
    d["memory_stats"].update(total_allocations=allocs, total_frees=frees,
                             current_bytes_allocated=live)
    return d


def test_rates_are_between_the_last_two_snapshots(tmp_path, replayed):
    """allocs/s and frees/s: Δ totals / Δ stream time of the last two distinct snapshots of a
    directory being written; a snapshot seen twice changes nothing."""
    base = json.loads((replayed / "MemoryPoolNVSE_stats.json").read_text())
    path = tmp_path / "MemoryPoolNVSE_stats.json"
    dash = Dashboard(DirSource(tmp_path, "MemoryPoolNVSE"))
    for ts, allocs, frees, live in [(1_000_000, 1000, 500, 10 << 20), (3_000_000, 5000, 1500,
                                                                       30 << 20),
                                    (3_000_000, 5000, 1500, 30 << 20), (3_500_000, 5500, 4000,
                                                                        5 << 20)]:
        path.write_text(json.dumps(doc_at(base, ts, allocs, frees, live)))
        dash.poll()
        if ts == 3_000_000:
            assert dash.rates == (2000.0, 500.0)
    assert dash.rates == (1000.0, 5000.0) and list(dash.mem) == [10 << 20, 30 << 20, 5 << 20]
    out = text_of(dash)
    assert re.search(r"allocs/s\s+1,000\b", out) and re.search(r"frees/s\s+5,000\b", out)
    assert re.search(r"uptime 3\.5 s", out) and re.search(r"current\s+5\.00 MiB", out)
    assert sparkline([10, 30, 5], 60) in out


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
        assert "FalloutNV.exe+0x" in t.wait_for("live at the end by call site")
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


def screen_number(screen: str, label: str) -> int:
    m = re.search(rf"{label}\s+([\d,]+)\b", screen)
    assert m, f"no {label!r} on the screen:\n{screen}"
    return int(m.group(1).replace(",", ""))


@needs_tmux
@pytest.mark.frida
def test_top_dir_follows_a_live_session_in_tmux(targets, tmp_path, live_procs):
    """`top DIR` in a terminal while another process (`attach`) writes DIR: the counters move,
    the rate is the target's, and the end of the session shows."""
    exe = targets.build("hammer", "x64")
    target = live_procs.start([exe, "--seconds", "30", "--rate", "20000"])
    out = tmp_path / "out"
    mon = live_procs.attach(target, "--out", out)
    target.go()
    t = Tmux(f"nvse-top-follow-{time.monotonic_ns()}",
             [sys.executable, "-m", "nvse_monitor", "top", str(out), "--interval", "0.3"])
    try:
        s = t.wait_for("ACTIVE")
        assert "hammer" in s and "HEALTHY" in s
        deadline = time.monotonic() + 20
        while screen_number(t.screen(), "allocations") < 10_000 and time.monotonic() < deadline:
            time.sleep(0.2)  # the first snapshots (a 10,000-allocation or 2 s beat)
        first = t.screen()
        time.sleep(2.5)
        second = t.screen()
        a0, a1 = screen_number(first, "allocations"), screen_number(second, "allocations")
        assert a1 > a0 > 0, (first, second)
        # 20,000 events/s = 10,000 mallocs/s when the target keeps up (a busy machine: less)
        assert 1_000 <= screen_number(second, "allocs/s") <= 15_000, second
        up0 = float(re.search(r"uptime ([\d.,]+) s", first).group(1).replace(",", ""))
        up1 = float(re.search(r"uptime ([\d.,]+) s", second).group(1).replace(",", ""))
        assert up1 > up0
        mon.signal(signal.SIGINT)
        assert mon.wait() == 0, mon.stderr
        s = t.wait_for("SHUTDOWN", 15)
        doc = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
        assert screen_number(s, "allocations") == doc["memory_stats"]["total_allocations"]
    finally:
        t.kill()


@needs_tmux
@pytest.mark.frida
def test_attach_top_leak_report_on_demand_in_tmux(targets, tmp_path, live_procs):
    """`attach --top`, `l` during the session: the blocks live now by call site, with the known
    amounts tests/targets/leaky.c leaves behind; `q` ends the session like Ctrl-C."""
    exe = targets.build("leaky", "x64")
    plugin = targets.build("leaky_plugin", "x64", shared=True)
    target = live_procs.start([exe, plugin])
    out = tmp_path / "out"
    t = Tmux(f"nvse-top-leaks-{time.monotonic_ns()}",
             [sys.executable, "-m", "nvse_monitor", "attach", str(target.pid), "--out", str(out),
              "--top"])
    try:
        t.wait_for("ACTIVE")
        target.go()
        assert target.done() == {"ok": True}
        time.sleep(1.0)  # the last drain reaches the engine
        t.keys("l")
        s = t.wait_for("live now by call site")
        # blocks live now, by call site (module!function+offset: the symbolizer named them
        # within ~2 s): leak_b's malloc(1000) x 37 and the plugin's malloc(333) x 23 (the panel
        # refreshes every 5 s while shown)
        deadline = time.monotonic() + 15
        want = [rf"{exe.name}!leak_b\+0x[0-9a-f]+\s+37\s+37,000",
                rf"{plugin.name}!plugin_leak\+0x[0-9a-f]+\s+23\s+7,659"]
        while not all(re.search(w, s) for w in want) and time.monotonic() < deadline:
            time.sleep(0.3)
            s = t.screen()
        assert all(re.search(w, s) for w in want), s
        # f: the top functions (issue 11), leak_b's two call sites summed: 48 blocks, 38,100 bytes
        t.keys("f")
        s = t.wait_for("live now by function", 15)
        assert re.search(rf"{exe.name}!leak_b\s+48\s+38,100", s), s
        assert re.search(rf"{exe.name}!leak_a\s+100\s+4,800", s), s
        t.keys("q")
        t.wait_for("session ended", 30)
        from nvse_monitor.engine import leaks

        rep = leaks.read_csv(out / "MemoryPoolNVSE_leaks.csv")
        sites = {(g.allocations, g.bytes) for g in rep.sites}
        assert {(37, 37_000), (23, 7_659), (100, 4_800), (11, 1_100)} <= sites
        target.finish()
    finally:
        t.kill()


@needs_tmux
@pytest.mark.frida
def test_top_dir_leak_report_from_a_live_session_in_tmux(targets, tmp_path, live_procs):
    """`top DIR` in a terminal while another process (`attach`) writes DIR: `l` asks that
    session for the blocks live now (a request file it answers with the leaks CSV) and shows
    leaky.c's known call sites while the session still runs; `q` leaves no request behind."""
    exe = targets.build("leaky", "x64")
    plugin = targets.build("leaky_plugin", "x64", shared=True)
    target = live_procs.start([exe, plugin])
    out = tmp_path / "out"
    mon = live_procs.attach(target, "--out", out)
    target.go()
    assert target.done() == {"ok": True}
    t = Tmux(f"nvse-top-dir-leaks-{time.monotonic_ns()}",
             [sys.executable, "-m", "nvse_monitor", "top", str(out), "--interval", "0.3"])
    try:
        t.wait_for("ACTIVE")
        assert not (out / "MemoryPoolNVSE_leaks.csv").exists()  # nothing asked for yet
        t.keys("l")
        s = t.wait_for("live now by call site", 15)
        # named once the session's symbolizer has seen them (every 2 s), else module+offset
        want = [rf"{exe.name}(!leak_b)?\+0x[0-9a-f]+\s+37\s+37,000",
                rf"{plugin.name}(!plugin_leak)?\+0x[0-9a-f]+\s+23\s+7,659"]
        assert all(re.search(w, s) for w in want), s
        assert "ACTIVE" in s  # the session is still running
        t.keys("q")
        deadline = time.monotonic() + 5
        while (out / "MemoryPoolNVSE_leaks.request").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (out / "MemoryPoolNVSE_leaks.request").exists()
    finally:
        t.kill()
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    target.finish()


@needs_tmux
@pytest.mark.frida
def test_spawn_top_in_tmux(targets, tmp_path):
    """`spawn --top`: the dashboard while the program runs (it shares the terminal), the session
    ends with it, and the files count exactly what the program did."""
    from conftest import unmonitored_truth

    exe = targets.build("workload", "x64")
    work = ["--iters", "2000", "--rounds", "3000"]  # a few seconds under the monitor
    out = tmp_path / "out"
    t = Tmux(f"nvse-spawn-top-{time.monotonic_ns()}",
             [sys.executable, "-m", "nvse_monitor", "spawn", "--out", str(out), "--top", "--",
              str(exe), *work])
    try:
        # DEGRADED: the workload makes allocations fail on purpose
        s = t.wait_for("DEGRADED", 60)
        assert "nvse-monitor top" in s and "workload" in s and "allocs/s" in s
        assert "session ended" not in s  # a live frame, not the last one printed at the end
        t.wait_for("session ended", 120)
    finally:
        t.kill()
    doc = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
    assert doc["plugin"]["status"] == "shutdown" and doc["memory_stats"]["total_allocations"]
    if doc["monitor"]["dropped_events"] == 0:  # a busy machine can make the agent's ring drop
        truth = unmonitored_truth(exe, work)
        for k in ("total_allocations", "total_frees", "total_bytes_allocated"):
            assert doc["memory_stats"][k] == truth[k], k


# ---- 80x24: the first screen a user sees (issue 12) ------------------------------------------

BIG = {"rate": 12_345_678.0, "allocs": 300_000_512, "frees": 299_000_001, "live": 1_000_511,
       "cur": 1536 << 20, "peak": 2047 << 20}


@pytest.fixture
def busy_dir(tmp_path, replayed) -> Path:
    """A session under way with big figures, ten modules and ten warning lines."""
    doc = json.loads((replayed / "MemoryPoolNVSE_stats.json").read_text())
    doc["plugin"]["status"] = "active"
    doc["performance"]["allocations_per_second"] = BIG["rate"]
    doc["performance"]["frees_per_second"] = BIG["rate"] - 1
    doc["memory_stats"].update(total_allocations=BIG["allocs"], total_frees=BIG["frees"],
                               current_allocations=BIG["live"],
                               current_bytes_allocated=BIG["cur"],
                               peak_bytes_allocated=BIG["peak"])
    doc["monitor"]["modules_live_bytes"] = {f"plugin_{i:02d}.dll": (i + 1) << 20
                                            for i in range(10)}
    (tmp_path / "MemoryPoolNVSE_stats.json").write_text(json.dumps(doc))
    (tmp_path / "MemoryPoolNVSE_rpmalloc.log").write_text("".join(
        f"[2026-12-06 08:00:{i:02d}.000000] [WARN] [TID:1] warning number {i}\n"
        for i in range(10)))
    return tmp_path


def assert_figures_whole(screen: str) -> None:
    for text in ("12,345,678", "300,000,512", "299,000,001", "1,000,511", "1.50 GiB",
                 "2.00 GiB", "warning number 9"):
        assert text in screen, f"{text!r} cut or missing:\n{screen}"
    for line in screen.splitlines():
        if "allocs/s" in line or "frees/s" in line:
            assert "…" not in line, line


def test_frame_fits_80x24(busy_dir):
    dash = Dashboard(DirSource(busy_dir, "MemoryPoolNVSE"))
    dash.poll()
    con = Console(record=True, width=80, height=24, file=open("/dev/null", "w"))  # noqa: SIM115
    con.print(dash.render(80, 24))
    lines = con.export_text().rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(x) for x in lines) <= 80
    assert lines[0].startswith("╭") and lines[-1].startswith("╰")  # the whole frame
    assert_figures_whole("\n".join(lines))
    assert "plugin_09.dll" in lines[5] or any("plugin_09.dll" in x for x in lines)
    # without a height limit every module and six warnings are shown
    full = text_of(dash, 80)
    assert all(f"plugin_{i:02d}.dll" in full for i in range(4, 10))
    assert "warning number 4" in full and "warning number 3" not in full


def test_once_through_a_pipe_is_80_columns(busy_dir):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("COLUMNS", "LINES")}
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "top", str(busy_dir), "--once"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert max(len(x) for x in r.stdout.splitlines()) == 80
    assert_figures_whole(r.stdout)


@pytest.mark.parametrize("where,code,says", [("missing", 2, "no such directory"),
                                             ("empty", 3, "waiting for ")])
def test_once_without_a_session(tmp_path, where, code, says):
    d = tmp_path / "d"
    if where == "empty":
        d.mkdir()
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "top", str(d), "--once"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == code and says in r.stdout + r.stderr


def test_fit_gives_rows_up_longest_first():
    from nvse_monitor.views.top import fit

    assert fit([6, 6], 100) == [6, 6]
    assert fit([6, 6], 8) == [4, 4]
    assert fit([6, 1], 5) == [4, 1]
    assert fit([6, 6, 8], 7) == [2, 2, 3]


@needs_tmux
def test_top_dir_in_tmux_80x24(busy_dir):
    t = Tmux(f"nvse-top80-{time.monotonic_ns()}", [sys.executable, "-m", "nvse_monitor", "top",
                                                   str(busy_dir)], width=80, height=24)
    try:
        s = t.wait_for("allocs/s")
        time.sleep(0.6)  # a refresh later
        s = t.screen()
        assert_figures_whole(s)
        lines = s.rstrip("\n").splitlines()
        assert lines[0].startswith("╭") and "nvse-monitor top" in lines[0]
        assert any(x.startswith("╰") for x in lines[-2:]), s  # the frame's bottom is on screen
        assert "l: leak report" in s
    finally:
        t.kill()


def test_ring_line_and_uncertain_leaks_fit_80_columns(tmp_path):
    import ring_session

    out = tmp_path / "out"
    replay(ring_session.write(tmp_path / "ring.nvmrec"), out)
    dash = Dashboard(DirSource(out, "MemoryPoolNVSE"))
    dash.poll()
    dash.toggle_leaks()
    dash.poll()
    text = text_of(dash, width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "ring wait  stalls 250 (1.50 s, longest 50.0 ms)  lost frees 1" in text
    assert "Stall burst: 250 hooked calls" in text  # the burst's WARN line in the log tail
    # the leak panel: B is the leak, A (allocated before the lost free) is set aside
    assert "Game.exe+0x200" in text and "Game.exe+0x100" not in text
    assert "set aside: 1 block, 0.0 KiB allocated before lost frees (uncertain)" in text


def test_no_ring_line_for_an_older_session(replayed):
    dash = Dashboard(DirSource(replayed, "MemoryPoolNVSE"))
    dash.poll()
    doc = json.loads((replayed / "MemoryPoolNVSE_stats.json").read_text())
    assert doc["monitor"]["on_full"] is None
    # synthetic-mixed dropped frees, so the line is there, without a policy
    assert re.search(rf"ring \?  stalls 0  lost frees {doc['monitor']['dropped_frees']}",
                     text_of(dash))
