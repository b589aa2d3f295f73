"""Cost of the views (docs/views.md) on the host's event processing, and of the leak report.

1. Pipeline throughput on a synthetic session fed like a live one (runs of agent batches),
   without views vs with the `top` dashboard (its own thread, 2 Hz, rendering into a string
   console) and /metrics scraped 4x a second: median of alternating runs.
2. The leak report (Engine.live_allocations + grouping) with ~1 M live blocks.

    python bench/bench_views.py            # 6 M events, ~1 M live at the end
    python bench/bench_views.py --quick    # 1.5 M events
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
import urllib.request

from rich.console import Console

from nvse_monitor.engine import leaks
from nvse_monitor.outputs.pipeline import Pipeline
from nvse_monitor.stream import synthetic
from nvse_monitor.stream.messages import Batch
from nvse_monitor.views.metrics import MetricsServer
from nvse_monitor.views.top import PipelineSource, run_dashboard


def run(meta, msgs, views: bool) -> tuple[float, Pipeline, int]:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline(meta, tmp)
        pipe.start()
        stop = threading.Event()
        threads: list[threading.Thread] = []
        server = None
        frames = [0]
        if views:
            server = MetricsServer(port=0).start()
            server.attach(pipe)
            con = Console(file=io.StringIO(), width=120, force_terminal=False)

            def dash() -> None:
                d = run_dashboard(PipelineSource(pipe), 0.5, con, stop)
                frames[0] = len(d.mem)

            def scraper() -> None:
                while not stop.wait(0.25):
                    urllib.request.urlopen(server.url, timeout=5).read()

            threads = [threading.Thread(target=dash), threading.Thread(target=scraper)]
            for t in threads:
                t.start()
        t0 = time.perf_counter()
        run_: list = []
        for m in msgs:
            run_.append(m)
            if len(run_) >= 32 or not isinstance(m, Batch):
                pipe.feed_many(run_)
                run_ = []
        pipe.feed_many(run_)
        dt = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
        if server is not None:
            server.stop()
        pipe.finish()
        return dt, pipe, frames[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    n = 1_500_000 if a.quick else 6_000_000
    meta, it = synthetic.generate(n, seed=7, live_target=n // 6)
    msgs = list(it)
    events = sum(len(m.records) for m in msgs if isinstance(m, Batch))
    base, withv = [], []
    for _ in range(a.runs):
        base.append(run(meta, msgs, False)[0])
        dt, pipe, frames = run(meta, msgs, True)
        withv.append(dt)
    b, w = statistics.median(base), statistics.median(withv)
    print(f"{events:,} events; without views {events / b / 1e6:.2f} M/s ({b:.2f} s), with top "
          f"(2 Hz) + /metrics (4 Hz) {events / w / 1e6:.2f} M/s ({w:.2f} s): "
          f"{(w / b - 1) * 100:+.1f} %  (medians of {a.runs}; {frames} dashboard samples)")
    eng = pipe.engine
    t0 = time.perf_counter()
    live = eng.live_allocations()
    t1 = time.perf_counter()
    rep = leaks.group_live(live, eng.modmap.modules, eng.heap_names)
    t2 = time.perf_counter()
    print(f"leak report: {len(live['ptr']):,} live blocks, {len(rep.sites):,} call sites; "
          f"live_allocations {t1 - t0:.3f} s + grouping {t2 - t1:.3f} s")


if __name__ == "__main__":
    main()
