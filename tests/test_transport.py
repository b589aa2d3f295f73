"""Lossless under load (issue 13): the shared-memory ring the host reads, producers that wait
on a full ring instead of dropping, and what happens to waiting producers when the host goes.

Real processes, real Frida. Bursts run with a CPU-bound process on each core, so the host has
to compete for the CPU with the target it watches."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Monitor, read_outputs, wait_frida_gone
from test_live import (
    ARCH_PARAMS,
    EXACT_KEYS,
    assert_matches_truth,
    assert_shutdown,
    per_thread_from_records,
    read_recording,
)

from nvse_monitor.stream.messages import Batch

pytestmark = pytest.mark.frida

# 8 threads x 40 rounds x 10,000 blocks: ~1 M allocator calls per thread, 8 M in all.
BURST = ["--threads", "8", "--iters", "10000", "--rounds", "40"]


@contextlib.contextmanager
def cpu_hogs() -> Iterator[None]:
    """One CPU-bound process per core for the duration of the block."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def calls(truth: dict) -> int:
    return sum(truth["calls"].values())


def assert_lossless(out: Path, truth: dict, mon: Monitor, exe: Path) -> tuple[dict, str]:
    js, log = assert_shutdown(out)
    assert js["monitor"]["dropped_events"] == 0
    assert "Transport: shared memory" in log
    assert "Dropped" not in log
    # the leak report holds exactly the workload's own leaks (the last round's), no more
    rows = [r.split(",") for r in (out / "MemoryPoolNVSE_leaks.csv").read_text().splitlines()]
    assert rows[0][:4] == ["scope", "module", "offset", "allocations"]
    assert sum(int(r[3]) for r in rows[1:]
               if r[0] == "module" and r[1] == exe.name) == truth["current_allocations"]
    assert re.search(r"session ended: \S+, [\d,]+ alloc calls.*, 0 dropped", mon.stderr)
    return js, log


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_burst_spawn_lossless_under_cpu_load(arch, targets, tmp_path, live_procs):
    exe = targets.build("workload", arch)
    out, rec = tmp_path / "out", tmp_path / "burst.nvmrec"
    with cpu_hogs():
        mon = Monitor(["spawn", "--out", out, "--record", rec, "--", exe, *BURST],
                      stdout=subprocess.PIPE)
        live_procs.append(mon)
        stdout = mon.proc.stdout.read()  # the target's (stderr is the Monitor's thread's)
    assert mon.wait(timeout=600) == 0, mon.stderr
    truth = json.loads(next(x for x in stdout.splitlines() if x.startswith("DONE"))[4:])
    assert truth["ok"] and calls(truth) > 7_000_000
    js, _log = assert_lossless(out, truth, mon, exe)
    # Spawned, the monitor also sees the loader's thread set-up and glibc's thread teardown
    # (it frees the blocks cached per thread: untracked frees): every worker thread's blocks
    # are exactly its own truth, and the files count every recorded event (none lost).
    _meta, msgs = read_recording(rec)
    records = np.concatenate([m.records for m in msgs if isinstance(m, Batch)])
    assert len(records) == js["monitor"]["agent_counters"]["published"]
    by_tid = per_thread_from_records(records)
    for t in truth["threads"]:
        got = by_tid.pop(t["tid"])
        assert (got["allocs"], got["failures"]) == (t["allocs"], t["failures"])
        assert got["frees"] >= t["frees"]
    others = sum(v["allocs"] for v in by_tid.values())  # main thread, loader: a handful
    assert others < 100
    assert js["memory_stats"]["total_allocations"] == truth["total_allocations"] + others


def burst_attach(arch: str, targets, tmp_path: Path, live_procs, burst: list[str],  # noqa: ANN001
                 env: dict[str, str] | None = None) -> Monitor:
    exe = targets.build("workload", arch)
    target = live_procs.start([exe, "--wait", *burst])
    out = tmp_path / "out"
    # a small ring: producers must wait for the host many times over
    mon = Monitor(["attach", target.pid, "--out", out, "--ring-size", "4K"], env=env)
    live_procs.append(mon)
    mon.wait_monitoring()
    with cpu_hogs():
        target.go()
        truth = target.done(timeout=600)
    mon.signal(signal.SIGINT)
    assert mon.wait(timeout=600) == 0, mon.stderr
    wait_frida_gone(target.pid)
    assert target.finish() == {"prologue_restored": True}
    assert truth["ok"]
    js, log = assert_lossless(out, truth, mon, exe)
    # attached after the threads started: every count exact. The C library may free a few
    # blocks it allocated before the attach (a thread's TLS vector grows when Frida's
    # libraries load): untracked frees, nothing to do with the workload's blocks.
    ms = js["memory_stats"]
    assert {k: ms[k] for k in EXACT_KEYS} == {k: truth[k] for k in EXACT_KEYS}
    assert js["monitor"]["untracked_frees"] <= 8
    assert js["monitor"]["agent_counters"]["stalls"] > 0  # the ring did fill: producers waited
    assert "Full-ring policy: wait" in log
    return mon


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_burst_attach_lossless_under_cpu_load(arch, targets, tmp_path, live_procs):
    mon = burst_attach(arch, targets, tmp_path, live_procs, BURST)
    assert "host kernels" not in mon.stderr  # the compiled reader and engine ran (CI builds them)


def test_burst_attach_lossless_on_the_numpy_host_path(targets, tmp_path, live_procs):
    """The host's numpy paths (no compiled kernels in an install: NVSE_MONITOR_NATIVE=0 here)
    are as exact, and the monitor says which it runs."""
    mon = burst_attach("x64", targets, tmp_path, live_procs,
                       ["--threads", "8", "--iters", "10000", "--rounds", "10"],
                       env={"NVSE_MONITOR_NATIVE": "0"})
    assert "host kernels: numpy (NVSE_MONITOR_NATIVE=0)" in mon.stderr


def test_drop_policy_drops_and_counts(targets, tmp_path, live_procs):
    """--on-full drop keeps the old behaviour: what does not fit is dropped and counted (the
    counters' exactness under drops, against the target's own tallies, is in test_agent.py)."""
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", *BURST[:4], "--rounds", "10"])
    out = tmp_path / "out"
    # --sample-bytes 0: published + dropped counts calls only without sampled stacks' records
    mon = live_procs.attach(target, "--out", out, "--ring-size", "1K", "--on-full", "drop",
                            "--sample-bytes", "0")
    with cpu_hogs():
        target.go()
        target.done(timeout=300)
    mon.signal(signal.SIGINT)
    assert mon.wait(timeout=300) == 0, mon.stderr
    wait_frida_gone(target.pid)
    target.finish()
    js = json.loads(read_outputs(out)["json"].read_text())
    agent = js["monitor"]["agent_counters"]
    assert agent["dropped"] > 0 and agent["stalls"] == 0
    assert js["monitor"]["dropped_events"] == agent["dropped"]
    # every call is published or dropped; a realloc that moved its block publishes one record
    # more (its FREE half), which the call counts leave out
    calls = agent["allocs"] + agent["frees"] + agent["reallocs"] + agent["failures"]
    assert calls <= agent["published"] + agent["dropped"] <= calls + agent["reallocs"]
    log = read_outputs(out)["log"].read_text()
    assert "Full-ring policy: drop" in log and "Dropped" in log


# ---- producers blocked on a full ring when the host goes ----------------------------------------

BLOCKED_HOST = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import frida
    from nvse_monitor.capture.agent_host import AgentConfig, load_agent
    from nvse_monitor.capture.ringlayout import OFF_STALLS
    from nvse_monitor.capture.hookprofile import load_profile
    pid, how = int(sys.argv[1]), sys.argv[2]
    session = frida.attach(pid)
    h = load_agent(session, load_profile("linux-libc"),
                   AgentConfig(ring_slots=1024, max_wait_ms=60000), on_message=lambda m: None)
    h.reader.stop()  # the host stops reading: the ring fills and producers wait
    print("loaded", flush=True)
    sys.stdin.readline()
    stalls = h.ring.layout.ptr_size
    while int.from_bytes(h.ring.buf[OFF_STALLS:OFF_STALLS + stalls], "little") == 0:
        time.sleep(0.01)  # until a producer waits (stall_n in the header)
    print("blocked", flush=True)
    if how == "detach":
        session.detach()
        print("detached", flush=True)
    time.sleep(3600)  # SIGKILLed by the test, or waiting for it
""")


@pytest.mark.parametrize("how", ["sigkill", "detach"])
def test_host_gone_while_producers_wait(how, targets, tmp_path, live_procs):
    """The host dies (SIGKILL) or detaches while target threads wait for a slot: they are let
    go, and the target finishes its work correctly (its own checksums hold)."""
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", "--threads", "4", "--iters", "2000",
                               "--rounds", "4"])
    host = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_HOST.format(tests=str(REPO / "tests")), str(target.pid),
         how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert host.stdout.readline().strip() == "loaded"
        target.go()
        host.stdin.write("\n")
        host.stdin.flush()
        assert host.stdout.readline().strip() == "blocked"
        if how == "sigkill":
            host.send_signal(signal.SIGKILL)
        else:
            assert host.stdout.readline().strip() == "detached"
        t0 = time.monotonic()
        truth = target.done(timeout=60)
        assert time.monotonic() - t0 < 30
        assert truth["ok"]
        wait_frida_gone(target.pid)
        target.finish()
    finally:
        host.kill()
        host.wait()


# ---- the mapping ---------------------------------------------------------------------------------

def shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("nvse-monitor")}


def mapped_rings(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "nvse-monitor" in line]


def test_mapping_private_and_gone_after_session(targets, tmp_path, live_procs):
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", "--iters", "200"])
    before = shm_names()
    mon = live_procs.attach(target, "--out", tmp_path / "out")
    maps = mapped_rings(target.pid)
    assert len(maps) == 1  # the target maps the ring, a file that no longer has a name
    assert "(deleted)" in maps[0] and maps[0].split()[1].startswith("rw-s")
    assert shm_names() == before
    mon_maps = mapped_rings(mon.proc.pid)
    assert len(mon_maps) == 1 and "(deleted)" in mon_maps[0]
    target.go()
    target.done()
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    assert mapped_rings(target.pid) == []  # the agent unmapped its side
    target.finish()


def test_file_mode_0600(tmp_path):
    from nvse_monitor.capture.ringlayout import Layout
    from nvse_monitor.capture.shm import SharedRing

    ring = SharedRing(Layout(8, 1024), "wait", 1000)
    try:
        assert ring.path is not None and os.stat(ring.path).st_mode & 0o777 == 0o600
    finally:
        ring.close()
    assert not os.path.exists(ring.path)


def test_second_monitor_is_refused(targets, tmp_path, live_procs):
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", "--iters", "200"])
    first = live_procs.attach(target, "--out", tmp_path / "a")
    second = Monitor(["attach", target.pid, "--out", tmp_path / "b"])
    live_procs.append(second)
    assert second.wait() == 2
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, second.stderr
    assert f"PID {target.pid} is already monitored by another nvse-monitor" in lines[0]
    target.go()
    truth = target.done()
    first.signal(signal.SIGINT)
    assert first.wait() == 0, first.stderr
    assert_matches_truth(json.loads(read_outputs(tmp_path / "a")["json"].read_text()), truth)
    target.finish()


def test_fallback_to_messages_when_no_mapping(targets, tmp_path, live_procs):
    """Where the mapping cannot be made, records go through Frida messages, said in the log."""
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", "--iters", "1500", "--rounds", "2"])
    env_dir = tmp_path / "no-such-dir"
    mon = Monitor(["attach", target.pid, "--out", tmp_path / "out"],
                  env={"NVSE_MONITOR_SHM_DIR": str(env_dir)})
    live_procs.append(mon)
    mon.wait_monitoring()
    target.go()
    truth = target.done()
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    target.finish()
    js, log = assert_shutdown(tmp_path / "out")
    assert_matches_truth(js, truth)
    assert f"Transport: Frida messages (shared memory unavailable: {env_dir} does not exist)" \
        in log
