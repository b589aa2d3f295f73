"""Replay speed of a real live recording: the whole `nvse-monitor replay` command, start-up
included (interpreter, imports, decoding, engine, the files written), in events per second.
Issue 13's target: >= 4 M events/s on a >= 5 M-event live recording.

The recording is made here, reproducibly, and cached outside the repository (`--cache`, default
~/.cache/nvse-monitor-bench): tests/targets/workload.c (4 threads of malloc/calloc/realloc/
aligned_alloc/posix_memalign/free with varied sizes, see its header) is compiled with gcc and run
under `nvse-monitor spawn --record`, paced by a pause between rounds so that nothing is dropped
(a recording with drops is refused). It is made again when the workload source, the parameters
or the recording format change, or with `--regen`.

    python bench/bench_replay.py                      # median of 5 runs
    python bench/bench_replay.py --runs 7 --compare /tmp/base
    python bench/bench_replay.py --runs 5 --numpy   (the compiled kernels vs their numpy twins)

`--compare DIR` also runs another copy of the package (DIR holds its `nvse_monitor` directory,
e.g. `git archive main nvse_monitor | tar -x -C /tmp/base`) the same way, alternating runs, and
reports both medians and their ratio (on a shared machine the ratio within one run is what to
trust), and checks that both wrote byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = REPO / "tests" / "targets" / "workload.c"
# 4 threads x 60 rounds x 25,000 events: ~6.0 M events; the pause keeps the rate (~2 M/s) well
# under what the monitor sustains, so the recording is lossless.
WORKLOAD_ARGS = ["--threads", "4", "--iters", "10000", "--rounds", "60", "--pause-us", "30000"]
MIN_EVENTS = 5_000_000


def _run_monitor(pkg_root: Path, args: list[str], native: bool = True,
                 **kw) -> subprocess.CompletedProcess:
    """`python -m nvse_monitor ARGS` with the package found under pkg_root first (`-m` puts the
    working directory first on sys.path: it is pkg_root too); native=False: its numpy paths."""
    env = dict(os.environ, PYTHONPATH=str(pkg_root), NVSE_MONITOR_NATIVE="1" if native else "0")
    return subprocess.run([sys.executable, "-m", "nvse_monitor", *args], env=env, cwd=pkg_root,
                          **kw)


def recording(cache: Path, regen: bool) -> tuple[Path, int]:
    """The cached live recording and its number of events (made first if needed)."""
    from nvse_monitor.stream.recording import FORMAT_VERSION

    key = hashlib.sha256(WORKLOAD.read_bytes() + json.dumps(
        [WORKLOAD_ARGS, FORMAT_VERSION]).encode()).hexdigest()[:12]
    path = cache / f"workload-{key}.nvmrec"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and not regen:
        return path, json.loads(meta.read_text())["events"]
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / "workload"
    subprocess.run(["gcc", "-O2", "-pthread", str(WORKLOAD), "-o", str(exe)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"recording {' '.join(WORKLOAD_ARGS)} into {path} ...", flush=True)
        p = _run_monitor(REPO, ["spawn", "--record", str(path), "--out", tmp, "--",
                                str(exe), *WORKLOAD_ARGS], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"spawn failed ({p.returncode}):\n{p.stderr[-2000:]}")
        stats = json.loads((Path(tmp) / "MemoryPoolNVSE_stats.json").read_text())
    dropped = int(stats["monitor"]["dropped_events"])
    events = stats["memory_stats"]["total_allocations"] + stats["memory_stats"]["total_frees"]
    info = _run_monitor(REPO, ["info", str(path)], capture_output=True, text=True, check=True)
    records = next(int(x.split()[1]) for x in info.stdout.splitlines()
                   if x.startswith("records:"))
    if dropped or records < MIN_EVENTS:
        path.unlink()
        raise SystemExit(f"recording unusable: {records} records, {dropped} dropped "
                         f"(need >= {MIN_EVENTS}, none dropped); try again on a quieter machine")
    meta.write_text(json.dumps({"events": records, "engine_events": events,
                                "workload": WORKLOAD_ARGS}))
    return path, records


def one_replay(pkg_root: Path, rec: Path, out: Path, native: bool = True) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all threads) of one replay command."""
    shutil.rmtree(out, ignore_errors=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = _run_monitor(pkg_root, ["replay", str(rec), "--out", str(out)], native,
                     capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"replay failed ({p.returncode}) with {pkg_root}:\n{p.stderr[-2000:]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def same_files(a: Path, b: Path) -> list[str]:
    """Names of the files that differ between two output directories (or exist in one only)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names
            if not (a / n).exists() or not (b / n).exists()
            or (a / n).read_bytes() != (b / n).read_bytes()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare", type=Path, metavar="DIR", action="append", default=[],
                    help="another copy of the package (DIR/nvse_monitor) to run alternately "
                    "(repeatable)")
    ap.add_argument("--numpy", action="store_true",
                    help="also run this copy's numpy paths (NVSE_MONITOR_NATIVE=0) alternately")
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "nvse-monitor-bench")
    ap.add_argument("--regen", action="store_true", help="make the recording again")
    args = ap.parse_args()
    rec, events = recording(args.cache, args.regen)
    print(f"recording: {rec} ({events:,} events, {rec.stat().st_size / 2**20:.1f} MiB)")
    impls = [("current", REPO, True)]
    for i, d in enumerate(args.compare):
        if not (d / "nvse_monitor" / "__init__.py").exists():
            raise SystemExit(f"--compare: no nvse_monitor package in {d}")
        impls.append((f"compare{i + 1 if len(args.compare) > 1 else ''}", d.resolve(), True))
    if args.numpy:
        impls.append(("numpy", REPO, False))
    times: dict[str, list[float]] = {name: [] for name, _, _ in impls}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in impls}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name, _, _ in impls}
        for i in range(args.runs):
            for name, root, native in impls if i % 2 == 0 else impls[::-1]:
                wall, cpu_s = one_replay(root, rec, outs[name], native)
                times[name].append(wall)
                cpu[name].append(cpu_s)
            print(f"run {i + 1}: " + ", ".join(
                f"{n} {times[n][-1]:.2f} s ({events / times[n][-1] / 1e6:.2f} M/s, "
                f"CPU {cpu[n][-1]:.2f} s)" for n, _, _ in impls), flush=True)
        differ = {n: same_files(outs["current"], outs[n]) for n, _, _ in impls[1:]}
    med = {n: statistics.median(t) for n, t in times.items()}
    for n, _, _ in impls:
        print(f"{n}: {events / med[n] / 1e6:.2f} M events/s, median {med[n]:.3f} s of "
              f"{args.runs} (range {min(times[n]):.3f}-{max(times[n]):.3f} s), start-up included; "
              f"CPU {statistics.median(cpu[n]):.3f} s")
    for name, _, _ in impls[1:]:
        ratios = [c / n for n, c in zip(times["current"], times[name], strict=True)]
        print(f"speed-up current/{name}: {med[name] / med['current']:.2f}x of medians, "
              f"{statistics.median(ratios):.2f}x median of per-run ratios; files: "
              + (f"DIFFER: {', '.join(differ[name])}" if differ[name] else "byte-identical"))
    return 1 if any(differ.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
