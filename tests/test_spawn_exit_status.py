"""`spawn` prints how the program ended, every time (issue 12): Frida reaps its spawned children
itself, so the status comes from a pidfd opened while the program lives (docs/sessions.md)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import REPO

from nvse_monitor.capture.targets import ExitStatus, describe_wait_status

pytestmark = pytest.mark.frida


def spawn(tmp_path, *program: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvse_monitor", "spawn", "--out",
                           str(tmp_path / "out"), "--", *program], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def needs_pidfd_info() -> None:
    """A kernel without PIDFD_GET_INFO (< 6.13) falls back to waitpid(), which may lose."""
    p = subprocess.Popen(["true"])
    st = ExitStatus(p.pid)
    p.wait()
    got = st.status(timeout_s=0.5)
    st.close()
    if got is None:
        pytest.skip("this kernel has no PIDFD_GET_INFO exit status (Linux < 6.13)")


@pytest.mark.parametrize("round_", range(3))
@pytest.mark.parametrize("code", [0, 4])
def test_exit_status_printed(tmp_path, code, round_):
    needs_pidfd_info()
    r = spawn(tmp_path, "sh", "-c", f"exit {code}")
    assert r.returncode == 0, r.stderr  # the monitor's own status: the session went well
    assert f"nvse-monitor: the program exited with status {code}" in r.stderr.splitlines(), \
        r.stderr
    assert "session ended: target-exited" in r.stderr


def test_python_sys_exit(tmp_path):
    needs_pidfd_info()
    r = spawn(tmp_path, sys.executable, "-c", "import sys; sys.exit(3)")
    assert "nvse-monitor: the program exited with status 3" in r.stderr.splitlines(), r.stderr


def test_killed_program(tmp_path):
    needs_pidfd_info()
    r = spawn(tmp_path, "sh", "-c", "kill -9 $$")
    assert "nvse-monitor: the program was killed by SIGKILL" in r.stderr.splitlines(), r.stderr
    assert "(unexpected: killed by SIGKILL)" in r.stderr


def test_describe_wait_status():
    assert describe_wait_status(3 << 8) == "exited with status 3"
    assert describe_wait_status(9) == "was killed by SIGKILL"
    assert describe_wait_status(11 | 0x80) == "was killed by SIGSEGV (core dumped)"


def test_exec_is_said_plainly(tmp_path):
    """`sh -c 'exec PROGRAM'`: the agent goes with the shell's image (Frida says
    process-terminated); the session says the program replaced itself, that PROGRAM runs on
    unmonitored and how to monitor it, not that it was killed or crashed (issue 12)."""
    r = spawn(tmp_path, "sh", "-c", "exec sleep 5")
    assert r.returncode == 0, r.stderr
    assert "session ended: target-exec" in r.stderr and "unexpected" not in r.stderr
    m = re.search(r"the program replaced itself with (\S+) \(exec\): .* runs on \(PID (\d+)\) "
                  r"unmonitored; to monitor it, start it directly \(nvse-monitor spawn -- \S+ "
                  r"ARGS\.\.\.\) or attach to it while it runs \(nvse-monitor attach \d+\)",
                  r.stderr)
    assert m, r.stderr
    assert os.path.basename(m.group(1)) == "sleep"
    pid = int(m.group(2))
    try:
        os.kill(pid, 0)  # sleep runs on
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "out" / "MemoryPoolNVSE_rpmalloc.log").read_text()
    assert "Session ended: target-exec (the program replaced itself (exec)" in log
    assert "CRITICAL" not in log
    status = (tmp_path / "out" / "MemoryPoolNVSE_status.txt").read_text()
    assert "Status: SHUTDOWN" in status and "Health: HEALTHY" in status
