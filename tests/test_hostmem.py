"""The monitor's malloc settings (nvse_monitor/hostmem.py): big arrays reuse the heap instead
of coming back as fresh pages for the kernel to zero. Each case runs in its own process, as the
settings are per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# glibc's own account (mallinfo2): bytes in mmapped chunks (hblkhd) and in the heap (arena),
# before and after a 20 MiB array is made, then after it is freed. By default glibc mmaps an
# allocation that big (its threshold starts at 128 KiB), and unmaps it on free: fresh pages
# the next time. Tuned, it comes from the heap, and the heap keeps it after the free.
PROBE = """
import ctypes, sys
import numpy as np
from nvse_monitor import hostmem
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
state = hostmem.tune() if sys.argv[1] == "tune" else "untouched"
i0 = libc.mallinfo2()
a = np.ones(20 << 17)  # 20 MiB, written
i1 = libc.mallinfo2()
del a
i2 = libc.mallinfo2()
print(state, i1.hblkhd - i0.hblkhd, i1.uordblks - i0.uordblks, i1.arena - i2.arena)
"""
MIB = 1 << 20


def _probe(mode: str, **env: str) -> tuple[str, int, int, int]:
    """tune()'s answer; with the array, the growth of mmapped bytes and of the heap's bytes in
    use; how much the heap shrank when it was freed."""
    e = {k: v for k, v in os.environ.items() if k != "NVSE_MONITOR_MALLOC"}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       env=e, timeout=60)
    if "mallinfo2" in r.stderr:
        pytest.skip("this libc has no mallinfo2 (glibc before 2.33)")
    assert r.returncode == 0, r.stderr
    state, mapped, used, shrank = r.stdout.rsplit(maxsplit=3)
    return state, int(mapped), int(used), int(shrank)


def test_big_arrays_come_from_the_heap_and_stay_there_once_tuned():
    state, mapped, used, shrank = _probe("tune")
    assert state == "tuned"
    assert mapped < MIB and used >= 20 * MIB, (mapped, used)
    assert shrank == 0, shrank  # kept for the next batch's arrays: no fresh pages


def test_glibc_defaults_map_big_arrays():
    """The reason for the settings, checked: without them the array is mmapped (and unmapped
    on free)."""
    state, mapped, used, _ = _probe("plain")
    assert state == "untouched"
    assert mapped >= 20 * MIB and used < MIB, (mapped, used)


def test_the_environment_keeps_glibc_defaults():
    state, mapped, _, _ = _probe("tune", NVSE_MONITOR_MALLOC="default")
    assert state == "default (NVSE_MONITOR_MALLOC)"
    assert mapped >= 20 * MIB, mapped


def test_the_cli_tunes_its_process():
    code = ("import sys; from nvse_monitor.cli import main; from nvse_monitor import hostmem\n"
            "try:\n    main(['status', '/nonexistent-dir'])\nexcept SystemExit:\n    pass\n"
            "print(hostmem._done, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env={k: v for k, v in os.environ.items()
                                        if k != "NVSE_MONITOR_MALLOC"})
    assert r.stderr.strip().splitlines()[-1] == "tuned", r.stderr
