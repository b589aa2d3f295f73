"""Engine ingest with sampled stacks (issue 11, samples.py) vs without, in one run.

One synthetic stream (nvse_monitor.stream.synthetic), replayed as it is (no STACK records, sampling
off) and with the agent's sampling simulated (synthetic.with_stacks) at several mean
intervals; each variant fed to a fresh Engine in recording-sized runs (feed_many), the median of
a few alternating runs. Ratios to the unsampled stream are what to trust on a shared machine.

    python bench/bench_samples.py            # 3 M events, replay-sized runs of batches
    python bench/bench_samples.py --live     # batches of 1024 records fed one by one (a live
                                             # session's shape: per-batch costs show)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from nvse_monitor.engine import Engine
from nvse_monitor.stream import synthetic
from nvse_monitor.stream.messages import Batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=3_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rates", default="65536,16384,4096")
    ap.add_argument("--live", action="store_true")
    a = ap.parse_args()
    meta, msgs = synthetic.generate(a.events, seed=11, batch_records=1024 if a.live else 4096,
                                    drain_us=1000 if a.live else 20_000)
    step = 1 if a.live else 64
    msgs = list(msgs)
    variants = {"off": (meta, msgs)}
    for n in (int(x) for x in a.rates.split(",")):
        m2, s = synthetic.with_stacks(meta, iter(msgs), n, seed=1)
        variants[f"N={n}"] = (m2, list(s))
    times: dict[str, list[float]] = {k: [] for k in variants}
    info: dict[str, dict] = {}
    for _ in range(a.runs):
        for k, (m, ms) in variants.items():
            gc.collect()
            e = Engine(m)
            t = time.perf_counter()
            for i in range(0, len(ms), step):  # runs of batches, as replay reads them
                e.feed_many(ms[i:i + step])
            e.finish()
            times[k].append(time.perf_counter() - t)
            sp = e.samples
            records = sum(len(x.records) for x in ms if isinstance(x, Batch))
            info[k] = {"records": records, "sampled": sp.sampled_allocations if sp else 0,
                       "stacks": len(sp.stacks) if sp else 0,
                       "sampled_live": len(sp.live) if sp else 0}
    base = statistics.median(times["off"])
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"median_s": round(med, 3), "ratio_to_off": round(med / base, 3),
                  "events_per_s": round(a.events / med), **info[k]}
    print(json.dumps({"events": a.events, "runs": a.runs, "live": a.live,
                      "batches": sum(isinstance(x, Batch) for x in msgs), "variants": out},
                     indent=1))


if __name__ == "__main__":
    main()
