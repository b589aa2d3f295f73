"""The live CLI's errors and listings: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, Target


def cli(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nvse_monitor", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
    )


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_profiles_lists_bundled():
    r = cli("profiles")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "PLATFORM", "ARCH"]
    libc = next(x for x in rows if x.startswith("linux-libc "))
    assert "linux" in libc and "x64,ia32" in libc and "glibc" in libc


def test_attach_unknown_name():
    line = one_line_error(cli("attach", "no-such-process-nvse-xyz"))
    assert "no process named 'no-such-process-nvse-xyz'" in line


def test_attach_unknown_pid():
    pid = 4_000_000  # above Linux's pid_max limit (4194304 max, default 32768 or 4194304)
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    line = one_line_error(cli("attach", pid))
    assert f"no process with PID {pid}" in line


@pytest.mark.frida
def test_attach_ambiguous_name_lists_candidates(targets, tmp_path, live_procs):
    exe = tmp_path / "nvse-twin-target"
    shutil.copy(targets.build("workload", "x64"), exe)
    twins = [Target([exe, "--wait"]) for _ in range(2)]
    live_procs.extend(twins)
    for t in twins:
        t.wait_ready()
    line = one_line_error(cli("attach", "NVSE-Twin-Target"))  # case-insensitive
    assert "2 processes are named" in line
    for t in twins:
        assert f"(PID {t.pid})" in line


@pytest.mark.frida
def test_attach_zombie_is_a_clear_error(tmp_path):
    # A zombie (exited, not yet reaped) is listed but cannot be attached to.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                break
        time.sleep(0.02)
    try:
        r = cli("attach", child.pid, "--out", tmp_path)
        line = one_line_error(r)
        assert str(child.pid) in line and ("cannot" in line or "no process" in line)
    finally:
        child.wait()


def test_spawn_missing_program(tmp_path):
    line = one_line_error(cli("spawn", "--out", tmp_path, "--", tmp_path / "nope"))
    assert "nope" in line


def test_bad_ring_size():
    r = cli("attach", "1", "--ring-size", "1000")
    assert r.returncode == 2 and "power of two" in r.stderr and "Traceback" not in r.stderr


def test_bad_profile_is_one_line(targets, tmp_path, live_procs):
    target = live_procs.start([targets.build("workload", "x64"), "--wait"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\nname = "x"\nplatform = "linux"\narch = ["x64"]\n'
                   '[[hook]]\nname = "m"\nheap = "h"\nrole = "nope"\nmodule = "libc.so.6"\n'
                   'export = "malloc"\nargs = { size = 0 }\n')
    line = one_line_error(cli("attach", target.pid, "--profile", bad, "--out", tmp_path))
    assert "bad.toml" in line and "role" in line
    target.proc.send_signal(signal.SIGKILL)


@pytest.mark.frida
def test_live_status_line_on_a_terminal(targets, tmp_path, live_procs):
    """On a terminal stderr, a one-line status is redrawn in place (\\r) about twice a second."""
    import pty

    target = live_procs.start([targets.build("hammer", "x64"), "--seconds", "3", "--rate", "50000"])
    target.go()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvse_monitor", "attach", str(target.pid), "--out", str(tmp_path),
         "--duration", "1.6"],
        stderr=slave, stdout=subprocess.DEVNULL, cwd=REPO,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the monitor closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    text = b"".join(chunks).decode(errors="replace")
    redraws = [x for x in text.split("\r") if "ev/s" in x]
    assert len(redraws) >= 2, text  # refreshed during the 1.6 s
    last = redraws[-1]
    assert "allocs" in last and "drops 0" in last and "MiB" in last
    assert "session ended: duration" in text


@pytest.mark.frida
def test_unwritable_recording_is_a_clear_error(targets, tmp_path, live_procs):
    target = live_procs.start([targets.build("workload", "x64"), "--wait"])
    line = one_line_error(cli("attach", target.pid, "--out", tmp_path, "--record", "/dev/full"))
    assert "/dev/full" in line and "No space left" in line
    target.go()  # unharmed: it still runs its workload, checks its blocks and exits 0
    assert target.done()["ok"]
    assert target.finish() == {"prologue_restored": True}  # and nothing is left hooked
