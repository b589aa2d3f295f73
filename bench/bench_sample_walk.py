"""Cost of one sampled call (stack walk + STACK records) on a call chain with frame pointers:
tests/agent_targets/wrapped.c's chain -> f1 -> f2 -> f3 -> malloc(4096) + free, timed from the
host per command, with --sample-bytes 4096 (63 % of the calls sampled), with sampling compiled
in but never due (2^28 bytes), and off.

    python bench/bench_sample_walk.py [--arch x64] [--calls 100000] [--rounds 7]

Per sampled call = (time at 4096 - time never due) / sampled fraction.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from agent_harness import TARGETS, Monitored  # noqa: E402

from nvse_monitor.capture.agent_host import AgentConfig  # noqa: E402
from nvse_monitor.stream.events import FLAG_SAMPLED, Kind  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="x64", choices=["x64", "ia32"])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "wrapped"
        cmd = ["gcc", "-O0", "-fno-omit-frame-pointer", "-rdynamic", str(TARGETS / "wrapped.c"),
               "-o", str(exe)] + (["-m32"] if args.arch == "ia32" else [])
        subprocess.run(cmd, check=True)
        res: dict[int, tuple[float, float, int]] = {}
        for sb in (0, 1 << 28, 4096):
            cfg = AgentConfig(sample_bytes=sb, ring_slots=1 << 20)
            with Monitored([str(exe)], "linux-libc", cfg) as m:
                ts = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    m.say(f"chain {args.calls} 4096")
                    m.read_until()
                    ts.append(time.perf_counter() - t0)
                    m.agent.flush()
                r = m.records()
                calls = r[r["kind"] == Kind.ALLOC]
                sampled = int(np.count_nonzero(calls["flags"] & FLAG_SAMPLED))
                frames = int(r[r["kind"] == Kind.STACK]["flags"].max()) if sampled else 0
                res[sb] = (statistics.median(ts) / args.calls * 1e9,
                           sampled / (args.rounds * args.calls), frames)
    print(f"bench_sample_walk: {args.arch}, {args.rounds} rounds x {args.calls} chain calls "
          "(malloc 4096 + free), ns per pair (median)")
    for sb, (ns, frac, frames) in res.items():
        label = {0: "off", 1 << 28: "never due", 4096: "4096"}[sb]
        print(f"  --sample-bytes {label:9s} {ns:7.1f}  sampled {frac:.3f}  frames {frames}")
    per = (res[4096][0] - res[1 << 28][0]) / res[4096][1]
    print(f"per sampled call (walk of {res[4096][2]} frames + its STACK records): {per:.0f} ns")


if __name__ == "__main__":
    main()
