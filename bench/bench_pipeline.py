"""The whole pipeline as a user runs it, beside heaptrack in the same run (issue 13).

1. Tight loop: one thread, N malloc+free pairs (bench/tightloop.c), started monitored from its
   first instruction: native, `nvse-monitor spawn` (files written) and `heaptrack` alternate
   round by round. Reported: the loop's own ns per call (its clock), the added ns per call, the
   whole command's wall time, and whether anything was dropped. --threads adds each side's CPU
   time per call: the monitor's main thread (consumer, engine, writers), its other threads (the
   ring reader, Frida's) and the target.
2. Agent CPU at a fixed rate: tests/targets/hammer.c at --rate events/s for --seconds, attached
   by `nvse-monitor attach`; the target's CPU time (utime+stime) minus an unmonitored run's, per
   million events. With --baseline DIR (another checkout's source tree, e.g. 0.2.0 from
   `git worktree add /tmp/v020 v0.2.0-commit`), the same for that version, in the same run.

    python bench/bench_pipeline.py [--pairs 5000000] [--rounds 5] [--threads]
                                   [--rate 1e6 --seconds 3] [--baseline DIR]
Needs heaptrack (Debian: apt-get install heaptrack) for part 1; it is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import cpu_model

REPO = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")


def build(src: Path, out: Path, *flags: str) -> Path:
    subprocess.run(["gcc", "-O2", "-pthread", *flags, str(src), "-o", str(out)], check=True)
    return out


def loop_ns(stdout: str) -> float:
    return float(re.search(r"LOOP ([0-9.]+)", stdout).group(1))


def run_native(exe: Path, pairs: int) -> tuple[float, float]:
    t = time.monotonic()
    r = subprocess.run([str(exe), str(pairs)], capture_output=True, text=True, check=True)
    return loop_ns(r.stdout), time.monotonic() - t


def _task_cpu_ns(pid: int, into: dict[int, int]) -> None:
    """Each thread's CPU time so far (schedstat, ns), the highest seen kept (threads end)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                v = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        into[int(t)] = max(into.get(int(t), 0), v)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def run_monitor(exe: Path, pairs: int, tmp: Path, src: Path = REPO, threads: bool = False
                ) -> tuple[float, float, int, int, tuple[float, float, float] | None]:
    """(loop ns per call, wall s, events dropped, events in the files, and with `threads` the
    CPU seconds of the monitor's main thread (consumer + engine + writers), of its other
    threads (ring reader, Frida's) and of the target)"""
    out = tmp / f"out-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=str(src))
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "nvse_monitor", "spawn", "--out", str(out), "--",
                          str(exe), str(pairs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=tmp)
    host: dict[int, int] = {}
    target: dict[int, int] = {}
    while threads and p.poll() is None:
        _task_cpu_ns(p.pid, host)
        for k in _children(p.pid):
            _task_cpu_ns(k, target)
        time.sleep(0.01)
    stdout, _ = p.communicate()
    wall = time.monotonic() - t
    split = None
    if threads:
        main_ns = host.get(p.pid, 0)
        split = (main_ns / 1e9, (sum(host.values()) - main_ns) / 1e9, sum(target.values()) / 1e9)
    js = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    ms = js["memory_stats"]
    return (loop_ns(stdout), wall, int(js["monitor"]["dropped_events"]),
            ms["total_allocations"] + ms["total_frees"], split)


def run_heaptrack(exe: Path, pairs: int, tmp: Path) -> tuple[float, float]:
    t = time.monotonic()
    r = subprocess.run(["heaptrack", "-o", str(tmp / f"ht-{time.monotonic_ns()}"), str(exe),
                        str(pairs)], capture_output=True, text=True, cwd=tmp)
    wall = time.monotonic() - t
    for f in tmp.glob("ht-*"):
        f.unlink()
    return loop_ns(r.stdout), wall


def tight_loop(a: argparse.Namespace, tmp: Path) -> None:
    exe = build(REPO / "bench" / "tightloop.c", tmp / "tightloop")
    have_ht = shutil.which("heaptrack") is not None
    runs: dict[str, list[tuple[float, float]]] = {"native": [], "nvse-monitor": []}
    if have_ht:
        runs["heaptrack"] = []
    if a.baseline:
        runs["baseline"] = []
    seen: dict[str, list[int]] = {"nvse-monitor": [], "baseline": []}  # events in the files
    cpu: dict[str, list[tuple[float, float, float]]] = {"nvse-monitor": [], "baseline": []}
    for _ in range(a.rounds):
        runs["native"].append(run_native(exe, a.pairs))
        for name, src in (("nvse-monitor", REPO), ("baseline", a.baseline)):
            if src:
                ns, wall, _d, events, split = run_monitor(exe, a.pairs, tmp, Path(src),
                                                          a.threads)
                runs[name].append((ns, wall))
                seen[name].append(events)
                if split is not None:
                    cpu[name].append(split)
        if have_ht:
            runs["heaptrack"].append(run_heaptrack(exe, a.pairs, tmp))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in runs.items()}
    base = med["native"][0]
    print(f"1. tight loop: {a.pairs:,} malloc+free pairs, one thread, spawned monitored; "
          f"{a.rounds} rounds alternating, medians")
    print(f"   {'':14s} {'ns/call':>8} {'added':>8} {'wall s':>7}")
    for k, (ns, wall) in med.items():
        print(f"   {k:14s} {ns:8.1f} {ns - base:+8.1f} {wall:7.2f}")
    for name, ev in seen.items():
        if ev:
            print(f"   {name}: events in the files per run {min(ev):,}..{max(ev):,} of "
                  f"{2 * a.pairs:,} calls (+ the program's own start-up)")
    for name, v in cpu.items():
        if v:
            per = [1e9 * statistics.median(x[i] for x in v) / (2 * a.pairs) for i in range(3)]
            print(f"   {name}: CPU per call over the whole command (start-up included): main "
                  f"thread {per[0]:.1f} ns, the monitor's other threads {per[1]:.1f}, "
                  f"the target {per[2]:.1f}")
    if have_ht:
        ours, theirs = med["nvse-monitor"][0] - base, med["heaptrack"][0] - base
        print(f"   added per call: nvse-monitor {ours:.1f} ns = {ours / theirs:.2f} x heaptrack's "
              f"{theirs:.1f} ns (target: <= 0.5)")
    else:
        print("   heaptrack not installed: no anchor (apt-get install heaptrack)")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime


def hammer_run(exe: Path, rate: float, seconds: float, tmp: Path, src: Path | None) -> tuple:
    target = subprocess.Popen([str(exe), "--seconds", str(seconds), "--rate", str(rate)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    mon = None
    try:
        assert target.stdout.readline().startswith("READY")
        if src is not None:
            env = dict(os.environ, PYTHONPATH=str(src), PYTHONUNBUFFERED="1")
            mon = subprocess.Popen([sys.executable, "-m", "nvse_monitor", "attach",
                                    str(target.pid), "--out", str(tmp / "out-cpu")],
                                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   env=env, cwd=tmp)
            for line in mon.stderr:
                if "nvse-monitor: monitoring" in line:
                    break
        c0 = cpu_s(target.pid)
        target.stdin.write("\n")
        target.stdin.flush()
        done = json.loads(target.stdout.readline().split("DONE", 1)[1])
        used = cpu_s(target.pid) - c0
        if mon is not None:
            mon.send_signal(signal.SIGINT)
            mon.communicate(timeout=120)
        return used, done["events"]
    finally:
        if target.poll() is None:
            target.stdin.write("\n")
            target.stdin.flush()
            target.wait(timeout=30)
        if mon is not None and mon.poll() is None:
            mon.kill()


def agent_cpu(a: argparse.Namespace, tmp: Path) -> None:
    exe = build(REPO / "tests" / "targets" / "hammer.c", tmp / "hammer")
    kinds: dict[str, Path | None] = {"native": None, "nvse-monitor": REPO}
    if a.baseline:
        kinds["baseline"] = Path(a.baseline)
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in kinds}
    for _ in range(a.rounds):
        for k, src in kinds.items():
            runs[k].append(hammer_run(exe, a.rate, a.seconds, tmp, src))
    native = statistics.median(c for c, _ in runs["native"])
    print(f"2. target CPU at {a.rate / 1e6:g} M events/s for {a.seconds:g} s (attach), "
          f"{a.rounds} rounds, medians")
    for k, v in runs.items():
        cpu, ev = statistics.median(c for c, _ in v), statistics.median(e for _, e in v)
        extra = "" if k == "native" else \
            f"  agent {1000 * (cpu - native) / (ev / 1e6):7.1f} ms CPU per M events"
        print(f"   {k:14s} CPU {cpu:6.2f} s for {ev / 1e6:.2f} M events{extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", action="store_true",
                    help="tight loop: also each side's CPU time (the monitor's main thread, "
                         "its other threads, the target), polled from /proc; the polling "
                         "costs the loop a few ns a call: compare only with other such runs")
    ap.add_argument("--rate", type=float, default=1e6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--baseline", help="another checkout's source tree to compare with")
    ap.add_argument("--only", choices=["loop", "cpu"])
    a = ap.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="nvse-bench-pipeline-") as td:
        if a.only in (None, "loop"):
            tight_loop(a, Path(td))
        if a.only in (None, "cpu"):
            agent_cpu(a, Path(td))
    return 0




if __name__ == "__main__":
    sys.exit(main())
