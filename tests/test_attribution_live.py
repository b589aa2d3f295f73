"""Issue 11 end to end, as a user runs it: a C target whose named functions leak directly and
through a wrapper (tests/targets/leaky_wrapped.c), `attach` with a profile naming the wrapper and
every call sampled, then `report` from the recording. The leak report must name the leaking
functions (the wrapper's caller, never the wrapper) and the report's stacks must show their
callers, in order. Real Frida, real processes, x86_64 and -m32."""

from __future__ import annotations

import html
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, wait_frida_gone

from nvse_monitor.engine import leaks

pytestmark = pytest.mark.frida

LIBC = REPO / "nvse_monitor" / "profiles" / "linux-libc.toml"


def profile(exe: Path, out_dir: Path) -> Path:
    """linux-libc plus the target's plugin_alloc as a wrapper (by export)."""
    p = out_dir / "wrapped.toml"
    p.write_text(LIBC.read_text() + f'\n[[hook]]\nname = "plugin_alloc"\nheap = "libc"\n'
                 f'role = "wrapper"\nmodule = "{exe.name}"\nexport = "plugin_alloc"\nnargs = 1\n')
    return p


def stack_lists(page: str) -> list[list[str]]:
    """The frames of every sampled stack in the report's leak table, innermost first."""
    out = []
    for li in re.findall(r"<li>\d[\d,]* sampled blocks.*?</li>", page, re.S):
        out.append([html.unescape(f) for f in re.findall(r"<code>(.*?)</code>", li)])
    return out


def in_order(frames: list[str], names: list[str]) -> bool:
    """frames hold `module!name+0x..` for each of names, in this order (others may be between)."""
    it = iter(frames)
    return all(any(re.search(rf"!{n}\+0x[0-9a-f]+$", f) for f in it) for n in names)


@pytest.mark.parametrize("arch", ["x64", pytest.param("ia32", marks=pytest.mark.m32)])
def test_leaks_named_through_a_wrapper_and_stacks_show_callers(arch, targets, tmp_path,
                                                               live_procs):
    # frame pointers for the stacks; -rdynamic: the wrapper is hooked by export
    exe = targets.build("leaky_wrapped", arch, flags=("-O1", "-fno-omit-frame-pointer",
                                                      "-rdynamic"))
    target = live_procs.start([exe])
    out, rec = tmp_path / "out", tmp_path / "s.nvmrec"
    mon = live_procs.attach(target, "--out", out, "--record", rec,
                            "--profile", profile(exe, tmp_path), "--sample-bytes", "1")
    target.go()
    assert target.done() == {"ok": True}
    mon.signal(signal.SIGINT)  # the target is alive: the final naming pass runs before unload
    assert mon.wait() == 0, mon.stderr
    wait_frida_gone(target.pid)  # the target ends only after Frida's unload (docs/agent.md)
    target.finish()

    rep = leaks.read_csv(out / "MemoryPoolNVSE_leaks.csv")
    mine = [g for g in rep.sites if g.module == exe.name]
    by_fn = {(g.function or "").split("+")[0]: (g.allocations, g.bytes) for g in mine}
    assert by_fn == {"leak_direct": (16, 16 * 64), "leak_wrapped": (12, 12 * 128)}, mine
    log = (out / "MemoryPoolNVSE_rpmalloc.log").read_text()
    assert re.search(rf"Live at end from {re.escape(exe.name)}!leak_wrapped\+0x[0-9a-f]+: "
                     r"12 allocations, 1536 bytes", log), log[-3000:]

    page_path = tmp_path / "report.html"
    r = subprocess.run(["nvse-monitor", "report", str(rec), "-o", str(page_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stacks = stack_lists(page_path.read_text())
    assert any(in_order(s, ["plugin_alloc", "leak_wrapped", "caller_wrapped", "main"])
               for s in stacks), stacks
    assert any(in_order(s, ["leak_direct", "caller_direct", "main"]) for s in stacks), stacks
