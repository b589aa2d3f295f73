"""A live Linux session with a hook whose export the module lacks (docs/engine.md, "Hook
failures"): optional -> one INFO line and the session stays ACTIVE; required -> WARN and
DEGRADED. The Windows lane sees the optional case for real (msvcrt.dll has no _recalloc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.frida

PROFILE = """[profile]
name = "libc-with-absent"
platform = "linux"
arch = ["x64", "ia32"]

[[hook]]
name = "malloc"
heap = "libc"
role = "alloc"
module = "libc.so.6"
export = "malloc"
args = {{ size = 0 }}

[[hook]]
name = "free"
heap = "libc"
role = "free"
module = "libc.so.6"
export = "free"
args = {{ ptr = 0 }}

[[hook]]
name = "absent"
heap = "libc"
role = "alloc"
module = "libc.so.6"
export = "nvse_monitor_no_such_export"
args = {{ size = 0 }}
required = {required}
"""


def _session(tmp_path: Path, required: bool) -> tuple[subprocess.CompletedProcess[str], str]:
    prof = tmp_path / "p.toml"
    prof.write_text(PROFILE.format(required=str(required).lower()))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "nvse_monitor", "spawn", "--profile", str(prof),
                        "--out", str(out), "--", sys.executable, "-c", "print(sum(range(9)))"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-1500:]
    return p, (out / "MemoryPoolNVSE_rpmalloc.log").read_text()


def test_optional_export_missing_is_info(tmp_path: Path) -> None:
    p, log = _session(tmp_path, required=False)
    assert "[INFO]" in log and "Hook not present: absent (export nvse_monitor_no_such_export " \
        "not found in libc.so.6)" in log
    assert "Hook failed" not in log and "-> DEGRADED" not in log
    assert "Hooks installed: 2 of 3, 1 optional not present" in log
    assert "2/3 hooks (1 optional not present)" in p.stderr


def test_required_export_missing_degrades(tmp_path: Path) -> None:
    _, log = _session(tmp_path, required=True)
    assert "[WARN]" in log and "Hook failed: absent (export nvse_monitor_no_such_export " \
        "not found in libc.so.6)" in log
    assert "Status: INITIALIZING -> DEGRADED" in log
