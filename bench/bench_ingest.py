"""Replay-ingest benchmark of the stats engine (issue 2 targets: >= 5 M events/s on one core,
<= 64 host bytes per live tracked allocation; aim 10 M/s and 32 B).

Generates a synthetic stream (nvse_monitor.stream.synthetic: game/scrap/CRT heaps, reallocs,
untracked frees, failures) of >= 20 M events with >= 1 M live allocations, feeds it to the engine
in recording-sized chunks, and reports the median of a few runs, plus in the same run:
- a naive per-event Python dict loop on a subset (the ratio is what matters across machines);
- small live-sized batches (per-batch overhead);
- live-set memory: table bytes / live blocks, and the RSS growth of the first run.

    python bench/bench_ingest.py            # full: 20 M events, ~1.2 M live (< 3 min)
    python bench/bench_ingest.py --quick    # 3 M events, 300 K live (~20 s)

A/B on a noisy shared machine: `--compare DIR` also runs the engine of another copy of the
package (DIR = its nvse_monitor directory, e.g. `git archive HEAD nvse_monitor | tar -x -C
/tmp/base` then `--compare /tmp/base/nvse_monitor`) in the same process, alternating runs, and
reports both medians and their ratio (ratios in one run are what to trust there).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from nvse_monitor.engine import Engine, EngineConfig
from nvse_monitor.stream import synthetic
from nvse_monitor.stream.messages import AgentCounters, Batch


def _status_kb(*fields: str) -> int:
    """Sum of /proc/self/status fields, in kB (Linux)."""
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.split(":")[0] in fields:
                total += int(line.split()[1])
    return total


def anon_kb() -> int:
    return _status_kb("RssAnon", "RssShmem")


@dataclass
class Impl:
    """The engine classes of one copy of the package."""

    name: str
    engine: type
    config: type
    batch: type
    counters: type


def load_impl(name: str, pkg_dir: str | None) -> Impl:
    """This package's engine, or (pkg_dir) another copy of it imported as its own package."""
    if pkg_dir is None:
        return Impl(name, Engine, EngineConfig, Batch, AgentCounters)
    pkg = "nvse_monitor_" + name
    spec = importlib.util.spec_from_file_location(
        pkg, os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare: no package at {pkg_dir}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = mod
    spec.loader.exec_module(mod)
    e = importlib.import_module(pkg + ".engine")
    st = importlib.import_module(pkg + ".stream")
    return Impl(name, e.Engine, e.EngineConfig, st.Batch, st.AgentCounters)


def feed_all(meta, recs: np.ndarray, chunk: int, impl: Impl | None = None,
             cfg: EngineConfig | None = None) -> tuple[float, Engine, int]:
    impl = impl or load_impl("current", None)
    eng = impl.engine(meta, cfg or impl.config())
    eng.start()
    ts = recs["ts_us"]
    peak_live = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(recs), chunk):
        part = recs[i:i + chunk]
        eng.feed(impl.batch(int(ts[min(i + chunk, len(recs)) - 1]), impl.counters(), part))
        peak_live = max(peak_live, eng.table.count)
    eng.finish()
    eng.cpu_s = time.process_time() - c0  # CPU time: less disturbed by other jobs than wall
    return time.perf_counter() - t0, eng, peak_live


def feed_many_runs(meta, recs: np.ndarray, small: int, chunk: int, cfg: EngineConfig) -> float:
    """Small batches (as recorded from live drains) handed over `chunk` records at a time."""
    eng = Engine(meta, cfg)
    eng.start()
    ts = recs["ts_us"]
    batches = [Batch(int(ts[min(i + small, len(recs)) - 1]), AgentCounters(), recs[i:i + small])
               for i in range(0, len(recs), small)]
    per = max(1, chunk // small)
    t0 = time.perf_counter()
    for i in range(0, len(batches), per):
        eng.feed_many(batches[i:i + per])
    eng.finish()
    return time.perf_counter() - t0


def naive(meta, recs: np.ndarray) -> float:
    """The per-event Python loop with a dict that the issue compares against, doing the
    engine's counter work: live dict, totals, peaks, untracked frees, failures, per-heap bytes,
    module of the caller (bisect), a CSV sample every 1000 allocations."""
    import bisect

    heap_of = [h.heap for h in meta.hooks]
    mods = sorted((m.base, m.base + m.size, m.name) for m in meta.modules)
    bases = [m[0] for m in mods]
    live: dict[int, tuple[int, int, int, int, str]] = {}
    heap_cur: dict[str, int] = {}
    heap_peak: dict[str, int] = {}
    c = dict(allocs=0, frees=0, cur=0, peak=0, peak_n=0, untracked=0, fails=0, bytes=0)
    rows = []
    last_t = last_f = 0

    def alloc(t, ptr, size, caller, hook):  # noqa: ANN001, ANN202
        nonlocal last_t, last_f
        if ptr in live:
            free(ptr)
        i = bisect.bisect_right(bases, caller) - 1
        mod = mods[i][2] if i >= 0 and caller < mods[i][1] else "unknown"
        heap = heap_of[hook] if hook < len(heap_of) else "unknown"
        live[ptr] = (size, t, caller, hook, mod)
        c["allocs"] += 1
        c["bytes"] += size
        c["cur"] += size
        c["peak"] = max(c["peak"], c["cur"])
        c["peak_n"] = max(c["peak_n"], len(live))
        heap_cur[heap] = heap_cur.get(heap, 0) + size
        heap_peak[heap] = max(heap_peak.get(heap, 0), heap_cur[heap])
        if c["allocs"] % 1000 == 0:
            dt = max(t - last_t, 1)
            rows.append((t, 1000e6 / dt, (c["frees"] - last_f) * 1e6 / dt, c["cur"], c["peak"]))
            last_t, last_f = t, c["frees"]

    def free(ptr):  # noqa: ANN001, ANN202
        b = live.pop(ptr, None)
        if b is None:
            c["untracked"] += 1
            return
        c["frees"] += 1
        c["cur"] -= b[0]
        heap = heap_of[b[3]] if b[3] < len(heap_of) else "unknown"
        heap_cur[heap] -= b[0]

    t0 = time.perf_counter()
    for t, ptr, old, size, caller, kind, hook in zip(
            recs["ts_us"].tolist(), recs["ptr"].tolist(), recs["old_ptr"].tolist(),
            recs["size"].tolist(), recs["caller"].tolist(), recs["kind"].tolist(),
            recs["hook"].tolist(), strict=True):
        if kind == 1:
            if ptr:
                alloc(t, ptr, size, caller, hook)
            else:
                c["fails"] += 1
        elif kind == 2:
            if ptr:
                free(ptr)
        elif kind == 3:
            if size and not ptr:
                c["fails"] += 1
                continue
            if old:
                free(old)
            if size:
                alloc(t, ptr, size, caller, hook)
        else:
            c["fails"] += 1
    return time.perf_counter() - t0


def memory_in_fresh_process(meta, recs: np.ndarray, chunk: int) -> None:
    """Anonymous RSS growth of a fresh interpreter feeding the stream (records memory-mapped
    from a file, so they are not anonymous memory): at the end and at its peak."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "recs.npy")
        np.save(path, recs)
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta.to_json(), f)
        out = subprocess.run([sys.executable, __file__, "--memory-child", d, "--chunk", str(chunk)],
                             capture_output=True, text=True, check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    live = m["live"]
    print(f"fresh process: anonymous RSS growth {m['end'] / 2**20:.0f} MiB at the end = "
          f"{m['end'] / live:.1f} B per live allocation (peak {m['peak'] / 2**20:.0f} MiB); "
          f"after malloc_trim {m['trimmed'] / 2**20:.0f} MiB = {m['trimmed'] / live:.1f} B "
          "(the rest is freed memory glibc keeps: per-batch temporaries)")


def memory_child(d: str, chunk: int) -> None:
    from nvse_monitor.stream.messages import SessionMeta

    recs = np.load(os.path.join(d, "recs.npy"), mmap_mode="r")
    with open(os.path.join(d, "meta.json")) as f:
        meta = SessionMeta.from_json(json.load(f))
    eng = Engine(meta, EngineConfig())
    eng.start()
    gc.collect()
    base = anon_kb()
    peak = peak_live = 0
    ts = recs["ts_us"]
    for i in range(0, len(recs), chunk):
        part = np.asarray(recs[i:i + chunk])
        eng.feed(Batch(int(ts[min(i + chunk, len(recs)) - 1]), AgentCounters(), part))
        del part
        peak = max(peak, anon_kb() - base)
        peak_live = max(peak_live, eng.table.count)
    end = anon_kb() - base
    trimmed = end
    try:  # glibc keeps freed heap memory (per-batch temporaries): give it back
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = anon_kb() - base
    except (OSError, AttributeError):
        pass
    print(json.dumps({"end": end * 1024, "peak": peak * 1024, "trimmed": trimmed * 1024,
                      "live": eng.table.count, "peak_live": peak_live}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 M events, 300 K live")
    ap.add_argument("--events", type=int, default=20_000_000)
    ap.add_argument("--live", type=int, default=1_200_000)
    ap.add_argument("--chunk", type=int, default=65_536, help="records per batch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--naive-events", type=int, default=1_000_000)
    ap.add_argument("--small-chunk", type=int, default=512, help="live-sized batches")
    ap.add_argument("--compare", metavar="DIR",
                    help="also run the engine of another copy of the package (its nvse_monitor "
                         "directory), alternating runs in this process")
    ap.add_argument("--engine-only", action="store_true",
                    help="only the engine runs (no memory, naive loop or small-batch figures)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        memory_child(a.memory_child, a.chunk)
        return
    if a.quick:
        a.events, a.live, a.naive_events = 3_000_000, 300_000, 300_000
    t = time.perf_counter()
    meta, recs = synthetic.generate_records(a.events, seed=2026, live_target=a.live,
                                            batch_records=1 << 16)
    print(f"generated {len(recs):,} records in {time.perf_counter() - t:.1f} s "
          f"(kinds alloc/free/realloc/failed: {np.bincount(recs['kind'], minlength=5)[1:]})")
    cfg = EngineConfig()
    impls = [load_impl("current", None)]
    if a.compare:
        impls.append(load_impl("baseline", os.path.abspath(a.compare)))
        for im in impls:  # warm-up (allocator state, caches) so no run is penalised by order
            feed_all(meta, recs[: len(recs) // 20], a.chunk, im)
    times: dict[str, list[float]] = {im.name: [] for im in impls}
    cpu: dict[str, list[float]] = {im.name: [] for im in impls}
    counters: dict[str, dict] = {}
    for run in range(a.runs):
        for im in impls if run % 2 == 0 else impls[::-1]:
            gc.collect()
            dt, eng, peak_live = feed_all(meta, recs, a.chunk, im)
            times[im.name].append(dt)
            cpu[im.name].append(eng.cpu_s)
            if run == 0:
                counters[im.name] = vars(eng.state.c)
                live = eng.table.count
                table_b = eng.table.nbytes
                print(f"[{im.name}] live tracked at end: {live:,} (peak {peak_live:,}); live "
                      f"table {table_b / 2**20:.1f} MiB = {table_b / max(live, 1):.1f} B per live "
                      f"allocation ({eng.table.count / eng.table.slots:.0%} load)")
            print(f"[{im.name}] run {run + 1}: {dt:.2f} s = {len(recs) / dt / 1e6:.2f} M events/s "
                  f"(CPU {eng.cpu_s:.2f} s)")
            del eng
    if a.compare:
        same = counters["current"] == counters["baseline"]
        print("final counters: " + ("identical" if same else "DIFFER between the two copies"))
        cur, base = times["current"], times["baseline"]
        pair = sorted(b / c for b, c in zip(base, cur, strict=True))
        med = statistics.median
        print(f"median current {len(recs) / med(cur) / 1e6:.2f} M events/s, baseline "
              f"{len(recs) / med(base) / 1e6:.2f}: current is {med(base) / med(cur):.3f}x "
              f"baseline (median of per-pair ratios {med(pair):.3f}, range {pair[0]:.3f}-"
              f"{pair[-1]:.3f}); CPU time: {med(cpu['baseline']) / med(cpu['current']):.3f}x")
    times = times["current"]
    if a.engine_only:
        print(f"median engine: {len(recs) / statistics.median(times) / 1e6:.2f} M events/s")
        return
    memory_in_fresh_process(meta, recs, a.chunk)
    med = statistics.median(times)
    eps = len(recs) / med
    sub = recs[: a.naive_events]
    dn = naive(meta, sub)
    n_eps = len(sub) / dn
    dsmall, _, _ = feed_all(meta, sub, a.small_chunk, cfg=cfg)
    dbig, _, _ = feed_all(meta, sub, a.chunk, cfg=cfg)
    dmany = feed_many_runs(meta, sub, a.small_chunk, a.chunk, cfg)
    print(f"median engine: {eps / 1e6:.2f} M events/s over {len(recs):,} events "
          f"(chunks of {a.chunk:,})")
    print(f"naive dict loop: {n_eps / 1e6:.2f} M events/s on {len(sub):,} events; "
          f"engine/naive = {eps / n_eps:.1f}x")
    print(f"same {len(sub):,} events in {a.small_chunk}-record batches: "
          f"{len(sub) / dsmall / 1e6:.2f} M events/s (vs {len(sub) / dbig / 1e6:.2f} in "
          f"{a.chunk:,}-record chunks; {len(sub) / dmany / 1e6:.2f} with feed_many() taking "
          f"them {a.chunk // a.small_chunk} at a time, as replay can)")


if __name__ == "__main__":
    main()
