"""End-to-end sustained rate: shared ring -> host reader -> engine -> files, with zero drops.

A C target (tests/targets/hammer.c) makes malloc/free calls paced at a given rate (or as fast
as it can); `nvse-monitor attach` watches it as a real subprocess, exactly as a user runs it.
A rate is *sustained* when, over the run, the agent dropped nothing, the target kept the pace
(the hooks did not slow it below 97% of the rate), and the host had everything written within
`--max-lag` seconds of the target finishing (so no backlog was piling up anywhere).

For each rate, the medians of `--runs` runs. Also reported: the ring size, the agent's own
memory (ring + buffers, from init) and the target's RSS growth while monitored (frida-agent,
JS heap, pending sends included).

Rate 0 = as fast as the target can: with the default full-ring policy (`wait`) the producers
are held to the pipeline's pace, so the lossless end-to-end rate is the events the files
counted over the target's run time plus the lag until the files were final (`e2e` column).

    python bench/bench_e2e.py                        # default ladder of rates
    python bench/bench_e2e.py --rates 3e6,5e6 --runs 5 --ring-size 256K
    python bench/bench_e2e.py --rates 0 --threads 8 --runs 3    # lossless rate, 8 producers
    python bench/bench_e2e.py --rates 0 --threads 8 --runs 5 --anchor   # beside heaptrack
    python bench/bench_e2e.py --rates 2e5,1e6 --threads 2 --seconds 5 --baseline DIR
        # another checkout's tree (`git worktree add DIR <rev>`) in alternating runs: the host's
        # CPU per event after start-up, new over old
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HAMMER = REPO / "tests" / "targets" / "hammer.c"


def build(arch: str, out_dir: Path) -> Path:
    exe = out_dir / f"hammer-{arch}"
    flag = "-m32" if arch == "ia32" else "-m64"
    subprocess.run(["gcc", flag, "-O2", "-pthread", str(HAMMER), "-o", str(exe)], check=True)
    return exe


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Stderr:
    """Collects a subprocess's stderr lines on a thread; wait_for() a line containing text."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = False
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip())
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not any(text in x for x in self.lines):
                if self.eof or time.monotonic() > end:
                    return False
                self.cond.wait(0.1)
            return True


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far (/proc/PID/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def wait_rusage(proc: subprocess.Popen, timeout: float) -> os.struct_rusage:
    """Wait for `proc` (at most `timeout` s, then kill it) and return its resource usage."""
    end = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ru
        if time.monotonic() > end:
            proc.kill()
            end = float("inf")
        time.sleep(0.01)


def one_run(exe: Path, rate: float, seconds: float, ring: str | None, tmp: Path,
            threads: int = 1, src: Path = REPO, native: bool = True) -> dict:
    target = subprocess.Popen(
        [str(exe), "--seconds", str(seconds), "--rate", str(rate), "--threads", str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert target.stdout.readline().startswith("READY")
        rss0 = rss_kb(target.pid)
        out = tmp / f"out-{rate:.0f}-{time.monotonic_ns()}"
        args = [sys.executable, "-m", "nvse_monitor", "attach", str(target.pid), "--out", str(out)]
        if ring:
            args += ["--ring-size", ring]
        env = dict(os.environ, NVSE_MONITOR_NATIVE="1" if native else "0")
        if src != REPO:
            env["PYTHONPATH"] = str(src)
        mon = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               cwd=src, env=env)
        err = Stderr(mon)
        if not err.wait_for("nvse-monitor: monitoring", 60):
            mon.kill()
            raise RuntimeError("monitor did not start:\n" + "\n".join(err.lines))
        started = next(x for x in err.lines if "nvse-monitor: monitoring" in x)
        host_start_cpu = cpu_s(mon.pid)  # start-up: attach, agent, first files
        agent_mib = float(re.search(r"agent memory ([0-9.]+) MiB", started).group(1))
        rss_attached = rss_kb(target.pid)
        target.stdin.write("\n")
        target.stdin.flush()
        peak_rss = rss_attached
        line = ""
        # Sample the target's RSS while it works (pending sends would show up here).
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_rss
            while not stop.is_set():
                peak_rss = max(peak_rss, rss_kb(target.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        line = target.stdout.readline()
        t_done = time.monotonic()
        stop.set()
        sampler.join()
        done = json.loads(line.split("DONE", 1)[1])
        target_cpu = cpu_s(target.pid)
        mon.send_signal(signal.SIGINT)
        ru = wait_rusage(mon, 120)
        lag = time.monotonic() - t_done
        js = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
        recorded = js["memory_stats"]["total_allocations"] + js["memory_stats"]["total_frees"]
        return {
            "rate": rate,
            "achieved": done["rate"],
            "e2e": recorded / (done["seconds"] + lag),
            "stalls": int(js["monitor"]["agent_counters"].get("stalls", 0)),
            "events": done["events"],
            "recorded": recorded,
            "dropped": int(js["monitor"]["dropped_events"]),
            "lag_s": lag,
            "agent_mib": agent_mib,
            "rss_attach_mb": (rss_attached - rss0) / 1024,
            "rss_peak_mb": (peak_rss - rss0) / 1024,
            "rc": mon.returncode,
            # CPU seconds over the whole run: where the 2 cores went (host: the monitor process,
            # start-up included; target: its producers, hooks and waits)
            "host_cpu_s": ru.ru_utime + ru.ru_stime,
            "host_start_cpu_s": host_start_cpu,
            "target_cpu_s": target_cpu,
            "stderr": "\n".join(err.lines[-3:]),
        }
    finally:
        if target.poll() is None:
            try:
                target.stdin.write("\n")
                target.stdin.flush()
                target.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                target.kill()


def heaptrack_run(exe: Path, seconds: float, tmp: Path, threads: int) -> dict:
    """The same target under heaptrack (the anchor, issue 13): lossless too (its client blocks
    on a full pipe); e2e = events over the run plus the time until heaptrack has written all."""
    out = tmp / f"ht-{time.monotonic_ns()}"
    proc = subprocess.Popen(["heaptrack", "-o", str(out), str(exe), "--seconds", str(seconds),
                             "--rate", "0", "--threads", str(threads)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        while not (line := proc.stdout.readline()).startswith("READY"):
            if not line:
                raise RuntimeError("heaptrack: the target did not start")
        proc.stdin.write("\n")
        proc.stdin.flush()
        while not (line := proc.stdout.readline()).startswith("DONE"):
            if not line:
                raise RuntimeError("heaptrack: the target ended without DONE")
        t_done = time.monotonic()
        done = json.loads(line.split("DONE", 1)[1])
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=300)
        lag = time.monotonic() - t_done
    finally:
        if proc.poll() is None:
            proc.kill()
        for f in tmp.glob("ht-*"):
            f.unlink()
    return {"achieved": done["rate"], "e2e": done["events"] / (done["seconds"] + lag),
            "lag_s": lag}


def host_ns_per_event(runs: list[dict]) -> float:
    """The monitor's CPU per event after start-up, ns (median of the runs)."""
    return statistics.median((r["host_cpu_s"] - r["host_start_cpu_s"]) / max(r["recorded"], 1)
                             * 1e9 for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="2e6,3e6,3.5e6,4e6,5e6",
                    help="events/s to try, comma-separated; 0 = as fast as the target can")
    ap.add_argument("--seconds", type=float, default=3.0, help="target run time per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per rate (medians)")
    ap.add_argument("--ring-size", default=None, help="--ring-size for the monitor")
    ap.add_argument("--arch", choices=["x64", "ia32"], default="x64")
    ap.add_argument("--threads", type=int, default=1, help="producer threads in the target")
    ap.add_argument("--max-lag", type=float, default=1.0,
                    help="seconds from the target's end to the monitor's final files")
    ap.add_argument("--json", type=Path, help="also write all runs here")
    ap.add_argument("--anchor", action="store_true",
                    help="with --rates 0: heaptrack on the same target, alternating runs")
    ap.add_argument("--baseline", type=Path,
                    help="another checkout's source tree, in alternating runs")
    ap.add_argument("--numpy", action="store_true",
                    help="the baseline is this tree's numpy paths (NVSE_MONITOR_NATIVE=0)")
    a = ap.parse_args()

    rates = [float(x) for x in a.rates.split(",")]
    all_runs = []
    best = None
    with tempfile.TemporaryDirectory(prefix="nvse-bench-e2e-") as td:
        tmp = Path(td)
        exe = build(a.arch, tmp)
        print(f"target {exe.name}, {a.threads} thread(s), {a.seconds:.1f} s per run, {a.runs} runs "
              f"per rate, ring {a.ring_size or 'default'}, {os.cpu_count()} CPUs")
        print(f"{'rate':>10} {'achieved':>10} {'e2e':>10} {'events':>11} {'dropped':>9} "
              f"{'stalls':>7} {'lag s':>6} {'agent MiB':>9} {'RSS+ MB':>8} {'peak+ MB':>8} "
              f"{'host CPU':>8} {'of it start':>11} {'tgt CPU':>7}  sustained")
        for rate in rates:
            anchor = rate == 0 and a.anchor and shutil.which("heaptrack") is not None
            runs, ht, base = [], [], []
            for _ in range(a.runs):
                runs.append(one_run(exe, rate, a.seconds, a.ring_size, tmp, a.threads))
                if anchor:
                    ht.append(heaptrack_run(exe, a.seconds, tmp, a.threads))
                if a.baseline or a.numpy:
                    base.append(one_run(exe, rate, a.seconds, a.ring_size, tmp, a.threads,
                                        src=a.baseline.resolve() if a.baseline else REPO,
                                        native=not a.numpy))
            all_runs += runs
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("achieved", "e2e", "events", "dropped", "stalls", "lag_s",
                             "agent_mib", "rss_attach_mb", "rss_peak_mb", "host_cpu_s",
                             "host_start_cpu_s", "target_cpu_s")}
            ok_runs = [
                r["dropped"] == 0 and r["rc"] == 0
                and (rate == 0 or (r["lag_s"] <= a.max_lag and r["achieved"] >= 0.97 * rate))
                # attached before the threads start: their set-up (the C library's per-thread
                # blocks) is recorded too
                and 0 <= r["recorded"] - r["events"] <= 4 * a.threads
                for r in runs
            ]
            sustained = sum(ok_runs) * 2 > len(runs)  # the median run
            label = "max" if rate == 0 else f"{rate / 1e6:.1f} M"
            print(f"{label:>10} {med['achieved'] / 1e6:>8.2f} M {med['e2e'] / 1e6:>8.2f} M "
                  f"{med['events']:>11,.0f} {med['dropped']:>9,.0f} {med['stalls']:>7,.0f} "
                  f"{med['lag_s']:>6.2f} {med['agent_mib']:>9.1f} "
                  f"{med['rss_attach_mb']:>8.1f} {med['rss_peak_mb']:>8.1f} "
                  f"{med['host_cpu_s']:>7.2f}s {med['host_start_cpu_s']:>10.2f}s "
                  f"{med['target_cpu_s']:>6.2f}s  "
                  f"{'yes' if sustained else 'no'}"
                  f" ({sum(ok_runs)}/{len(runs)})")
            if sustained:
                best = max(best or 0.0, med["e2e"] if rate == 0 else med["achieved"])
            if base:
                b = {k: statistics.median(r[k] for r in base)
                     for k in ("achieved", "e2e", "dropped", "host_cpu_s", "host_start_cpu_s")}
                new, old = host_ns_per_event(runs), host_ns_per_event(base)
                print(f"{'baseline':>10} {b['achieved'] / 1e6:>8.2f} M {b['e2e'] / 1e6:>8.2f} M "
                      f"{'':>11} {b['dropped']:>9,.0f}   host CPU {b['host_cpu_s']:.2f}s "
                      f"(start {b['host_start_cpu_s']:.2f}s); after start-up {new:.0f} vs "
                      f"{old:.0f} ns an event: {new / old:.2f}x")
            if ht:
                h = {k: statistics.median(r[k] for r in ht) for k in ("achieved", "e2e", "lag_s")}
                print(f"{'heaptrack':>10} {h['achieved'] / 1e6:>8.2f} M {h['e2e'] / 1e6:>8.2f} M "
                      f"{'':>11} {'0':>9} {'':>7} {h['lag_s']:>6.2f}   (alternating runs; "
                      f"nvse-monitor e2e = {med['e2e'] / h['e2e']:.2f} x heaptrack's)")
    print(f"highest sustained rate with zero drops: "
          f"{(best or 0) / 1e6:.2f} M events/s (median of {a.runs} runs)")
    if a.json:
        a.json.write_text(json.dumps(all_runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
