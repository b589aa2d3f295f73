"""Replay-ingest benchmark of the stats engine (issue 2 targets: >= 5 M events/s on one core,
<= 64 host bytes per live tracked allocation; aim 10 M/s and 32 B).

Generates a synthetic stream (nvse_monitor.synthetic: game/scrap/CRT heaps, reallocs, untracked
frees, failures) of >= 20 M events with >= 1 M live allocations, feeds it to the engine in
recording-sized chunks, and reports the median of a few runs, plus in the same run:
- a naive per-event Python dict loop on a subset (the ratio is what matters across machines);
- small live-sized batches (per-batch overhead);
- live-set memory: table bytes / live blocks, and the peak RSS growth of the first run.

    python bench/bench_ingest.py            # full: 20 M events, ~1.2 M live (< 3 min)
    python bench/bench_ingest.py --quick    # 3 M events, 300 K live (~20 s)
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import numpy as np

from nvse_monitor import synthetic
from nvse_monitor.engine import Engine, EngineConfig
from nvse_monitor.stream import AgentCounters, Batch


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def feed_all(meta, recs: np.ndarray, chunk: int, cfg: EngineConfig) -> tuple[float, Engine, int]:
    eng = Engine(meta, cfg)
    eng.start()
    ts = recs["ts_us"]
    peak_live = 0
    t0 = time.perf_counter()
    for i in range(0, len(recs), chunk):
        part = recs[i:i + chunk]
        eng.feed(Batch(int(ts[min(i + chunk, len(recs)) - 1]), AgentCounters(), part))
        peak_live = max(peak_live, eng.table.count)
    eng.finish()
    return time.perf_counter() - t0, eng, peak_live


def naive(recs: np.ndarray) -> float:
    """The per-event dict loop the issue compares against (counters + live dict only)."""
    live: dict[int, int] = {}
    total = frees = cur = peak = untracked = fails = 0
    t0 = time.perf_counter()
    for kind, ptr, old, size in zip(recs["kind"].tolist(), recs["ptr"].tolist(),
                                    recs["old_ptr"].tolist(), recs["size"].tolist(), strict=True):
        if kind == 1:
            total += 1
            live[ptr] = size
            cur += size
        elif kind == 2:
            s = live.pop(ptr, None)
            if s is None:
                untracked += 1
            else:
                frees += 1
                cur -= s
        elif kind == 3:
            s = live.pop(old, None)
            if s is not None:
                frees += 1
                cur -= s
            if size:
                total += 1
                live[ptr] = size
                cur += size
        else:
            fails += 1
        peak = max(peak, cur)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 M events, 300 K live")
    ap.add_argument("--events", type=int, default=20_000_000)
    ap.add_argument("--live", type=int, default=1_200_000)
    ap.add_argument("--chunk", type=int, default=65_536, help="records per batch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--naive-events", type=int, default=1_000_000)
    ap.add_argument("--small-chunk", type=int, default=512, help="live-sized batches")
    a = ap.parse_args()
    if a.quick:
        a.events, a.live, a.naive_events = 3_000_000, 300_000, 300_000
    t = time.perf_counter()
    meta, recs = synthetic.generate_records(a.events, seed=2026, live_target=a.live,
                                            batch_records=1 << 16)
    print(f"generated {len(recs):,} records in {time.perf_counter() - t:.1f} s "
          f"(kinds alloc/free/realloc/failed: {np.bincount(recs['kind'], minlength=5)[1:]})")
    cfg = EngineConfig()
    gc.collect()
    rss0 = rss_peak_mb()
    times = []
    for run in range(a.runs):
        dt, eng, peak_live = feed_all(meta, recs, a.chunk, cfg)
        times.append(dt)
        if run == 0:
            rss_delta = rss_peak_mb() - rss0
            live = eng.table.count
            table_b = eng.table.nbytes
            print(f"live tracked at end: {live:,} (peak {peak_live:,}); "
                  f"table {table_b / 2**20:.1f} MiB = {table_b / max(live, 1):.1f} B per live "
                  f"allocation; peak RSS growth {rss_delta:.0f} MiB = "
                  f"{rss_delta * 2**20 / max(peak_live, 1):.1f} B per peak live allocation")
        print(f"run {run + 1}: {dt:.2f} s = {len(recs) / dt / 1e6:.2f} M events/s")
        del eng
        gc.collect()
    med = statistics.median(times)
    eps = len(recs) / med
    sub = recs[: a.naive_events]
    dn = naive(sub)
    n_eps = len(sub) / dn
    dsmall, _, _ = feed_all(meta, sub, a.small_chunk, cfg)
    dbig, _, _ = feed_all(meta, sub, a.chunk, cfg)
    print(f"median engine: {eps / 1e6:.2f} M events/s over {len(recs):,} events "
          f"(chunks of {a.chunk:,})")
    print(f"naive dict loop: {n_eps / 1e6:.2f} M events/s on {len(sub):,} events; "
          f"engine/naive = {eps / n_eps:.1f}x")
    print(f"same {len(sub):,} events in {a.small_chunk}-record batches: "
          f"{len(sub) / dsmall / 1e6:.2f} M events/s (vs {len(sub) / dbig / 1e6:.2f} in "
          f"{a.chunk:,}-record chunks)")


if __name__ == "__main__":
    main()
