"""Where the engine's CPU goes, live: the tight loop (bench/tightloop.c) spawned under
`nvse-monitor spawn`, each step of the engine timed with time.thread_time_ns (issue 13).

    python bench/bench_engine_steps.py [--pairs 5000000] [--rounds 3]

Prints the median CPU ns per record of each step, with the loop's own ns per call. The steps
nest: `process` holds expand, modmap, track and aggregate; `aggregate` holds sums and
state_span; `state_span` holds span. With --child, this file is the monitor itself (the
steps wrapped, then `python -m nvse_monitor` run in the same process).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "ENGINE-PHASES "


def _child(args: list[str]) -> None:
    """Wrap the engine's steps, run the monitor, print the totals at its finish."""
    from nvse_monitor.engine import classify, engine, modmap, samples

    acc: dict[str, int] = defaultdict(int)
    records = [0]

    def timed(owner: object, name: str, key: str, static: bool = False) -> None:
        orig = getattr(owner, name)

        def f(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t = time.thread_time_ns()
            try:
                return orig(*a, **k)
            finally:
                acc[key] += time.thread_time_ns() - t

        setattr(owner, name, staticmethod(f) if static else f)

    timed(classify, "_expand_native", "expand")
    timed(engine, "track_compiled", "track")  # the engine calls it by this name
    timed(engine.Engine, "_sums_native", "sums", static=True)
    timed(engine, "_span_compiled", "span")
    timed(engine.Engine, "_state_span", "state_span")
    timed(engine.Engine, "_aggregate", "aggregate")
    timed(modmap.ModuleMap, "lookup", "modmap")
    timed(samples.SampledStacks, "feed", "samples")
    orig_process = engine.Engine._process_records

    def process(self, r, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        records[0] += len(r)
        t = time.thread_time_ns()
        try:
            return orig_process(self, r, *a, **k)
        finally:
            acc["process"] += time.thread_time_ns() - t

    engine.Engine._process_records = process
    orig_finish = engine.Engine.finish

    def finish(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        n = max(records[0], 1)
        print(MARK + " ".join(f"{k}={v / n:.2f}" for k, v in acc.items()), file=sys.stderr,
              flush=True)
        return orig_finish(self, *a, **k)

    engine.Engine.finish = finish
    sys.argv = ["nvse_monitor", *args]
    runpy.run_module("nvse_monitor", run_name="__main__")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from bench_pipeline import build, loop_ns

    runs: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build(REPO / "bench" / "tightloop.c", tmp / "tightloop")
        for i in range(a.rounds):
            out = tmp / f"out-{i}"
            r = subprocess.run([sys.executable, __file__, "--child", "spawn", "--out", str(out),
                                "--", str(exe), str(a.pairs)], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tmp)
            line = next((x for x in r.stderr.splitlines() if x.startswith(MARK)), None)
            if r.returncode != 0 or line is None:
                sys.stderr.write(r.stderr)
                return 1
            runs["loop ns/call"].append(loop_ns(r.stdout))
            for k, v in re.findall(r"(\w+)=([0-9.]+)", line):
                runs[k].append(float(v))
    print(f"engine steps, live tight loop ({a.pairs:,} pairs), CPU ns per record, "
          f"median of {a.rounds}:")
    for k, v in runs.items():
        print(f"   {k:14s} {statistics.median(v):6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
