"""Soak: a target allocating at a steady rate for a long time, monitored by `nvse-monitor attach`
exactly as a user runs it. Samples the monitor's memory, the drops and the growth of the files.

    python bench/soak.py                      # 10 minutes at 1 M events/s (the issue's figure)
    python bench/soak.py --minutes 3 --rate 2000000 --json soak.json

The target is tests/targets/hammer.c (malloc/free pairs, 16 blocks live: the live set is stable
from the first second), so the host's memory must stay flat after warm-up, nothing may be
dropped, and the files must grow at the rate the spec implies: a CSV row per 1,000 allocations
(an event is a malloc or a free, so 1 M events/s = 500 k allocations/s = 500 rows/s), and the
log only by the monitor's own lines (a few per status change / large allocation).

tests/test_reliability_soak.py runs a 15-second version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HAMMER = REPO / "tests" / "targets" / "hammer.c"
PREFIX = "MemoryPoolNVSE"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def build_hammer(dest: Path) -> Path:
    exe = dest / "hammer"
    subprocess.run(["gcc", "-O2", "-pthread", str(HAMMER), "-o", str(exe)], check=True)
    return exe


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run_soak(seconds: float, rate: float, work_dir: Path, interval: float = 5.0,
             threads: int = 1, log=print) -> dict:
    """One soak; returns the samples and a summary (see main() for the keys)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    exe = build_hammer(work_dir)
    out = work_dir / "out"
    paths = {k: out / f"{PREFIX}_{n}" for k, n in
             (("log", "rpmalloc.log"), ("json", "stats.json"), ("csv", "performance.csv"))}
    target = subprocess.Popen([str(exe), "--seconds", str(seconds), "--rate", str(rate),
                               "--threads", str(threads)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    mon = None
    samples: list[dict] = []
    try:
        assert target.stdout is not None and target.stdin is not None
        ready = target.stdout.readline()
        assert ready.startswith("READY"), ready
        mon = subprocess.Popen(
            [sys.executable, "-m", "nvse_monitor", "attach", str(target.pid), "--out", str(out),
             "--log-max-mb", "0"],  # measure the log's natural growth
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert mon.stderr is not None
        start = mon.stderr.readline()
        assert "monitoring" in start, start + mon.stderr.read()
        target.stdin.write("\n")
        target.stdin.flush()
        t0 = time.monotonic()
        last_cpu, last_t = cpu_seconds(mon.pid), 0.0
        while True:
            el = time.monotonic() - t0
            cpu = cpu_seconds(mon.pid)
            cpu_pct = 100 * (cpu - last_cpu) / (el - last_t) if el > last_t else 0.0
            last_cpu, last_t = cpu, el
            js = read_json(paths["json"]) or {}
            mon_sec = js.get("monitor", {})
            samples.append({
                "t": round(el, 1),
                "rss_mb": round(rss_mb(mon.pid), 1),
                "target_rss_mb": round(rss_mb(target.pid), 1),
                "allocs": js.get("memory_stats", {}).get("total_allocations", 0),
                "agent_allocs": mon_sec.get("agent_counters", {}).get("allocs", 0),
                "dropped": mon_sec.get("dropped_events", 0),
                "csv_bytes": size(paths["csv"]),
                "csv_rows": max(0, count_lines(paths["csv"]) - 1),
                "log_bytes": size(paths["log"]),
                "host_cpu_pct": round(cpu_pct),
                "load": load_average(),
            })
            s = samples[-1]
            log(f"{s['t']:7.1f}s  host RSS {s['rss_mb']:6.1f} MB  target RSS "
                f"{s['target_rss_mb']:6.1f} MB  allocs {s['allocs']:>12,}  drops {s['dropped']}  "
                f"csv {s['csv_bytes'] / 1e6:7.2f} MB  log {s['log_bytes'] / 1e3:7.1f} kB  "
                f"host CPU {s['host_cpu_pct']:3d} %  load {s['load']:.2f}")
            if el >= seconds:
                break
            time.sleep(min(interval, max(0.05, seconds - el)))
        done = target.stdout.readline()
        assert done.startswith("DONE"), done
        truth = json.loads(done[4:])
        mon.send_signal(signal.SIGINT)
        _, err = mon.communicate(timeout=120)
        mon_rc = mon.returncode
        target.stdin.write("\n")
        target.stdin.flush()
        target.wait(timeout=30)
    finally:
        for p in (mon, target):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    final = read_json(paths["json"]) or {}
    ms = final.get("memory_stats", {})
    ac = final.get("monitor", {}).get("agent_counters", {})
    secs = truth["seconds"]
    allocs = ms.get("total_allocations", 0)
    # memory after warm-up: from the first sample at >= 20 % of the run
    warm = [s for s in samples if s["t"] >= 0.2 * seconds] or samples
    rss_warm = [s["rss_mb"] for s in warm]
    half = [s for s in samples if s["t"] >= 0.5 * seconds] or samples[-2:]
    slope = 0.0
    if len(half) >= 2 and half[-1]["t"] > half[0]["t"]:
        slope = (half[-1]["rss_mb"] - half[0]["rss_mb"]) / ((half[-1]["t"] - half[0]["t"]) / 60)
    csv_rows = max(0, count_lines(paths["csv"]) - 1)
    return {
        "seconds": round(secs, 1),
        "target_events": truth["events"],
        "target_rate": round(truth["rate"]),
        "monitor_exit": mon_rc,
        "monitor_stderr_tail": err.strip().splitlines()[-3:],
        "total_allocations": allocs,
        "agent_allocs": ac.get("allocs"),
        "dropped": final.get("monitor", {}).get("dropped_events"),
        "status": final.get("plugin", {}).get("status"),
        "rss_mb_after_warmup_first": rss_warm[0],
        "rss_mb_after_warmup_max": max(rss_warm),
        "rss_mb_last": samples[-1]["rss_mb"],
        "rss_mb_per_min_second_half": round(slope, 2),
        "host_cpu_pct_median": sorted(x["host_cpu_pct"] for x in samples[1:] or samples)[
            len(samples[1:] or samples) // 2],
        "csv_rows": csv_rows,
        "csv_rows_expected": allocs // 1000,
        "csv_bytes": size(paths["csv"]),
        "csv_bytes_per_s": round(size(paths["csv"]) / secs),
        "csv_bytes_per_row": round(size(paths["csv"]) / max(1, csv_rows + 1), 1),
        "log_bytes": size(paths["log"]),
        "log_lines": count_lines(paths["log"]),
        "log_bytes_per_s": round(size(paths["log"]) / secs, 1),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1_000_000, help="target events/s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write the summary and samples here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvse-soak-") as tmp:
        res = run_soak(args.minutes * 60, args.rate, args.dir or Path(tmp), args.interval,
                       args.threads)
    summary = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
