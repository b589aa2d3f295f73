"""Regenerates the real recordings fixtures/live-x64.nvmrec and fixtures/live-ia32.nvmrec.

Each is a `nvse-monitor spawn --record` session of tests/targets/workload.c (one thread, every
libc entry point, a few thousand events), checked against the workload's own ground truth
before it is kept. Run from the repository root:

    python tests/make_live_fixtures.py [--iters N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = ("total_allocations", "total_frees", "total_bytes_allocated", "total_bytes_freed",
        "current_allocations", "current_bytes_allocated", "allocation_failures",
        "peak_allocations", "peak_bytes_allocated")


def make(arch: str, iters: int, rounds: int, tmp: Path) -> Path:
    exe = tmp / f"workload-{arch}"
    flag = "-m32" if arch == "ia32" else "-m64"
    subprocess.run(["gcc", flag, "-O2", "-pthread", str(REPO / "tests/targets/workload.c"),
                    "-o", str(exe)], check=True)
    rec = REPO / "fixtures" / f"live-{arch}.nvmrec"
    out = tmp / f"out-{arch}"
    r = subprocess.run(
        [sys.executable, "-m", "nvse_monitor", "spawn", "--out", str(out), "--record", str(rec),
         "--", str(exe), "--iters", str(iters), "--rounds", str(rounds), "--seed", "7"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"{arch}: monitor failed ({r.returncode}):\n{r.stderr}")
    truth = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("DONE"))[4:])
    js = json.loads((out / "MemoryPoolNVSE_stats.json").read_text())
    got = {k: js["memory_stats"][k] for k in KEYS}
    want = {k: truth[k] for k in KEYS}
    if got != want or js["monitor"]["dropped_events"]:
        raise SystemExit(f"{arch}: recording does not match the ground truth:\n{got}\n{want}")
    print(f"{rec.relative_to(REPO)}: {rec.stat().st_size:,} bytes, "
          f"{truth['total_allocations'] + truth['total_frees']:,} allocations+frees, matches truth")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arch", action="append", choices=["x64", "ia32"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvse-fixtures-") as td:
        for arch in a.arch or ["x64", "ia32"]:
            make(arch, a.iters, a.rounds, Path(td))


if __name__ == "__main__":
    main()
