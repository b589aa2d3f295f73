"""`attach NAME` with the name the monitor shows (the executable's file name), and why a PID
that exists cannot be attached (issue 12)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import frida
import pytest
from conftest import REPO

from nvse_monitor.capture.targets import PF_KTHREAD, TargetError, resolve_target

pytestmark = pytest.mark.frida


@pytest.fixture
def renamed_sleeper(tmp_path):
    """`sleep` copied to a long, unique file name and started through a short symlink: its
    process name (the symlink's) is not its executable's, as python3 runs python3.11."""
    exe = tmp_path / f"nvse-test-sleeper-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    shutil.copy(shutil.which("sleep"), exe)
    link = tmp_path / "zz"
    link.symlink_to(exe)
    p = subprocess.Popen([str(link), "60"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if Path(f"/proc/{p.pid}/exe").exists() and os.readlink(f"/proc/{p.pid}/exe") == str(exe):
            break
        time.sleep(0.02)
    yield p, exe.name
    p.kill()
    p.wait()


def test_resolve_by_executable_name(renamed_sleeper):
    p, name = renamed_sleeper
    device = frida.get_local_device()
    listed = {q.pid: q.name for q in device.enumerate_processes()}
    assert listed[p.pid] != name  # the process list names it otherwise
    ref = resolve_target(device, name)
    assert (ref.pid, ref.name) == (p.pid, name)
    assert resolve_target(device, name.upper()).pid == p.pid  # case-insensitive, like names
    with pytest.raises(TargetError, match="executable's file name"):
        resolve_target(device, name + "-not-running")


def test_attach_by_the_name_shown(renamed_sleeper, tmp_path):
    p, name = renamed_sleeper
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "attach", name, "--duration", "1",
                        "--out", tmp_path / "out"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"monitoring {name} (PID {p.pid}," in r.stderr
    assert p.poll() is None  # unharmed


def _kernel_thread() -> int | None:
    for pid in (2, 3, 4):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & PF_KTHREAD:
            return pid
    return None


def test_attach_to_a_kernel_thread_says_what_it_is(tmp_path):
    pid = _kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread visible in /proc here")
    r = subprocess.run([sys.executable, "-m", "nvse_monitor", "attach", str(pid), "--out",
                        tmp_path], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"nvse-monitor: error: cannot attach to PID {pid}: the process exists but Frida cannot "
        "see it: it is a kernel thread: there is no program in it to monitor"]
