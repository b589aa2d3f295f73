"""The agent on real processes: records equal the targets' own ground truth, exactly.

Targets: tests/agent_targets/*.c, compiled here for x86_64 and -m32 (skipped with the reason
when gcc -m32 cannot link). Harness: tests/agent_harness.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_harness import Monitored, as_records, build, counters_delta, m32_problem, tally

from nvse_monitor.capture.agent_host import AgentConfig
from nvse_monitor.capture.hookprofile import load_profile, parse_profile
from nvse_monitor.stream.events import Kind

pytestmark = pytest.mark.frida

ARCHES = [
    "x64",
    pytest.param("ia32", marks=pytest.mark.m32),
]
KINDS = {"A": Kind.ALLOC, "F": Kind.FREE, "R": Kind.REALLOC, "X": Kind.FAILED}


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-bin")


@pytest.fixture(scope="session")
def m32_reason() -> str | None:
    return m32_problem()


def exe(bin_dir: Path, src: str, arch: str, m32_reason: str | None, **kw) -> Path:
    if arch == "ia32" and m32_reason:
        pytest.skip(m32_reason)
    return build(src, bin_dir, arch, **kw)


def check_stream(mon: Monitored, recs: np.ndarray) -> None:
    """Transport invariants: contiguous ring positions, time never goes back, counters agree."""
    seq = recs["seq"].astype(np.int64)
    assert len(recs) == 0 or np.array_equal(seq, (seq[0] + np.arange(len(seq))) & 0xFFFFFFFF)
    assert np.all(np.diff(recs["ts_us"].astype(np.int64)) >= 0)
    batches = mon.batches()
    nows = [b.now_us for b in batches]
    assert nows == sorted(nows)
    # a batch is at most one ring's worth (shared ring) or one message (64 KiB by default)
    limit = mon.agent.reader.layout.slots if mon.agent.reader is not None else (1 << 20) // 56
    for b in batches:
        assert len(b.records) <= limit
        if len(b.records):
            assert int(b.records["ts_us"].max()) <= b.now_us
    last = batches[-1].counters
    assert last.published == len(recs)
    assert tally(recs) == counters_delta(type(last)(), last) if last.dropped == 0 else True


# ------------------------------------------------------------------ exact sequence


@pytest.mark.parametrize("arch", ARCHES)
def test_sequence_matches_ground_truth(bin_dir, m32_reason, arch):
    path = exe(bin_dir, "sequence.c", arch, m32_reason)
    with Monitored([str(path)]) as mon:
        info = mon.agent.init_result
        assert info["arch"] == arch and info["platform"] == "linux"
        # glibc: the hot path reads the thread word at a fixed offset from the thread pointer
        assert info["thread_state"].startswith("direct TLS slot"), info["thread_state"]
        tid = int(mon.ready[2])
        mon.say()
        truth = mon.read_until("done")
        final = mon.stop()
        recs = mon.records()
        rc = mon.close()
    assert rc == 0
    check_stream(mon, recs)
    assert final.dropped == 0

    # the sequence is cut out of the stream by its markers: malloc(0x7777) at both ends
    mine = recs[recs["tid"] == tid]
    marks = np.flatnonzero((mine["size"] == 0x7777) & (mine["kind"] == Kind.ALLOC))
    assert len(marks) == 2
    seq = mine[marks[0]: marks[1] + 1]
    calls = [(KINDS[k], int(p), int(o), int(s)) for k, p, o, s in truth]
    want = as_records(calls)
    assert len(want) > len(calls)  # the sequence has reallocs that move their block
    got = [(int(r["kind"]), int(r["ptr"]), int(r["old_ptr"]), int(r["size"]), int(r["flags"]))
           for r in seq]
    # FAILED records carry the requested size and the old block (realloc) but no result
    assert got == [(k, 0 if k == Kind.FAILED else p, o, s, f) for k, p, o, s, f, _ in want]

    # which hook recorded each call (memalign may share aligned_alloc's code: an alias)
    alias = {h["name"]: h["detail"].split("same code as hook ")[1].split(",")[0]
             for h in info["hooks"] if "same code as hook" in h["detail"]}
    names = [h.name for h in mon.profile.hooks]
    fns = ["malloc"] * 21 + ["calloc", "realloc", "realloc", "posix_memalign", "aligned_alloc",
                             "memalign", "malloc", "free", "malloc", "calloc", "realloc",
                             "realloc"] + ["free"] * (len(calls) - 34) + ["malloc"]
    fns = [fns[i] for *_, i in want]  # both records of a moved realloc are its hook's
    assert [names[h] for h in seq["hook"]] == [alias.get(f, f) for f in fns]

    # callers are in the target's own code; durations only for the large block
    main = next(m for m in info["modules"] if m["name"] == info["main_module"])
    assert np.all((seq["caller"] >= main["base"]) & (seq["caller"] < main["base"] + main["size"]))
    small = seq["size"] <= (1 << 20)
    assert np.all(seq["dur_us"][small] == 0)
    assert np.all(seq["flags"][seq["kind"] != Kind.FREE] == 0)


# ------------------------------------------------------------------ threads


def read_thread_truth(mon: Monitored) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
    per, total = {}, {}
    for words in mon.read_until("done"):
        vals = dict(zip(("allocs", "frees", "reallocs", "failures", "bytes_allocated"),
                        map(int, words[2:]), strict=True))
        if words[0] == "tid":
            per[int(words[1])] = vals
        else:
            total = vals
    return per, total


@dataclass
class ThreadsRun:
    before: Any   # agent counters before the workload
    after: Any    # and after it (both flushed)
    final: Any    # stop()'s counters
    per: dict[int, dict[str, int]]
    total: dict[str, int]
    recs: np.ndarray


def run_threads(mon: Monitored) -> ThreadsRun:
    """Let threads.c run its workload once, then stop and close the session."""
    before = mon.agent.flush()
    mon.say()
    per, total = read_thread_truth(mon)
    after = mon.agent.flush()
    final = mon.stop()
    recs = mon.records()
    assert mon.close() == 0
    return ThreadsRun(before, after, final, per, total, recs)


@pytest.mark.parametrize("arch,defines,transport", [
    ("x64", (), "shm"),
    pytest.param("ia32", (), "shm", marks=pytest.mark.m32),
    ("x64", ("NV_BENCH_TLS_CALLS",), "shm"),  # the fallback: thread state through gum's TLS calls
    ("x64", (), "messages"),  # the fallback transport: the agent drains and sends batches
    pytest.param("ia32", (), "messages", marks=pytest.mark.m32),
])
def test_threads_exact_no_loss(bin_dir, m32_reason, arch, defines, transport):
    path = exe(bin_dir, "threads.c", arch, m32_reason, opt="-O1")
    cfg = AgentConfig(defines=defines, transport=transport)
    with Monitored([str(path), "8", "6000"], config=cfg) as mon:
        r = run_threads(mon)
    assert mon.agent.transport_text().startswith(
        "shared memory" if transport == "shm" else "Frida messages")
    assert r.final.dropped == 0
    assert counters_delta(r.before, r.after) == r.total
    check_stream(mon, r.recs)
    # every worker's records, and nothing twice
    for tid, want in r.per.items():
        assert tally(r.recs[r.recs["tid"] == tid]) == want, f"thread {tid}"
    assert len(np.unique(r.recs["seq"])) == len(r.recs)


@pytest.mark.parametrize("transport", ["shm", "messages"])
def test_tiny_ring_waits_instead_of_dropping(bin_dir, m32_reason, transport):
    path = exe(bin_dir, "threads.c", "x64", m32_reason, opt="-O1")
    cfg = AgentConfig(ring_slots=64, drain_interval_ms=5, transport=transport)
    with Monitored([str(path), "8", "20000"], config=cfg) as mon:
        r = run_threads(mon)
    assert r.final.dropped == 0 and r.final.stalls > 0  # the producers waited, none dropped
    assert r.final.stall_max_us <= r.final.stall_us
    assert counters_delta(r.before, r.after) == r.total
    check_stream(mon, r.recs)


@pytest.mark.parametrize("transport", ["shm", "messages"])
def test_tiny_ring_overflow_keeps_counters_exact(bin_dir, m32_reason, transport):
    path = exe(bin_dir, "threads.c", "x64", m32_reason, opt="-O1")
    cfg = AgentConfig(ring_slots=64, drain_interval_ms=20, on_full="drop", transport=transport)
    with Monitored([str(path), "8", "20000"], config=cfg) as mon:
        r = run_threads(mon)
    assert r.after.dropped - r.before.dropped > 0
    assert counters_delta(r.before, r.after) == r.total  # exact despite the drops
    calls = sum(r.total[k] for k in ("allocs", "frees", "reallocs", "failures"))
    assert r.after.published + r.after.dropped >= calls
    assert r.after.published == len(r.recs)
    seq = r.recs["seq"].astype(np.int64)  # drops take no ring position: still contiguous
    assert np.array_equal(seq, seq[0] + np.arange(len(seq)))


# ------------------------------------------------------------------ hooks that cannot go in


def test_bad_hooks_reported_others_work(bin_dir, tmp_path):
    path = build("sequence.c", bin_dir, "x64")
    text = textwrap.dedent("""
        [profile]
        name = "broken"
        platform = "linux"
        arch = ["x64"]
        [[hook]]
        name = "missing"
        heap = "libc"
        role = "alloc"
        module = "libc.so.6"
        export = "no_such_allocator_xyz"
        args = { size = 0 }
        [[hook]]
        name = "header"
        heap = "libc"
        role = "alloc"
        module = "libc.so.6"
        offset = 0
        args = { size = 0 }
        [[hook]]
        name = "nowhere"
        heap = "x"
        role = "free"
        address = 0x1000
        args = { ptr = 0 }
        [[hook]]
        name = "later"
        heap = "x"
        role = "free"
        module = "libnotloaded*.so"
        export = "f"
        args = { ptr = 0 }
        [[hook]]
        name = "malloc"
        heap = "libc"
        role = "alloc"
        module = "libc.so.6"
        export = "malloc"
        args = { size = 0 }
        [[hook]]
        name = "free"
        heap = "libc"
        role = "free"
        module = "LIBC.so.*"
        export = "free"
        args = { ptr = 0 }
        """)
    profile = parse_profile(text, "broken.toml")
    with Monitored([str(path)], profile=profile) as mon:
        events = {e.name: e for e in mon.hook_events()}
        assert not events["missing"].ok and "no_such_allocator_xyz" in events["missing"].detail
        assert not events["header"].ok and "not executable" in events["header"].detail
        nowhere = events["nowhere"]
        assert not nowhere.ok and "not inside any loaded module" in nowhere.detail
        assert not events["later"].ok and events["later"].pending
        assert not any(events[n].pending for n in ("missing", "header", "nowhere", "malloc"))
        assert events["malloc"].ok and events["free"].ok  # glob, case-insensitive
        assert [h["ok"] for h in mon.agent.init_result["hooks"]] == [False] * 4 + [True] * 2
        mon.say()
        truth = mon.read_until("done")
        mon.stop()
        recs = mon.records()
        assert mon.close() == 0
    assert len(truth) > 50
    assert (recs["hook"] == 4).sum() >= 23  # the sequence's 23 malloc calls at least
    assert (recs["hook"] == 5).sum() >= 25
    assert set(np.unique(recs["hook"]).tolist()) <= {4, 5}


# ------------------------------------------------------------------ modules loaded later


@pytest.mark.parametrize("arch", ARCHES)
def test_dlopen_library_hooked_on_load(bin_dir, m32_reason, arch, tmp_path):
    lib = exe(bin_dir, "fakealloc.c", arch, m32_reason, shared=True)
    path = build("dlopen_target.c", bin_dir, arch)
    text = textwrap.dedent("""
        [profile]
        name = "fake"
        platform = "linux"
        arch = ["x64", "ia32"]
        [[hook]]
        name = "fa_malloc"
        heap = "plugin"
        role = "alloc"
        module = "libfakealloc-*.so"
        export = "fa_malloc"
        args = { size = 0 }
        [[hook]]
        name = "fa_free"
        heap = "plugin"
        role = "free"
        module = "libfakealloc-*.so"
        export = "fa_free"
        args = { ptr = 0 }
        [[hook]]
        name = "malloc"
        heap = "libc"
        role = "alloc"
        module = "libc.so.6"
        export = "malloc"
        args = { size = 0 }
        [[hook]]
        name = "free"
        heap = "libc"
        role = "free"
        module = "libc.so.6"
        export = "free"
        args = { ptr = 0 }
        """)
    profile = parse_profile(text, "fake.toml")
    with Monitored([str(path), str(lib)], profile=profile) as mon:
        assert [h["ok"] for h in mon.agent.init_result["hooks"]] == [False, False, True, True]
        mon.say()
        truth = mon.read_until("done")
        mon.agent.flush()
        adds = [e for e in mon.module_events() if e.action == "add"]
        assert any(e.module.name == lib.name for e in adds)
        oks = [e.name for e in mon.hook_events() if e.ok]
        assert "fa_malloc" in oks and "fa_free" in oks
        mon.say()
        assert mon.readline() == "closed"
        assert mon.wait_for(lambda: any(e.action == "remove" and e.module.name == lib.name
                                        for e in mon.module_events()))
        mon.say()
        assert mon.readline() == "bye"
        final = mon.stop()
        recs = mon.records()
        assert mon.close() == 0
    assert final.dropped == 0
    names = [h.name for h in profile.hooks]
    want = [(KINDS[k], int(p), int(s), fn) for k, p, s, fn in truth]
    # fa_malloc calls libc malloc inside: only the outer call is recorded (re-entrancy guard)
    got = [(int(r["kind"]), int(r["ptr"]), int(r["size"]), names[r["hook"]]) for r in recs
           if r["ptr"] in {p for _, p, _, _ in want}]
    assert got[:len(want)] == want  # (later mallocs may reuse the same blocks)
    # after dlclose the library's hooks are gone, libc's still record
    tail = recs[recs["size"] >= 1000]
    assert sum(1 for r in tail if names[r["hook"]] == "malloc" and 1000 <= r["size"] < 1005) == 5


# ------------------------------------------------------------------ stop, detach, host death


def read_code(pid: int, address: int, n: int = 16) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(address)
        return f.read(n)


def file_code(pid: int, address: int, n: int = 16) -> bytes:
    """The bytes the file mapped at `address` holds on disk (code as it was before hooking)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                with open(parts[5], "rb") as lib:
                    lib.seek(address - start + int(parts[2], 16))
                    return lib.read(n)
    raise AssertionError(f"{address:#x} is not mapped from a file")


def test_stop_reverts_hooks_target_keeps_running(bin_dir):
    path = build("threads.c", bin_dir, "x64", opt="-O1")
    with Monitored([str(path), "4", "40000000"]) as mon:  # seconds of work: stop lands mid-run
        addr = libc_malloc_address(mon)
        original = file_code(mon.pid, addr)
        patched = read_code(mon.pid, addr)
        mon.say()  # the workers hammer malloc/free while we stop and unload
        time.sleep(0.1)
        final = mon.stop()
        restored = read_code(mon.pid, addr)
        mon.agent.unload()
        per, total = read_thread_truth(mon)  # the workers finish their work unharmed
        assert len(mon.records()) == final.published  # nothing after the final drain
        assert mon.close() == 0
    assert patched != original
    assert restored == original
    # Stopped mid-run and the target went on (on a busy 2-core machine the RPC can be slow
    # enough for the workers to finish first: then the checks above still hold).
    assert 0 < final.allocs <= total["allocs"]


def libc_exports(pid: int, names: list[str]) -> dict[str, int]:
    """Addresses of libc.so.6 exports in a process, from /proc maps and nm (no Frida)."""
    with open(f"/proc/{pid}/maps") as f:
        rows = [line.split() for line in f if line.rstrip().endswith("/libc.so.6")]
    path = rows[0][5]
    base = min(int(r[0].split("-")[0], 16) for r in rows if int(r[2], 16) == 0)
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, int] = {}
    for w in map(str.split, out.splitlines()):
        if len(w) == 3 and w[2].split("@")[0] in names and w[1] in "TtWi":
            found.setdefault(w[2].split("@")[0], base + int(w[0], 16))
    assert set(found) == set(names), found
    return found


def malloc_address(pid: int) -> int:
    """libc's malloc in a process (no Frida)."""
    return libc_exports(pid, ["malloc"])["malloc"]


def libc_malloc_address(mon: Monitored) -> int:
    detail = next(e.detail for e in mon.hook_events() if e.name == "malloc" and e.ok)
    return int(detail.split()[0], 16)


HOST_SCRIPT = """
import sys, time, frida
sys.path.insert(0, {tests!r})
from nvse_monitor.capture.agent_host import load_agent
from nvse_monitor.capture.hookprofile import load_profile
s = frida.attach({pid})
h = load_agent(s, load_profile("linux-libc"), on_message=lambda m: None)
print("loaded", flush=True)
time.sleep(60)
"""


def test_host_death_unloads_agent(bin_dir):
    path = build("threads.c", bin_dir, "x64", opt="-O1")
    target = subprocess.Popen([str(path), "4", "100000"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        target.stdout.readline()
        addr = malloc_address(target.pid)
        original = read_code(target.pid, addr)
        assert original == file_code(target.pid, addr)
        host = subprocess.Popen(
            [sys.executable, "-c", HOST_SCRIPT.format(tests=str(Path(__file__).parent),
                                                      pid=target.pid)],
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert host.stdout.readline().strip() == b"loaded"
        assert read_code(target.pid, addr) != original  # hooked
        target.stdin.write(b"go\n")
        target.stdin.flush()
        os.kill(host.pid, signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 10
        while read_code(target.pid, addr) != original and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_code(target.pid, addr) == original  # Frida unloaded the agent
        lines = []
        while (line := target.stdout.readline().decode().strip()) != "done":
            lines.append(line)
        assert len(lines) == 5  # 4 workers + total: the target finished its work
        target.stdin.write(b"end\n")
        target.stdin.close()
        assert target.wait(timeout=20) == 0
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def test_spawned_process_recorded_from_first_call(bin_dir):
    import frida

    from nvse_monitor.capture.agent_host import load_agent

    path = build("sequence.c", bin_dir, "x64")
    device = frida.get_local_device()
    pid = device.spawn([str(path)], stdio="pipe")
    msgs: list = []
    out: list[bytes] = []
    device.on("output", lambda p, fd, data: out.append(data))
    session = device.attach(pid)
    handle = load_agent(session, load_profile("linux-libc"), on_message=msgs.append)
    try:
        # every libc hook (the optional libstdc++ wrappers wait for a C++ library)
        assert all(h["ok"] for h in handle.init_result["hooks"] if h["index"] < 9)
        device.resume(pid)
        deadline = time.monotonic() + 10
        while b"ready" not in b"".join(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        device.input(pid, b"go\n")
        while b"done" not in b"".join(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        final = handle.stop()
        lines = b"".join(out).decode().splitlines()
        truth = [ln.split() for ln in lines[1:lines.index("done")]]
        recs = np.concatenate([m.records for m in msgs if hasattr(m, "records")])
        assert final.dropped == 0 and final.published == len(recs)
        marks = np.flatnonzero((recs["size"] == 0x7777) & (recs["kind"] == Kind.ALLOC))
        seq = recs[marks[0]: marks[-1] + 1]
        calls = [(KINDS[k], int(p), int(o), int(s)) for k, p, o, s in truth]
        assert [(int(r["kind"]), int(r["ptr"])) for r in seq] == \
            [(k, 0 if k == Kind.FAILED else p) for k, p, *_ in as_records(calls)]
        device.input(pid, b"end\n")
    finally:
        handle.unload()
        # the target may have exited already: nothing left to detach from or kill
        with contextlib.suppress(frida.InvalidOperationError, frida.ProcessNotFoundError,
                                 frida.NotSupportedError):
            session.detach()
        with contextlib.suppress(frida.InvalidOperationError, frida.ProcessNotFoundError,
                                 frida.NotSupportedError):
            device.kill(pid)


# ------------------------------------------------------------------ Frida's threads started late


def test_thread_cloaked_after_init_not_recorded(bin_dir, m32_reason):
    """A thread Frida starts after init (cloaked, like a GLib worker doing iconv) is not the
    target's: its records are dropped at the drain, the counters leave it out, seq stays
    contiguous. Simulated by cloaking one of the target's idle workers after init."""
    path = exe(bin_dir, "threads.c", "x64", m32_reason, opt="-O1")
    with Monitored([str(path), "3", "3000"]) as mon:
        frida_tids = set(mon.agent.init_result["ignored_tids"]) | {mon.agent.init_result["js_tid"]}
        workers = sorted(int(t) for t in os.listdir(f"/proc/{mon.pid}/task")
                         if int(t) != mon.pid and int(t) not in frida_tids)
        assert len(workers) == 3, workers
        hidden = workers[0]
        mon.agent.script.exports_sync.cloak_thread(hidden)
        r = run_threads(mon)
    assert hidden in r.per and r.per[hidden]["allocs"] > 0
    assert not np.any(r.recs["tid"] == hidden)
    assert hidden in mon.agent.late_frida_tids
    want = {k: sum(r.per[t][k] for t in r.per if t != hidden) for k in r.per[hidden]}
    assert counters_delta(r.before, r.after) == want
    check_stream(mon, r.recs)
    for tid in r.per:
        if tid != hidden:
            assert tally(r.recs[r.recs["tid"] == tid]) == r.per[tid], f"thread {tid}"


# ------------------------------------------------------------------ the compiled hot path


@pytest.mark.parametrize("arch", ARCHES)
def test_code_references_stay_in_module(bin_dir, m32_reason, arch):
    """Every absolute or RIP-relative memory operand of the compiled C points into the CModule's
    own mapping or our allocations. TinyCC puts floating-point literals where Frida 17 does not
    map them: nv_drain once read `1.0` from past the module and faulted when that memory went."""
    path = exe(bin_dir, "sequence.c", arch, m32_reason)
    with Monitored([str(path)]) as mon:
        refs = mon.agent.script.exports_sync.foreign_code_refs()
        mon.say()
        mon.read_until("done")
        mon.stop()
        assert mon.close() == 0
    assert refs["instructions"] > 1000  # the sweep covered the code
    assert refs["foreign"] == []
