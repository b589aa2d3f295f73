"""How long naming 10,000 call sites takes (issue 11): the agent's `symbolize` RPC through the
host's Symbolizer, as a live session asks it (chunks of 4,000 addresses).

    python bench/bench_symbolize.py [--functions 10000] [--rounds 5] [--arch x64|ia32]

Under Wine (the Windows lane's Python, `source "$(bash tests/windows/setup.sh)"` first): build
the 32-bit PE on Linux, then run the bench in the Windows Python against it:

    python bench/bench_symbolize.py --build-pe /tmp/pe           # mingw: /tmp/pe/many.exe
    wine "$NVSE_WIN_PYTHON" bench/bench_symbolize.py --pe-exe Z:/tmp/pe/many.exe

The PE is stripped and exports its functions (as a mingw plugin DLL: names from its exports,
which Frida reads from memory). pefile gives the export RVAs.

Target: a generated C program with --functions named functions (-O1 -g, not stripped), one
address inside each (function start + 1) asked. Each round loads a fresh agent script, so the
first pass is cold (it builds the module's symbol table from its ELF symbols); a second pass
over the same addresses (a new Symbolizer: nothing cached on the host) is warm. Also reported:
10,000 addresses spread over libc (dynamic symbols only: most stay unnamed) in the same
process. Figures: medians over the rounds, ms in total and per 1,000 addresses.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import frida
import numpy as np
from benchutil import cpu_model

from nvse_monitor.capture.agent_host import agent_source
from nvse_monitor.capture.symbolizer import Symbolizer, agent_resolver


def generate(n: int, path: Path) -> None:
    """n noinline functions (each with a body of its own), called through a table."""
    lines = ["#include <stdio.h>", "#include <unistd.h>", "volatile int sink;"]
    for i in range(n):
        lines.append(f"__attribute__((noinline)) void f{i}(int x) {{ sink += x * {i + 3}; }}")
    lines.append("void (*const table[])(int) = {" + ", ".join(f"f{i}" for i in range(n)) + "};")
    lines.append("int main(void) { for (unsigned i = 0; i < sizeof table / sizeof *table; i++)"
                 " table[i](1); printf(\"ready\\n\"); fflush(stdout); getchar(); return 0; }")
    path.write_text("\n".join(lines) + "\n")


def generate_pe(n: int, out_dir: Path) -> Path:
    """The same program as a stripped 32-bit PE (mingw) exporting its n functions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "many.c"
    lines = ["#include <stdio.h>", "volatile int sink;"]
    for i in range(n):
        lines.append(f"__declspec(dllexport) __attribute__((noinline)) void f{i}(int x) "
                     f"{{ sink += x * {i + 3}; }}")
    lines.append("void (*const table[])(int) = {" + ", ".join(f"f{i}" for i in range(n)) + "};")
    lines.append("int main(void) { for (unsigned i = 0; i < sizeof table / sizeof *table; i++)"
                 " table[i](1); printf(\"ready\\n\"); fflush(stdout); getchar(); return 0; }")
    src.write_text("\n".join(lines) + "\n")
    exe = out_dir / "many.exe"
    subprocess.run(["i686-w64-mingw32-gcc", "-O1", "-s", str(src), "-o", str(exe)], check=True)
    return exe


def pe_run(exe: str, rounds: int) -> None:
    """Under Wine: attach to the PE, name one address in each exported function."""
    import pefile

    pe = pefile.PE(exe)
    rvas = [int(e.address) for e in pe.DIRECTORY_ENTRY_EXPORT.symbols]
    proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        session = frida.attach(proc.pid)
        cold, warm = [], []
        named = 0
        for _ in range(rounds):
            script = session.create_script(
                agent_source() + "\nrpc.exports.mainBase = () => Process.mainModule.base"
                ".toString();\n")
            script.load()
            base = int(script.exports_sync.main_base(), 16)
            addrs = sorted(base + r + 1 for r in rvas)
            dt, named = timed_pass(script, addrs)
            cold.append(dt)
            warm.append(timed_pass(script, addrs)[0])
            script.unload()
        session.detach()
    finally:
        proc.kill()
        proc.wait()
    n = len(rvas)
    print(f"CPU: {cpu_model()}; 32-bit PE under Wine (exports); {n} addresses, "
          f"{rounds} rounds (medians)")
    for label, xs in (("cold (symbol table built)", cold), ("warm", warm)):
        m = statistics.median(xs) * 1e3
        print(f"  {label}: {m:.1f} ms in total, {m / n * 1000:.2f} ms per 1,000 "
              f"({named} of {n} named)")


def nm_functions(exe: Path) -> dict[str, int]:
    out = subprocess.run(["nm", "--defined-only", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    return {p[2]: int(p[0], 16) for p in (ln.split() for ln in out.splitlines())
            if len(p) == 3 and p[1] in "Tt" and p[2].startswith("f") and p[2][1:].isdigit()}


def mapped_base(pid: int, name: str) -> tuple[int, int]:
    """(lowest start, highest end) of the mappings whose path ends in `name`."""
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[-1].rsplit("/", 1)[-1] == name:
            a, b = (int(x, 16) for x in parts[0].split("-"))
            spans.append((a, b))
    return min(a for a, _ in spans), max(b for _, b in spans)


def timed_pass(script: object, addrs: list[int]) -> tuple[float, int]:
    got: list = []
    sym = Symbolizer(agent_resolver(script), lambda: np.array(addrs, np.uint64), got.append,
                     lambda: 0, max_per_pass=len(addrs))
    t0 = time.perf_counter()
    sym.run_pass()
    dt = time.perf_counter() - t0
    assert sym.error is None, sym.error
    return dt, sum(len(m.names) for m in got)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--functions", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", choices=("x64", "ia32"), default="x64")
    ap.add_argument("--build-pe", type=Path, metavar="DIR",
                    help="Build the 32-bit PE (mingw) into DIR and exit.")
    ap.add_argument("--pe-exe", metavar="PATH", help="Under Wine: bench against this PE.")
    args = ap.parse_args()
    if args.build_pe is not None:
        print(generate_pe(args.functions, args.build_pe))
        return
    if args.pe_exe is not None:
        pe_run(args.pe_exe, args.rounds)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-sym-"))
    src, exe = work / "many.c", work / "many"
    generate(args.functions, src)
    subprocess.run(["gcc", "-m32" if args.arch == "ia32" else "-m64", "-O1", "-g", str(src),
                    "-o", str(exe)], check=True)
    funcs = nm_functions(exe)
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        base, _ = mapped_base(proc.pid, exe.name)
        addrs = sorted(base + off + 1 for off in funcs.values())
        lo, hi = mapped_base(proc.pid, "libc.so.6")
        rng = random.Random(1)
        libc_addrs = sorted({rng.randrange(lo, hi) for _ in range(len(addrs))})
        session = frida.attach(proc.pid)
        cold, warm, spread = [], [], []
        named = named_libc = 0
        for _ in range(args.rounds):
            script = session.create_script(agent_source())
            script.load()
            dt, named = timed_pass(script, addrs)
            cold.append(dt)
            warm.append(timed_pass(script, addrs)[0])
            dt, named_libc = timed_pass(script, libc_addrs)
            spread.append(dt)
            script.unload()
        session.detach()
    finally:
        proc.kill()
        proc.wait()
    n = len(addrs)
    print(f"CPU: {cpu_model()}; arch {args.arch}; {n} addresses, {args.rounds} rounds (medians)")
    for label, xs, k, got in (("generated target, cold (symbol table built)", cold, n, named),
                              ("generated target, warm", warm, n, named),
                              ("libc (dynamic symbols only)", spread, len(libc_addrs),
                               named_libc)):
        m = statistics.median(xs) * 1e3
        print(f"  {label}: {m:.1f} ms in total, {m / k * 1000:.2f} ms per 1,000 "
              f"({got} of {k} named)")


if __name__ == "__main__":
    main()
