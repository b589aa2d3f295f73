"""Faults injected into real live sessions (issue 5): the target killed or crashing, the monitor
killed, the agent's ring overflowing, the disk filling up mid-run, hooks that cannot go in or
whose entry point someone else hooked first, and no listening socket. Real Frida, real C targets
(tests/targets/*.c through conftest.py) printing their own ground truth.

Already covered elsewhere and not repeated here: SIGKILL / crash end reasons (test_live.py
test_target_killed_mid_run, test_target_crash_is_reported), SIGINT/SIGTERM of the monitor
(test_monitor_interrupted_target_finishes), the agent alone under overflow and bad hooks
(test_agent.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Monitor, read_outputs, tmpfs, unmonitored_truth
from test_live import EXACT_KEYS, assert_shutdown

from nvse_monitor.stream.events import Kind

pytestmark = pytest.mark.frida


def recorded_records(rec: Path) -> tuple[np.ndarray, list]:
    from nvse_monitor.stream.messages import Batch
    from nvse_monitor.stream.recording import open_recording

    with open_recording(rec) as r:
        msgs = list(r)
    batches = [m for m in msgs if isinstance(m, Batch)]
    recs = np.concatenate([b.records for b in batches]) if batches else np.zeros(0)
    return recs, batches


def engine_totals(records: np.ndarray) -> dict[str, int]:
    """total_allocations / total_frees the engine must report for these records (a realloc is a
    free of the old block and an allocation of the new one)."""
    kind = records["kind"]
    realloc = kind == Kind.REALLOC
    return {
        "total_allocations": int(np.sum(kind == Kind.ALLOC)
                                 + np.sum(realloc & (records["ptr"] != 0))),
        "total_frees": int(np.sum(kind == Kind.FREE)
                           + np.sum(realloc & (records["old_ptr"] != 0))),
        "allocation_failures": int(np.sum(kind == Kind.FAILED)),
    }


def wait_until(cond, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- the target dies: every event that reached the host is counted ------------------------------


@pytest.mark.parametrize("how", ["sigkill", "crash"])
def test_target_dies_every_received_event_counted(how, targets, tmp_path, live_procs):
    exe = targets.build("workload", "x64")
    out, rec = tmp_path / "out", tmp_path / "s.nvmrec"
    if how == "sigkill":
        target = live_procs.start([exe, "--wait", "--iters", "300", "--rounds", "1000000",
                                   "--pause-us", "500"])
        mon = live_procs.attach(target, "--out", out, "--record", rec)
        target.go()
        time.sleep(0.8)
        target.proc.send_signal(signal.SIGKILL)
        target.proc.wait(timeout=10)
    else:
        work = ["--iters", "300", "--rounds", "20", "--pause-us", "5000", "--crash"]
        mon = Monitor(["spawn", "--out", out, "--record", rec, "--", exe, *work],
                      stdout=subprocess.PIPE)
        live_procs.append(mon)
        mon.proc.communicate(timeout=90)
    assert mon.wait() == 0, mon.stderr
    js, log = assert_shutdown(out)
    records, batches = recorded_records(rec)
    assert len(records) > 1000
    # Every record that reached the host is in the files, exactly; none was lost in transit
    # (the ring positions the host got are one contiguous run) and none was dropped.
    assert {k: js["memory_stats"][k] for k in engine_totals(records)} == engine_totals(records)
    seq = records["seq"].astype(np.int64)
    assert np.array_equal(seq, seq[0] + np.arange(len(seq)))
    assert js["monitor"]["dropped_events"] == 0
    assert batches[-1].counters.published >= len(records)
    # The detach reason is logged as CRITICAL, the session ends unhealthy with SHUTDOWN.
    crit = [x for x in log.splitlines() if "[CRITICAL]" in x]
    assert len(crit) == 1 and "Target lost unexpectedly: process-terminated" in crit[0]
    if how == "crash":
        assert "crashed: access-violation" in crit[0]
    assert js["plugin"]["is_healthy"] is False and js["health"]["critical_count"] == 1
    assert log.rstrip().endswith("monitoring stopped ===")


# ---- the monitor is killed: the target is unharmed ----------------------------------------------


def test_monitor_sigkill_target_finishes_unharmed(targets, tmp_path, live_procs):
    from test_agent import file_code, malloc_address, read_code

    exe = targets.build("workload", "x64")
    work = ["--iters", "400", "--rounds", "60"]
    ref_truth = unmonitored_truth(exe, work)
    target = live_procs.start([exe, "--wait", *work, "--pause-us", "20000"])  # ~1.2 s of work
    addr = malloc_address(target.pid)
    original = file_code(target.pid, addr)
    out = tmp_path / "out"
    mon = live_procs.attach(target, "--out", out)
    assert read_code(target.pid, addr) != original  # hooked
    target.go()
    wait_until(lambda: (read_json(read_outputs(out)["json"]) or {}).get("memory_stats", {})
               .get("total_allocations"), 10, "a live JSON update")
    mon.proc.send_signal(signal.SIGKILL)
    mon.proc.wait(timeout=10)
    # Frida's agent notices the host is gone and removes the hooks by itself.
    wait_until(lambda: read_code(target.pid, addr) == original, 15, "malloc unhooked")
    truth = target.done()
    assert truth["ok"] and truth["checksum"] == ref_truth["checksum"]
    assert {k: truth[k] for k in EXACT_KEYS} == {k: ref_truth[k] for k in EXACT_KEYS}
    assert target.finish() == {"prologue_restored": True}
    # No final update is possible; what is there is whole (atomic rewrites) and still says
    # running (the workload's deliberate allocation failures make it DEGRADED), not SHUTDOWN.
    js = read_json(read_outputs(out)["json"])
    assert js is not None and js["plugin"]["status"] in ("active", "degraded")
    assert "Status: SHUTDOWN" not in read_outputs(out)["status"].read_text()


# ---- ring overflow: drops reported, exact counters still exact ----------------------------------


def test_tiny_ring_overflow_reported_and_counters_exact(targets, tmp_path, live_procs):
    # as fast as it can
    target = live_procs.start([targets.build("hammer", "x64"), "--seconds", "1.5"])
    out = tmp_path / "out"
    status = read_outputs(out)["status"]
    # --sample-bytes 0: published + dropped counts calls only without sampled stacks' records
    mon = live_procs.attach(target, "--out", out, "--ring-size", "1024", "--on-full", "drop",
                            "--sample-bytes", "0")
    target.go()
    seen_degraded = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not seen_degraded:
        with contextlib.suppress(OSError):
            seen_degraded = "Status: DEGRADED" in status.read_text()
        time.sleep(0.02)
    truth = target.done()
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    target.finish()
    js, log = assert_shutdown(out)
    ac = js["monitor"]["agent_counters"]
    # hammer: every event is a malloc or a free of a malloc'd block, half and half
    assert ac["allocs"] == ac["frees"] == truth["events"] // 2
    assert ac["dropped"] > 0 and js["monitor"]["dropped_events"] == ac["dropped"]
    assert ac["published"] + ac["dropped"] == truth["events"]
    ms = js["memory_stats"]
    # the rest dropped (an address allocated again while live, its free dropped, counts as
    # a free of the old block too)
    assert ms["total_allocations"] + ms["total_frees"] - js["monitor"]["replaced_live"] \
        <= ac["published"]
    assert ms["total_allocations"] < ac["allocs"]
    assert seen_degraded, "the status file never said DEGRADED while dropping"
    assert "Status: ACTIVE -> DEGRADED (dropped events)" in log
    assert f"{ac['dropped']} dropped so far" in log
    assert f"{ac['dropped']:,} dropped" in mon.stderr


# ---- the disk fills up mid-run ------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "tmpfs", "size=1m") as mnt:
        yield mnt


def fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_disk_full_mid_run_retried_and_recovered(small_tmpfs, targets, tmp_path, live_procs):
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", "--iters", "400", "--rounds", "300",
                               "--pause-us", "10000"])
    out = small_tmpfs / "out"
    files = read_outputs(out)
    mon = live_procs.attach(target, "--out", out)
    target.go()
    wait_until(lambda: read_json(files["json"]), 15, "the first JSON update")
    filler = small_tmpfs / "filler"
    fill(filler)
    line = mon.wait_for("nvse-monitor: cannot write ", 20)
    assert line.endswith(": No space left on device (will retry)") and str(out) in line
    time.sleep(0.5)  # several more updates fail meanwhile: reported once, monitoring goes on
    assert mon.proc.poll() is None and target.proc.poll() is None
    filler.unlink()
    mon.wait_for("works again", 20)
    truth = target.done()
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    target.finish()
    js, log = assert_shutdown(out)
    # Nothing was lost: the counts are exact and every kept log line / CSV row was written.
    assert {k: js["memory_stats"][k] for k in EXACT_KEYS} == {k: truth[k] for k in EXACT_KEYS}
    warn = [x for x in log.splitlines() if "[WARN]" in x and "Failed to write" in x]
    assert warn and all(x.endswith(": No space left on device") for x in warn)
    assert any(files["json"].name in x for x in warn)  # the JSON's rewrite failed at least
    assert "lines were lost" not in log
    rows = files["csv"].read_text().splitlines()
    assert rows[0].startswith("timestamp,") and len(rows) > 10
    stamps = [int(r.split(",")[0]) for r in rows[1:]]
    assert stamps == sorted(stamps) and all(len(r.split(",")) == 5 for r in rows[1:])
    assert not list(out.glob(".*.tmp"))
    # each failing file said so once on stderr, and once that it works again
    fails = [x for x in mon.stderr.splitlines() if "cannot write" in x]
    assert len(fails) == len({x.split("cannot write ")[1].split(":")[0] for x in fails})


# ---- hooks that cannot be installed, and an entry point someone else hooked first ---------------


def profile_with_bad_hooks(tmp_path: Path) -> Path:
    libc = (REPO / "nvse_monitor" / "profiles" / "linux-libc.toml").read_text()
    libc = libc.split("# ------------------------------------------------------------"
                      "---- libstdc++")[0]  # its 9 libc hooks, without the C++ wrappers
    text = libc.replace('name = "linux-libc"', 'name = "libc-plus-bad"') + """
[[hook]]
name = "no_such_export"
heap = "libc"
role = "alloc"
module = "libc.so.6"
export = "nvse_no_such_allocator"
args = { size = 0 }

[[hook]]
name = "outside_any_module"
heap = "other"
role = "free"
address = 0x1000
args = { ptr = 0 }
"""
    path = tmp_path / "bad-hooks.toml"
    path.write_text(text)
    return path


def test_failed_hooks_named_others_exact(targets, tmp_path, live_procs):
    exe = targets.build("workload", "x64")
    target = live_procs.start([exe, "--wait", "--iters", "600", "--rounds", "3"])
    out = tmp_path / "out"
    mon = live_procs.attach(target, "--out", out, "--profile",
              profile_with_bad_hooks(tmp_path))
    start = mon.wait_monitoring()
    assert "9/11 hooks" in start
    target.go()
    truth = target.done()
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    assert target.finish() == {"prologue_restored": True}
    js, log = assert_shutdown(out)
    assert {k: js["memory_stats"][k] for k in EXACT_KEYS} == {k: truth[k] for k in EXACT_KEYS}
    failed = {h["name"]: h["detail"] for h in js["monitor"]["hooks_failed"]}
    assert set(failed) == {"no_such_export", "outside_any_module"}
    assert "nvse_no_such_allocator" in failed["no_such_export"]
    assert "not inside any loaded module" in failed["outside_any_module"]
    assert "Hook failed: no_such_export" in log and "Hook failed: outside_any_module" in log
    assert "Hooks installed: 9 of 11" in log
    assert "Status: INITIALIZING -> DEGRADED (hooks installed)" in log
    assert {"hook outside_any_module failed", "hook no_such_export failed"} <= set(
        js["monitor"]["degradation_causes"])
    assert js["health"]["warning_count"] >= 2


PREHOOK_JS = """
const f = Module.getGlobalExportByName('free');
const orig = new NativeFunction(f, 'void', ['pointer']);
let n = 0;
Interceptor.replace(f, new NativeCallback(p => { if (!p.isNull()) n++; orig(p); },
                                          'void', ['pointer']));
rpc.exports.count = () => n;
"""


def test_entry_point_already_hooked_by_another_tool(targets, tmp_path, live_procs):
    """Another Frida-based tool replaced free() before we attach: both hooks chain, both see
    every call, and our counts stay exact."""
    import frida

    hammer = targets.build("hammer", "x64")
    target = live_procs.start([hammer, "--seconds", "1", "--rate", "400000"])
    other = frida.attach(target.pid)
    script = other.create_script(PREHOOK_JS, name="someone-else")
    script.load()
    try:
        out = tmp_path / "out"
        mon = live_procs.attach(target, "--out", out)
        assert "9/9 hooks" in mon.wait_monitoring()
        before = script.exports_sync.count()
        target.go()
        truth = target.done()
        mon.signal(signal.SIGINT)
        assert mon.wait() == 0, mon.stderr
        theirs = script.exports_sync.count() - before
        target.go()  # free() runs through the other tool's hook after we left: still works
        time.sleep(0.2)
        target.proc.wait(timeout=10)
        assert target.proc.returncode == 0
    finally:
        with contextlib.suppress(frida.InvalidOperationError):
            other.detach()
    js, log = assert_shutdown(out)
    ac = js["monitor"]["agent_counters"]
    assert ac["allocs"] == ac["frees"] == truth["events"] // 2 and ac["dropped"] == 0
    # the other tool saw every free too (and a few from threads of its own / of Frida)
    assert truth["events"] // 2 <= theirs < truth["events"] // 2 + 1000
    assert "Hook installed: free" in log and js["monitor"]["hooks_failed"] == []


# ---- nothing listens on a network port ----------------------------------------------------------


def listening_inodes() -> dict[int, str]:
    """Socket inodes in LISTEN state (TCP) or bound (UDP), all namespaces' tables we can see."""
    found: dict[int, str] = {}
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if name.startswith("tcp") and f[3] != "0A":
                continue
            found[int(f[9])] = f"{name} {f[1]}"
    return found


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for p in pids:
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        pids.extend(int(k) for k in kids)
    return pids


def test_live_session_opens_no_listening_socket(targets, tmp_path, live_procs):
    hammer = targets.build("hammer", "x64")
    target = live_procs.start([hammer, "--seconds", "3", "--rate", "100000"])
    target.go()
    mon = live_procs.attach(target, "--out", tmp_path, "--duration", "2")
    time.sleep(0.5)
    listening = listening_inodes()
    ours = {i: listening[i] for pid in process_tree(mon.proc.pid) + [target.pid]
            for i in socket_inodes(pid) if i in listening}
    assert mon.proc.poll() is None and ours == {}
    assert mon.wait() == 0, mon.stderr


def test_metrics_port_when_asked_binds_localhost(targets, tmp_path, live_procs):
    hammer = targets.build("hammer", "x64")
    target = live_procs.start([hammer, "--seconds", "3", "--rate", "100000"])
    target.go()
    mon = live_procs.attach(target, "--out", tmp_path, "--duration", "2",
              "--metrics-port", "0")
    listening = listening_inodes()
    ours = [listening[i] for i in socket_inodes(mon.proc.pid) if i in listening]
    assert len(ours) == 1 and ours[0].startswith("tcp ")
    assert ours[0].split()[1].startswith("0100007F:")  # 127.0.0.1
    assert mon.wait() == 0, mon.stderr


# ---- the agent hooks only what the profile names ------------------------------------------------


def test_only_the_named_entry_points_are_touched(targets, tmp_path, live_procs):
    """A profile naming only malloc: malloc's code is patched, free/calloc/realloc are byte for
    byte what libc.so.6 holds on disk while the session runs."""
    from test_agent import file_code, libc_exports, read_code

    libc = (REPO / "nvse_monitor" / "profiles" / "linux-libc.toml").read_text()
    only_malloc = libc[: libc.index('[[hook]]\nname = "free"')].replace(
        'name = "linux-libc"', 'name = "malloc-only"')
    prof = tmp_path / "malloc-only.toml"
    prof.write_text(only_malloc)
    target = live_procs.start([targets.build("workload", "x64"), "--wait"])
    addrs = libc_exports(target.pid, ["malloc", "free", "calloc", "realloc"])
    mon = live_procs.attach(target, "--out", tmp_path / "out", "--profile", prof)
    assert "1/1 hooks" in mon.wait_monitoring()
    changed = {n: read_code(target.pid, a) != file_code(target.pid, a) for n, a in addrs.items()}
    assert changed == {"malloc": True, "free": False, "calloc": False, "realloc": False}
    mon.signal(signal.SIGINT)
    assert mon.wait() == 0, mon.stderr
    target.go()
    assert target.done()["ok"]
    assert target.finish() == {"prologue_restored": True}


