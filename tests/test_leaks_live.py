"""Leak report of a real session: tests/targets/leaky.c leaks known amounts from known call
sites (two functions of the program, one of a dlopen'd .so); the leaks CSV must show exactly
those counts and bytes, at offsets inside those functions (symbols from `nm`)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from nvse_monitor.engine import leaks

pytestmark = pytest.mark.frida


def symbols(path: Path, dynamic: bool = False) -> dict[str, tuple[int, int]]:
    """name -> (offset from the module base, size) of the defined functions (nm -S)."""
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    args = ["nm", "-S", "--defined-only"] + (["-D"] if dynamic else []) + [str(path)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "Tt":
            syms[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return syms


@pytest.mark.parametrize("arch", ["x64", pytest.param("ia32", marks=pytest.mark.m32)])
def test_leaks_by_module_and_call_site(arch, targets, tmp_path, live_procs):
    exe = targets.build("leaky", arch)
    plugin = targets.build("leaky_plugin", arch, shared=True)
    target = live_procs.start([exe, plugin])
    out = tmp_path / "out"
    mon = live_procs.attach(target, "--out", out)
    target.go()
    assert target.done() == {"ok": True}
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    target.finish()

    rep = leaks.read_csv(out / "MemoryPoolNVSE_leaks.csv")
    mods = {g.module: g for g in rep.modules}
    assert (mods[exe.name].allocations, mods[exe.name].bytes, mods[exe.name].sites) == \
        (100 + 37 + 11, 100 * 48 + 37 * 1000 + 11 * 100, 3)
    assert (mods[plugin.name].allocations, mods[plugin.name].bytes,
            mods[plugin.name].sites) == (23, 23 * 333, 1)

    def site_in(module: str, func: tuple[int, int]) -> list[tuple[int, int, int]]:
        lo, size = func
        return sorted((g.allocations, g.bytes, g.min_size) for g in rep.sites
                      if g.module == module and lo <= g.offset < lo + size)

    exe_syms, plug_syms = symbols(exe), symbols(plugin, dynamic=True)
    assert site_in(exe.name, exe_syms["leak_a"]) == [(100, 4800, 48)]
    assert site_in(exe.name, exe_syms["leak_b"]) == [(11, 1100, 100), (37, 37000, 1000)]
    assert site_in(plugin.name, plug_syms["plugin_leak"]) == [(23, 7659, 333)]
    assert site_in(exe.name, exe_syms["churn"]) == []  # freed everything

    log = (out / "MemoryPoolNVSE_rpmalloc.log").read_text()
    assert f"[WARN] [TID:{target.pid}] Live at end in {exe.name}: 148 allocations, 42900 bytes " \
        "from 3 call sites" in log
    assert f"Live at end in {plugin.name}: 23 allocations, 7659 bytes from 1 call site" in log
    # the top call sites too, named module!function+0xoff (issue 11: the agent's ELF symbols),
    # the offset within the function agreeing with nm's
    for func, syms, name, line in [
            ("leak_b", exe_syms, exe.name, "37 allocations, 37000 bytes (size 1000, libc)"),
            ("leak_a", exe_syms, exe.name, "100 allocations, 4800 bytes (size 48, libc)"),
            ("plugin_leak", plug_syms, plugin.name, "23 allocations, 7659 bytes (size 333, libc)")]:
        m = re.search(rf"\[WARN\] \[TID:{target.pid}\] Live at end from {re.escape(name)}"
                      rf"!{func}\+0x([0-9a-f]+): {re.escape(line)}", log)
        assert m, (func, line)
        lo, size = syms[func]
        assert 0 < int(m.group(1), 16) < size
    for g in rep.sites:  # the CSV's function column: the same names and offsets
        for func, syms, name in [("leak_a", exe_syms, exe.name), ("leak_b", exe_syms, exe.name),
                                 ("plugin_leak", plug_syms, plugin.name)]:
            lo, size = syms[func]
            if g.module == name and lo <= g.offset < lo + size:
                assert g.function == f"{func}+0x{g.offset - lo:x}"
