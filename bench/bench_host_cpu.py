"""The host's CPU time per event on the live path (issue 13): once producers wait for the host,
the host's consumption rate is the target's speed limit, so this is the figure to cut.

Two parts, both on the records of a real live recording, in CPU time of this process (less
sensitive than wall time to other work on a shared machine):
- engine: the engine and the four writers (a Pipeline as a live session runs it: JSON and status
  at most 4 times a second), fed batches as the live consumer feeds them;
- reader: the shared-ring reader's look at the ring (capture/reader.py: copy out of the ring,
  time interpolation, validation, counting), the records published into an in-memory ring.

The recording: `--hammer` makes one of tests/targets/hammer.c, 8 threads of malloc/free as fast
as they can under `nvse-monitor attach --record` (cached like bench_replay's), or `--recording
PATH`; by default bench_replay.py's workload.c recording (reallocs, calloc, aligned allocs).

    python bench/bench_host_cpu.py --hammer --rounds 5 --compare DIR
    python bench/bench_host_cpu.py --hammer --rounds 5 --numpy   (compiled kernels vs numpy)
    python bench/bench_host_cpu.py --recording FILE --profile    (where the engine's time goes)
    (DIR: another copy of the package, e.g. `git archive <rev> nvse_monitor | tar -x -C DIR`)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "nvse-monitor-bench"


def hammer_recording(cache: Path, seconds: float = 2.0, threads: int = 8) -> Path:
    """A live recording of hammer.c (threads x malloc/free pairs as fast as they can), with
    the live CLI's default stack sampling (its STACK records and sampled calls are part of
    what the host handles)."""
    from nvse_monitor.capture.agent_host import DEFAULT_SAMPLE_BYTES

    path = cache / f"hammer-{threads}t-{seconds:g}s-s{DEFAULT_SAMPLE_BYTES}.nvmrec"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        exe = Path(td) / "hammer"
        subprocess.run(["gcc", "-O2", "-pthread", str(REPO / "tests" / "targets" / "hammer.c"),
                        "-o", str(exe)], check=True)
        target = subprocess.Popen([str(exe), "--seconds", str(seconds), "--rate", "0",
                                   "--threads", str(threads)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert target.stdout.readline().startswith("READY")
            mon = subprocess.Popen([sys.executable, "-m", "nvse_monitor", "attach",
                                    str(target.pid), "--out", str(Path(td) / "out"),
                                    "--record", str(path) + ".part",
                                    "--sample-bytes", str(DEFAULT_SAMPLE_BYTES)],
                                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   cwd=REPO)
            for line in mon.stderr:
                if "nvse-monitor: monitoring" in line:
                    break
            target.stdin.write("\n")
            target.stdin.flush()
            target.stdout.readline()  # DONE
            mon.send_signal(signal.SIGINT)  # the monitor reads the rest, ends the recording
            mon.communicate(timeout=120)
        finally:
            if target.poll() is None:
                target.stdin.write("\n")
                target.stdin.flush()
                target.wait(timeout=30)
    os.replace(str(path) + ".part", path)
    return path


def load(recording: Path):  # noqa: ANN201
    """The recording's meta, its records in one array, and a feed builder: the records in
    separate `chunk`-record Batches, as the live reader hands them on."""
    import numpy as np

    from nvse_monitor.stream.messages import Batch
    from nvse_monitor.stream.recording import open_recording

    rec = open_recording(recording)
    batches = [m for m in rec if isinstance(m, Batch)]
    recs = np.concatenate([b.records for b in batches if len(b.records)])

    def feed(chunk: int) -> list:
        return [Batch(int(r["ts_us"][-1]), batches[-1].counters, r)
                for r in (recs[i:i + chunk].copy() for i in range(0, len(recs), chunk))]

    return rec.meta, recs, feed


def _as_the_cli() -> None:
    """This process's malloc as the command line sets it (nvse_monitor/hostmem.py): without it
    glibc gives some batch sizes fresh pages every time (64K records 46 ns, 128K 78)."""
    try:
        from nvse_monitor import hostmem
    except ImportError:  # a copy from before it (--compare)
        return
    hostmem.tune()


def measure(recording: Path, runs: int, chunk: int = 1 << 16) -> dict[str, float]:
    """CPU ns per record (medians of `runs`) for this process's nvse_monitor."""
    import numpy as np

    _as_the_cli()

    from nvse_monitor.capture import ringlayout as rl
    from nvse_monitor.capture.reader import RingReader
    from nvse_monitor.outputs.pipeline import Pipeline

    meta, recs, make_feed = load(recording)
    n = len(recs)

    def engine() -> float:
        feed = make_feed(chunk)
        with tempfile.TemporaryDirectory() as d:
            p = Pipeline(meta, d, snapshot_files_every_s=0.25)
            p.start()
            t = time.process_time()
            for b in feed:
                p.feed(b)
            p.finish()
            return (time.process_time() - t) / n * 1e9

    def reader() -> float:
        slots = 1 << 19
        layout = rl.Layout(8, slots)
        buf = bytearray(layout.bytes)
        rl.init_header(buf, layout, "wait", 100)
        ring = np.frombuffer(buf, dtype=layout.slot_dtype(), count=slots,
                             offset=rl.HEADER_BYTES)
        r = RingReader(buf, layout, len(meta.hooks), lambda m: None, lambda: 0)
        step = 1 << 17
        spent = 0.0
        done = 0
        for pos in range(0, n - step + 1, step):
            i0 = pos & (slots - 1)
            ring["rec"][i0:i0 + step] = recs[pos:pos + step]
            ring["pub"][i0:i0 + step] = np.arange(pos + 1, pos + step + 1, dtype=np.uint64)
            struct.pack_into("<Q", buf, rl.OFF_HEAD, pos + step)
            t = time.process_time()
            r._poll()
            spent += time.process_time() - t
            done += step
        return spent / done * 1e9

    e = statistics.median(engine() for _ in range(runs))
    r = statistics.median(reader() for _ in range(runs))
    return {"engine": e, "reader": r, "total": e + r, "records": n}


def profile(recording: Path, chunk: int, top: int = 12) -> None:
    """Where the engine's time goes: one engine run under cProfile, the functions with the most
    time of their own (compiled kernels count in their Python callers), in ns per record."""
    import cProfile
    import pstats

    from nvse_monitor.outputs.pipeline import Pipeline

    _as_the_cli()

    meta, recs, make_feed = load(recording)
    n = len(recs)
    feed = make_feed(chunk)
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as d:
        p = Pipeline(meta, d, snapshot_files_every_s=0.25)
        p.start()
        prof.enable()
        for b in feed:
            p.feed(b)
        p.finish()
        prof.disable()
    st = pstats.Stats(prof).stats
    rows = sorted(((tt, f"{Path(fn).name}:{name}") for (fn, _, name), (_, _, tt, _, _)
                   in st.items()), reverse=True)[:top]
    print(f"{recording.name}: {n:,} records, engine + writers under cProfile (ns per record, "
          "own time)")
    for tt, name in rows:
        print(f"  {tt / n * 1e9:6.1f}  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--hammer", action="store_true", help="a live recording of hammer.c")
    src.add_argument("--recording", type=Path)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians)")
    ap.add_argument("--runs", type=int, default=3, help="runs per round")
    ap.add_argument("--chunk", type=int, default=1 << 16,
                    help="records per batch fed to the engine (default: the live reader's "
                    "largest); two sizes give the engine's fixed cost per batch")
    ap.add_argument("--compare", type=Path, help="another copy's directory (holds nvse_monitor)")
    ap.add_argument("--numpy", action="store_true",
                    help="compare with this copy's numpy paths (NVSE_MONITOR_NATIVE=0) instead")
    ap.add_argument("--profile", action="store_true",
                    help="instead: where the engine's time goes (cProfile, this copy)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: one round
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.runs, a.chunk)))
        return 0
    if a.hammer:
        path = hammer_recording(CACHE)
    elif a.recording:
        path = a.recording
    else:
        sys.path.insert(0, str(REPO / "bench"))
        from bench_replay import recording

        path, _ = recording(CACHE, False)
    if a.profile:
        profile(path, a.chunk)
        return 0
    sides = {"current": (REPO, "1")}
    if a.compare:
        sides["compare"] = (a.compare, "1")
    elif a.numpy:
        sides["compare"] = (REPO, "0")
    res: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(a.rounds):
        for name, (root, native) in sides.items():
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--runs",
                                  str(a.runs), "--chunk", str(a.chunk)],
                                 capture_output=True, text=True, check=True,
                                 env=dict(os.environ, PYTHONPATH=str(root),
                                          NVSE_MONITOR_NATIVE=native), cwd=root)
            res[name].append(json.loads(out.stdout))
            r = res[name][-1]
            print(f"round {i + 1} {name:8s} engine {r['engine']:6.1f}  reader {r['reader']:5.1f}"
                  f"  total {r['total']:6.1f} ns CPU per record")
    print(f"{path.name}: {res['current'][0]['records']:,} records; medians of {a.rounds} rounds")
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("engine", "reader", "total")}
           for k, v in res.items()}
    for k, m in med.items():
        print(f"{k:8s} engine + writers {m['engine']:6.1f}, reader {m['reader']:5.1f}, "
              f"total {m['total']:6.1f} ns CPU per record")
    if "compare" in med:
        c, b = med["current"], med["compare"]
        print("current/compare: " + ", ".join(f"{f} {c[f] / b[f]:.2f}x"
                                                for f in ("engine", "reader", "total")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
