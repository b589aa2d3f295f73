"""A realloc that moves its block to an address another thread frees during the call, forced
(tests/targets/realloc_race.c: the program's own allocator, hooked by a profile). The realloc's
record is reserved before the call; with one record, the other thread's FREE of the new block's
address came after it, and the engine counted a replaced live block, then freed the realloc's
new block: both blocks alive at the end were missing from the live bytes and the leak report
(the Windows lane saw this race under Wine, one attach session in five). A moved realloc is now
its FREE half in that slot and a REALLOC reserved after the call (docs/agent.md "Ordering
guarantees"): counts, live bytes and the leak report exact. Real Frida, x86_64 and -m32."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import read_outputs, wait_frida_gone

from nvse_monitor.engine import leaks

pytestmark = pytest.mark.frida


def profile(exe: Path, arch: str, out_dir: Path) -> Path:
    p = out_dir / "pool.toml"
    hooks = (("rr_malloc", "alloc", "{ size = 0 }"), ("rr_free", "free", "{ ptr = 0 }"),
             ("rr_realloc", "realloc", "{ ptr = 0, size = 1 }"))
    p.write_text(f'[profile]\nname = "pool"\nplatform = "linux"\narch = ["{arch}"]\n' + "".join(
        f'[[hook]]\nname = "{n}"\nheap = "pool"\nrole = "{r}"\nmodule = "{exe.name}"\n'
        f'export = "{n}"\nargs = {a}\n' for n, r, a in hooks))
    return p


@pytest.mark.parametrize("arch", ["x64", pytest.param("ia32", marks=pytest.mark.m32)])
def test_realloc_into_an_address_freed_during_the_call(arch, targets, tmp_path, live_procs):
    exe = targets.build("realloc_race", arch, flags=("-rdynamic",))  # hooked by export
    target = live_procs.start([exe])
    out = tmp_path / "out"
    # every call sampled: a sampled realloc's stack must still reach its REALLOC record, with
    # the FREE half between them
    mon = live_procs.attach(target, "--out", out, "--profile", profile(exe, arch, tmp_path),
                            "--sample-bytes", "1")
    target.go()
    truth = target.done()
    assert truth["ok"], truth  # the program did move each realloc into the freed address
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    wait_frida_gone(target.pid)  # the target ends only after Frida's unload (docs/agent.md)
    target.finish()

    js = json.loads(read_outputs(out)["json"].read_text())
    ms, m = js["memory_stats"], js["monitor"]
    # rr_malloc a, q1, q2 + the two reallocs' new blocks; frees: q1 and q2 (other thread), a
    # (round 1's realloc moved it); realloc(NULL, 48) frees nothing
    assert (ms["total_allocations"], ms["total_frees"]) == (5, 3)
    assert (ms["current_allocations"], ms["current_bytes_allocated"]) == (2, 64 + 48)
    assert (m["replaced_live"], m["untracked_frees"], m["dropped_events"]) == (0, 0, 0)
    c = m["agent_counters"]
    assert (c["allocs"], c["frees"], c["reallocs"]) == (3, 2, 2)  # calls, not records
    assert m["heaps"]["pool"]["current_bytes"] == 112

    rep = leaks.read_csv(out / "MemoryPoolNVSE_leaks.csv")
    assert (rep.allocations, rep.bytes, rep.uncertain_allocations) == (2, 112, 0)
    # every call sampled: each realloc's stack reached its REALLOC record across its FREE half
    st = json.loads((out / "MemoryPoolNVSE_stacks.json").read_text())
    assert (st["sampled_allocations"], st["stackless_samples"], st["discarded_stacks"]) == (5, 0, 0)
    assert st["views"]["end"]["estimated_bytes"] == 112
