"""Regenerates the real recordings fixtures/live-x64.nvmrec and fixtures/live-ia32.nvmrec
(and their targets' ground truth, fixtures/live-*.truth.json).

Each is an `nvse-monitor attach --record` session of tests/targets/workload.c (one thread,
every libc entry point, blocks allocated before the attach and freed after it, a few thousand
events), checked against the workload's own ground truth before it is kept. Attach mode, so the
workload runs entirely while monitored and stopped with SIGINT after it (SessionEnd
"interrupted"). Run from the repository root:

    python tests/make_live_fixtures.py [--iters N] [--rounds R] [--arch x64 --arch ia32]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = ("total_allocations", "total_frees", "total_bytes_allocated", "total_bytes_freed",
        "current_allocations", "current_bytes_allocated", "allocation_failures",
        "peak_allocations", "peak_bytes_allocated")


def make(arch: str, iters: int, rounds: int, pre: int, tmp: Path) -> Path:
    exe = tmp / f"workload-{arch}"
    flag = "-m32" if arch == "ia32" else "-m64"
    subprocess.run(["gcc", flag, "-O2", "-pthread", str(REPO / "tests/targets/workload.c"),
                    "-o", str(exe)], check=True)
    rec = REPO / "fixtures" / f"live-{arch}.nvmrec"
    out = tmp / f"out-{arch}"
    target = subprocess.Popen(
        [str(exe), "--wait", "--iters", str(iters), "--rounds", str(rounds), "--pre", str(pre),
         "--seed", "7"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert target.stdout.readline().startswith("READY")
        mon = subprocess.Popen(
            [sys.executable, "-m", "nvse_monitor", "attach", str(target.pid), "--out", str(out),
             "--record", str(rec)],
            stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        while "nvse-monitor: monitoring" not in (line := mon.stderr.readline()):
            if not line:
                raise SystemExit(f"{arch}: monitor did not start")
        target.stdin.write("\n")
        target.stdin.flush()
        truth = json.loads(target.stdout.readline().split("DONE", 1)[1])
        mon.send_signal(signal.SIGINT)
        if mon.wait(timeout=60) != 0:
            raise SystemExit(f"{arch}: monitor failed:\n{mon.stderr.read()}")
        target.stdin.write("\n")
        target.stdin.flush()
        target.wait(timeout=30)
    finally:
        if target.poll() is None:
            target.kill()
    js = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
    got = {k: js["memory_stats"][k] for k in KEYS}
    got["untracked_frees"] = js["monitor"]["untracked_frees"]
    want = {k: truth[k] for k in (*KEYS, "untracked_frees")}
    if got != want or js["monitor"]["dropped_events"]:
        rec.unlink()
        raise SystemExit(f"{arch}: recording does not match the ground truth:\n{got}\n{want}")
    # The target's own ground truth, next to the recording: tests replay the fixture against it.
    truth_path = rec.with_suffix(".truth.json")
    truth_path.write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    print(f"{rec.relative_to(REPO)}: {rec.stat().st_size:,} bytes, "
          f"{truth['total_allocations'] + truth['total_frees']:,} allocations+frees, "
          f"matches the target's ground truth")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pre", type=int, default=25, help="blocks allocated before the attach")
    ap.add_argument("--arch", action="append", choices=["x64", "ia32"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvse-fixtures-") as td:
        for arch in a.arch or ["x64", "ia32"]:
            make(arch, a.iters, a.rounds, a.pre, Path(td))


if __name__ == "__main__":
    main()
