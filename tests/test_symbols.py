"""Function names for call sites (issue 11, docs/symbols.md): a C target with named functions
that leak on purpose (tests/targets/leaky_target.c, x86_64 and -m32, built with symbols) must
be named in the leak report, leaks.csv, the largest allocations and `top`'s top functions; the
names must survive record -> replay byte-identically; with the agent gone the offset form stays
and the failure is logged. Real Frida, real processes."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import frida
import numpy as np
import pytest
from conftest import REPO, Target
from test_leaks_live import symbols

from nvse_monitor.capture.agent_host import agent_source
from nvse_monitor.capture.symbolizer import Symbolizer, agent_resolver, function_text
from nvse_monitor.engine import leaks
from nvse_monitor.outputs.files import FilePaths
from nvse_monitor.outputs.pipeline import Pipeline, replay
from nvse_monitor.stream.events import RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import (
    AgentCounters,
    Batch,
    HookInfo,
    Module,
    SessionEnd,
    SessionMeta,
    SymbolNames,
)
from nvse_monitor.stream.recording import read_recording, write_recording

PREFIX = "MemoryPoolNVSE"
LEAKERS = {"leak_one": (40, 24), "leak_two": (9, 700), "leak_big": (1, 3 << 20),
           "leak_static": (5, 32)}


def _func_of(g: leaks.LeakGroup, syms: dict[str, tuple[int, int]]) -> str | None:
    for name, (lo, size) in syms.items():
        if g.offset is not None and lo <= g.offset < lo + size:
            return name
    return None


@pytest.mark.frida
@pytest.mark.parametrize("arch", ["x64", pytest.param("ia32", marks=pytest.mark.m32)])
def test_leak_report_names_the_leaking_functions_and_replay_keeps_them(arch, targets, tmp_path,
                                                                       live_procs):
    exe = targets.build("leaky_target", arch)
    syms = symbols(exe)  # nm: offset and size of each function (the static one too)
    target = live_procs.start([exe])
    out, rec = tmp_path / "live", tmp_path / "s.nvmrec"
    mon = live_procs.attach(target, "--out", out, "--record", rec)
    target.go()
    assert target.done() == {"ok": True}
    mon.signal(signal.SIGINT)  # names resolved at stop, while the agent is still loaded
    assert mon.wait() == 0, mon.stderr
    target.finish()

    rep = leaks.read_csv(out / f"{PREFIX}_leaks.csv")
    named = {}
    for g in rep.sites:
        func = _func_of(g, syms) if g.module == exe.name else None
        if func in LEAKERS:
            lo = syms[func][0]
            # the function column: the name and the offset within it, as nm says
            assert g.function == f"{func}+0x{g.offset - lo:x}", (g, func)
            assert g.where == f"{exe.name}!{func}+0x{g.offset - lo:x}"
            named[func] = (g.allocations, g.min_size)
    assert named == LEAKERS

    log = (out / f"{PREFIX}_rpmalloc.log").read_text()
    assert re.search(rf"\[WARN\] .* Live at end from {exe.name}!leak_one\+0x[0-9a-f]+: 40 "
                     r"allocations, 960 bytes \(size 24, libc\)", log), log
    assert re.search(rf"Live at end from {exe.name}!leak_two\+0x[0-9a-f]+: 9 allocations", log)
    assert "Function names unavailable" not in log
    doc = json.loads((out / f"{PREFIX}_stats.json").read_text())
    big = doc["monitor"]["largest_allocations"][0]
    assert big["bytes"] == 3 << 20 and big["function"].startswith("leak_big+0x")
    assert big["caller"].startswith(f"{exe.name}+0x")  # the existing key stays as it was

    # The recording holds the names: two replays give the same files, with the same names.
    meta, msgs = read_recording(rec)
    names = [m for m in msgs if isinstance(m, SymbolNames)]
    assert names and not any(m.error for m in names)
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for d in (r1, r2):
        replay(rec, d, err=io.StringIO())
    for p in [*FilePaths.of(r1).all(), leaks.leaks_path(r1, PREFIX)]:
        assert p.read_bytes() == (r2 / p.name).read_bytes(), p.name
    assert (r1 / f"{PREFIX}_leaks.csv").read_text() == (out / f"{PREFIX}_leaks.csv").read_text()

    # `top --functions` on the output directory: the top functions, exact
    top = subprocess.run([sys.executable, "-m", "nvse_monitor", "top", str(r1), "--once",
                          "--functions"], capture_output=True, text=True, cwd=REPO,
                         env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert top.returncode == 0, top.stderr
    assert f"{exe.name}!leak_big" in top.stdout and f"{exe.name}!leak_one" in top.stdout
    assert "by function" in top.stdout

    # `report` from the recording shows them offline too
    html = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "report", str(rec), "-o",
                        str(html)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    page = html.read_text()
    assert "leak_one+0x" in page and f"{exe.name}!leak_big+0x" in page


def _module_base(pid: int, path: Path) -> int:
    real = str(path.resolve())
    starts = [int(line.split("-", 1)[0], 16) for line in Path(f"/proc/{pid}/maps").read_text()
              .splitlines() if line.rstrip().endswith(real)]
    assert starts, f"{real} not mapped in {pid}"
    return min(starts)


def _batch(now: int, ptr: int, size: int, caller: int) -> Batch:
    r = np.zeros(1, RECORD_DTYPE)
    r["ts_us"], r["ptr"], r["size"], r["caller"], r["kind"], r["tid"] = now, ptr, size, caller, \
        Kind.ALLOC, 7
    return Batch(now, AgentCounters(allocs=1, published=1), r)


@pytest.mark.frida
def test_agent_gone_keeps_the_offset_form_and_logs_why(targets, tmp_path):
    """The symbolizer against the real agent script in a real process: a first pass names a
    call site; the target is then killed (agent gone) and the next pass fails: logged once,
    and the site it could not name stays module+offset in the leak report."""
    exe = targets.build("leaky_target", "x64")
    syms = symbols(exe)
    target = Target([exe])
    try:
        target.wait_ready()
        base = _module_base(target.pid, exe)
        session = frida.attach(target.pid)
        script = session.create_script(agent_source())
        script.load()
        meta = SessionMeta("leaky_target", target.pid, "x64", "linux", "test",
                           hooks=[HookInfo("malloc", "libc", "alloc")],
                           modules=[Module(exe.name, base, 1 << 20, str(exe))])
        pipe = Pipeline(meta, tmp_path / "out", err=io.StringIO())
        pipe.start()
        sym = Symbolizer(agent_resolver(script), pipe.symbol_wants, pipe.feed, lambda: 0)
        one = base + syms["leak_one"][0] + 5
        two = base + syms["leak_two"][0] + 7
        pipe.feed(_batch(10, 0x1000, 24, one))
        assert sym.run_pass() == 1 and sym.error is None
        assert pipe.engine.symbols == {one: "leak_one+0x5"}
        target.kill()
        deadline = time.monotonic() + 10
        while not session.is_detached and time.monotonic() < deadline:
            time.sleep(0.05)
        pipe.feed(_batch(20, 0x2000, 700, two))
        sym.run_pass()
        assert sym.error is not None
        assert sym.run_pass() == 0  # no more passes after a failure
        pipe.feed(SessionEnd(30, "target-exited", True))
        pipe.finish()
    finally:
        target.kill()
    rep = leaks.read_csv(tmp_path / "out" / f"{PREFIX}_leaks.csv")
    where = {g.where for g in rep.sites}
    assert where == {f"{exe.name}!leak_one+0x5",
                     f"{exe.name}+0x{syms['leak_two'][0] + 7:x}"}
    log = (tmp_path / "out" / f"{PREFIX}_rpmalloc.log").read_text()
    assert log.count("Function names unavailable for 1 call site (") == 1, log
    assert "shown as module+offset" in log


def test_symbol_names_round_trip_a_recording(tmp_path):
    meta = SessionMeta("t", 1, "x64", "linux", "p")
    msgs = [SymbolNames(5, {0x401000: "main+0x10", 0x7F0000001234: "operator new(unsigned "
                            "long)+0x4"}),
            SymbolNames(6, {}, error="script is destroyed", unresolved=3),
            SessionEnd(7, "end-of-recording", True)]
    write_recording(tmp_path / "s.nvmrec", meta, msgs)
    assert read_recording(tmp_path / "s.nvmrec")[1] == msgs


def test_function_text_and_by_function():
    assert function_text("f", 0x1b) == "f+0x1b"
    assert function_text("f", None) == "f"
    assert function_text(None, 3) is None
    g = [leaks.LeakGroup("site", "m", 0x10, 2, 20, 1, 10, 10, ("libc",), 0, 0, "f+0x3"),
         leaks.LeakGroup("site", "m", 0x20, 1, 500, 1, 500, 500, ("libc",), 0, 0, "f+0x13"),
         leaks.LeakGroup("site", "m", 0x90, 4, 40, 1, 10, 10, ("libc",), 0, 0, None),
         leaks.LeakGroup("site", "n", 0x10, 1, 1, 1, 1, 1, ("libc",), 0, 0, "f+0x3")]
    assert leaks.by_function(g) == [leaks.FunctionGroup("m!f", 3, 520, 2),
                                    leaks.FunctionGroup("m+0x90", 4, 40, 1),
                                    leaks.FunctionGroup("n!f", 1, 1, 1)]


@pytest.mark.frida
def test_names_resolved_before_the_target_exits(targets, tmp_path, live_procs):
    """The target may exit at any moment: the periodic pass (every 2 s) names the sites of live
    blocks while it runs, so the leak report made after it exited has them."""
    exe = targets.build("leaky_target", "x64")
    target = live_procs.start([exe])
    out = tmp_path / "out"
    mon = live_procs.attach(target, "--out", out)
    target.go()
    assert target.done() == {"ok": True}
    time.sleep(4.5)  # two periodic passes
    target.finish()  # exits on its own: no stop(), no final pass
    assert mon.wait() == 0, mon.stderr
    assert "session ended: target-exited" in mon.stderr.lower() or \
        "target-exited" in (out / f"{PREFIX}_rpmalloc.log").read_text()
    rep = leaks.read_csv(out / f"{PREFIX}_leaks.csv")
    funcs = {g.function.split("+")[0] for g in rep.sites
             if g.module == exe.name and g.function}
    assert set(LEAKERS) <= funcs, rep.sites
