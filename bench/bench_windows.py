"""The Windows path under Wine: hook cost and end-to-end rate of the Windows nvse-monitor (Windows
CPython + Windows frida, tests/windows/setup.sh) on the 32-bit PE fake game (tests/windows/fakes).

    source "$(bash tests/windows/setup.sh)"
    python bench/bench_windows.py [--pairs 200000] [--rounds 9] [--runs 5] [--iters 2000]

Hook cost: the game times --rounds rounds of --pairs crt_malloc(64) + crt_free pairs (its static
CRT entries, hooked at their fixed addresses by the fnv profile) in one process; runs alternate
between an unmonitored game (`wine FalloutNV.exe`) and one spawned by the monitor; the figure is
the median over every round of every run, per call (half a pair), and the difference of the two
medians is the cost the monitor adds.

End-to-end: the game's 4 worker threads run --iters iterations of its workload under the monitor
(spawn); events recorded / the workload's own wall time, and the events dropped (ring full).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

from windows.fakes import build_pe_install  # noqa: E402
from windows.winlane import read_truth, winpath  # noqa: E402


def rounds_ps(truth: Path) -> list[float]:
    return [int(ln.split()[2]) / 1000 for ln in truth.read_text().splitlines()
            if ln.startswith("bench pair_ps ")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args()
    py = os.environ.get("NVSE_WIN_PYTHON")
    if not py:
        sys.exit('bench_windows: source "$(bash tests/windows/setup.sh)" first')
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inst = build_pe_install(work / "game")
        base = dict(os.environ, FAKE_GAME_PLUGINS="", FAKE_GAME_LATE_PLUGINS="",
                    FAKE_GAME_BENCH=str(a.pairs), FAKE_GAME_ROUNDS=str(a.rounds))
        native: list[float] = []
        monitored: list[float] = []
        for run in range(a.runs):
            for kind, sink in (("native", native), ("monitored", monitored)):
                truth = work / f"{kind}-{run}.txt"
                env = dict(base, FAKE_GAME_TRUTH=winpath(truth))
                cmd = ["wine", "FalloutNV.exe"] if kind == "native" else \
                    ["wine", py, "-m", "nvse_monitor", "spawn", "--out", winpath(work / "o"),
                     "--", "FalloutNV.exe"]
                p = subprocess.run(cmd, cwd=inst.root, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, errors="replace",
                                   timeout=900)
                got = rounds_ps(truth)
                if p.returncode != 0 or len(got) != a.rounds:
                    sys.exit(f"{kind} run failed ({p.returncode}): {p.stderr[-800:]}")
                sink.extend(x / 2 for x in got)  # per call
        n, m = statistics.median(native), statistics.median(monitored)
        print(f"hook cost (ia32 PE under Wine, crt!malloc + crt!free): native {n:.1f} ns/call, "
              f"monitored {m:.1f} ns/call, added {m - n:+.1f} ns/call "
              f"({a.runs} runs x {a.rounds} rounds x {a.pairs} pairs, medians)")

        truth = work / "e2e.txt"
        env = dict(os.environ, FAKE_GAME_PLUGINS="", FAKE_GAME_LATE_PLUGINS="",
                   FAKE_GAME_ITERS=str(a.iters), FAKE_GAME_THREADS="4",
                   FAKE_GAME_TRUTH=winpath(truth))
        p = subprocess.run(["wine", py, "-m", "nvse_monitor", "spawn", "--out",
                            winpath(work / "e"), "--", "FalloutNV.exe"], cwd=inst.root, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=900)
        t = read_truth(truth)
        m_ev = re.search(r"([\d,]+) dropped[^;]*; ([\d,]+) events", p.stderr)
        stalls = re.search(r"dropped, ([^;]*stalls[^;]*);", p.stderr)
        us = re.search(r"gt workload_us (\d+)", truth.read_text())
        if p.returncode != 0 or not m_ev or not us:
            sys.exit(f"end-to-end run failed ({p.returncode}): {p.stderr[-800:]}")
        dropped, events = (int(x.replace(",", "")) for x in m_ev.groups())
        calls = sum(c for c, _ in t.calls.values())
        secs = int(us.group(1)) / 1e6
        print(f"end-to-end (4 threads, {calls:,} calls in {secs:.2f} s of workload): "
              f"{calls / secs / 1e6:.2f} M calls/s offered, {events:,} events recorded, "
              f"{dropped:,} dropped ({100 * dropped / max(1, calls):.1f} %)"
              + (f", {stalls.group(1)}" if stalls else ""))


if __name__ == "__main__":
    main()
