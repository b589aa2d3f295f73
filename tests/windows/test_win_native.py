"""The host's compiled kernels on Windows (docs/native.md): the lane's Windows Python and the
single-file nvse-monitor.exe load the _kernels.dll cross-built by packaging/build_native.sh, a
live session's files are exact with them and with the numpy paths (NVSE_MONITOR_NATIVE=0), and
the 32-bit build loads in a 32-bit Windows process.

Where the lane could not build the DLL: without the cross compiler (NVSE_WIN_NATIVE
"no-compiler: ...", an apt outage) the native tests skip with that reason and run.sh prints it
loudly; a kernels.c that does not build ("failed: ...") fails them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nvse_monitor.native import ABI
from windows.fakes import PeInstall
from windows.winlane import (
    assert_exact,
    assert_final,
    game_env,
    recorded,
    run_monitor,
    stats,
    wait_truth,
    winpath,
)

NATIVE = "host kernels: native (_kernels.dll)"
ROOT = Path(__file__).resolve().parents[2]


def need_native() -> None:
    state = os.environ.get("NVSE_WIN_NATIVE", "")
    if state == "built":
        return
    if state.startswith("no-compiler"):
        pytest.skip(f"the lane has no compiled kernels: {state}")
    pytest.fail(f"the lane has no compiled kernels: {state or 'NVSE_WIN_NATIVE is not set'}")


def host_kernels(cwd: Path, exe: str | None = None, **env: str) -> str:
    p = run_monitor(["--version"], cwd=cwd, env=dict(os.environ, **env), exe=exe, timeout=120)
    assert p.returncode == 0, p.stderr[-1500:]
    return next((ln for ln in p.stdout.splitlines() if ln.startswith("host kernels:")),
                f"no 'host kernels:' line in {p.stdout!r}")


def test_windows_python_loads_the_dll(tmp_path: Path) -> None:
    assert host_kernels(tmp_path, NVSE_MONITOR_NATIVE="0") == \
        "host kernels: numpy (NVSE_MONITOR_NATIVE=0)"
    need_native()
    assert host_kernels(tmp_path) == NATIVE


def test_exe_carries_and_loads_the_dll(exe: str, tmp_path: Path) -> None:
    need_native()
    assert host_kernels(tmp_path, exe=exe) == NATIVE


def test_live_session_exact_native_and_numpy(pe: PeInstall, tmp_path: Path) -> None:
    """The same spawn with the numpy paths, then with the DLL: both exact against the game's own
    truth, so both have the same counts. 4 threads x ~31,000 calls through a 16K-slot ring: it
    wraps several times, producers catch up with the host (a few stalls a run here) and takes
    meet slots not yet published."""
    got = {}
    for kernels in ("numpy", "native"):
        if kernels == "native":
            need_native()
        work = tmp_path / kernels
        work.mkdir()
        out, rec = work / "out", work / "s.nvmrec"
        env = game_env(FAKE_GAME_TRUTH=winpath(work / "truth.txt"), FAKE_GAME_ITERS="3000",
                       NVSE_MONITOR_NATIVE="0" if kernels == "numpy" else "1")
        p = run_monitor(["spawn", "--out", winpath(out), "--record", winpath(rec),
                         "--ring-size", "16K", "--", "FalloutNV.exe"], cwd=pe.root, env=env,
                        timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert " 0 dropped" in p.stderr, p.stderr[-800:]
        truth = wait_truth(work / "truth.txt", 5)
        assert sum(c for c, _ in truth.calls.values()) >= 100_000
        assert_exact(truth, rec)
        assert_final(stats(out), truth)
        got[kernels] = recorded(rec)
    assert got["native"] == got["numpy"]


LOADER32 = r"""
#include <windows.h>
#include <stdio.h>
int main (int argc, char **argv) {
  HMODULE h = argc > 1 ? LoadLibraryA (argv[1]) : NULL;
  if (!h) { printf ("LoadLibrary failed: %lu\n", GetLastError ()); return 1; }
  int (*abi) (void) = (int (*) (void)) GetProcAddress (h, "nvsm_abi");
  if (!abi) { printf ("no nvsm_abi\n"); return 1; }
  printf ("abi %d\n", abi ());
  return 0;
}
"""


def test_x86_build_loads_in_a_32bit_process(tmp_path: Path) -> None:
    """build_native.sh x86 (a 32-bit Windows Python's DLL): built with only Windows' own DLLs
    as imports (the script checks), loaded by a 32-bit PE, which a 64-bit DLL could not be."""
    env = {k: v for k, v in os.environ.items() if k != "CC"}  # the default i686 compiler
    b = subprocess.run(["bash", str(ROOT / "packaging/build_native.sh"), str(tmp_path), "x86"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr
    dll = Path(b.stdout.strip())
    assert dll == tmp_path / "_kernels.dll"
    (tmp_path / "loader.c").write_text(LOADER32)
    subprocess.run(["i686-w64-mingw32-gcc", "-O1", "-o", str(tmp_path / "loader32.exe"),
                    str(tmp_path / "loader.c")], check=True, timeout=120)
    p = subprocess.run(["wine", str(tmp_path / "loader32.exe"), winpath(dll)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == f"abi {ABI}", (p.stdout, p.stderr[-800:])
