"""Helpers of the Windows lane: the Windows nvse-monitor run under Wine by Linux pytest.

Why Linux pytest drives `wine python.exe -m nvse_monitor`: the lane then tests what a player runs
(the Windows CPython, the Windows frida wheel, the Windows console and file paths) as a black box
through its command line, while the test code, the ground-truth comparison and the reading of
recordings use the Linux venv's pytest and nvse_monitor (the same readers as the Linux suite).
pytest inside the Windows Python would need a second set of test dependencies under Wine and
pytest's own console handling under Wine 8, and could not kill a hung Wine process from outside.

Wine facts used here (shared reference windows-under-wine.md): stdout and stderr are pipes (a
file gives "init_sys_streams ... Invalid handle"); WINEDEBUG=-all; Ctrl-C reaches a Windows
console program only through a terminal, so `Monitor.ctrl_c` writes ^C to a pty that is the
monitor's controlling terminal and stdin (Wine's console turns it into CTRL_C_EVENT).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvse_monitor.capture.hookprofile import load_profile
from nvse_monitor.engine.modmap import UNKNOWN, ModuleMap
from nvse_monitor.stream.events import Kind, realloc_halves
from nvse_monitor.stream.messages import Batch, ModuleEvent
from nvse_monitor.stream.recording import Recording

WAIT_S = 180.0  # generous: the machine is shared, and Wine starts slowly the first time
FNV = load_profile("fnv-1.4.0.525")
GECK = load_profile("geck-1.4.0.518")
EARLY = "fnvplugin_msvcrt.dll;fnvplugin_ucrt.dll"
LATE = "fnvplugin_formheap.dll;fnvplugin_late.dll"


def win_python() -> str | None:
    return os.environ.get("NVSE_WIN_PYTHON")


def winpath(p: Path | str) -> str:
    """The Wine path of a Linux path (drive Z: is /)."""
    return "Z:" + str(Path(p).resolve()).replace("/", "\\")


def game_env(**kw: str) -> dict[str, str]:
    env = dict(os.environ, FAKE_GAME_PLUGINS=EARLY, FAKE_GAME_LATE_PLUGINS=LATE,
               FAKE_GAME_THREADS="4", FAKE_GAME_ITERS="300")
    env.update(kw)
    return env


def monitor_cmd(*args: str, exe: str | None = None) -> list[str]:
    """The Windows nvse-monitor under Wine: `exe` (the PyInstaller build) or python -m."""
    if exe is not None:
        return ["wine", exe, *args]
    py = win_python()
    assert py, "NVSE_WIN_PYTHON is not set: run bash tests/windows/run.sh"
    return ["wine", py, "-m", "nvse_monitor", *args]


def run_monitor(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = WAIT_S, exe: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(monitor_cmd(*args, exe=exe), cwd=cwd, env=env or game_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


class Monitor:
    """A running Windows nvse-monitor under Wine, its stderr read on a thread, a pty as its
    console (for Ctrl-C)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
                 exe: str | None = None) -> None:
        self._master, slave = os.openpty()

        def own_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(monitor_cmd(*args, exe=exe), cwd=cwd, env=env or game_env(),
                                     stdin=slave, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                     errors="replace", preexec_fn=own_terminal)
        os.close(slave)
        self._err: list[str] = []
        self._out: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stderr, self._err), (self.proc.stdout, self._out))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: object, buf: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            buf.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    def wait_for(self, text: str, timeout: float = WAIT_S) -> None:
        end = time.monotonic() + timeout
        while text not in self.stderr:
            if self.proc.poll() is not None and text not in self.stderr:
                time.sleep(0.5)
                if text not in self.stderr:
                    raise AssertionError(f"monitor exited {self.proc.returncode} before "
                                         f"{text!r}:\n{self.stderr[-2000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"no {text!r} in {timeout} s:\n{self.stderr[-2000:]}")
            time.sleep(0.2)

    def ctrl_c(self) -> None:
        os.write(self._master, b"\x03")

    def wait(self, timeout: float = WAIT_S) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        with contextlib.suppress(OSError):
            os.close(self._master)


@dataclass
class Truth:
    calls: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    live: dict[tuple[str, str], int] = field(default_factory=dict)  # (owner, hook) -> bytes
    pid: int = 0
    injected: bool = False
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    vq: tuple[int, int, int, int] = (0, 0, 0, 0)  # free, largest free, committed, reserved
    done: bool = False
    error: str = ""

    def merge(self, hook: str, into: str) -> None:
        """Count `hook`'s calls under `into` (two entry points sent to one function by a heap
        replacer are recorded under the first hook installed there: docs/fnv.md)."""
        for table in (self.calls, self.live):
            for (m, h) in [k for k in table if k[1] == hook]:
                v = table.pop((m, h))
                old = table.get((m, into))
                if isinstance(v, tuple):
                    table[(m, into)] = tuple(a + b for a, b in zip(old or (0, 0), v, strict=True))  # type: ignore[assignment]
                else:
                    table[(m, into)] = (old or 0) + v  # type: ignore[assignment,operator]

    def modules(self) -> set[str]:
        return {m for m, _ in self.calls}

    def live_by_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (m, _), b in self.live.items():
            out[m] = out.get(m, 0) + b
        return out

    def live_by_heap(self, profile: object = FNV) -> dict[str, int]:
        heap = {h.name: h.heap for h in profile.hooks}  # type: ignore[attr-defined]
        out: dict[str, int] = {}
        for (_, hook), b in self.live.items():
            out[heap[hook]] = out.get(heap[hook], 0) + b
        return out


def read_truth(path: Path) -> Truth:
    t = Truth()
    if not path.exists():
        return t
    for line in path.read_text().splitlines():
        w = line.split()
        if w[:2] == ["gt", "call"]:
            t.calls[(w[2], w[3])] = (int(w[4]), int(w[5]))
        elif w[:2] == ["gt", "live"]:
            t.live[(w[2], w[3])] = int(w[4])
        elif w[:1] == ["pid"]:
            t.pid = int(w[1])
        elif w[:2] == ["gt", "env"]:
            t.env = dict(kv.split("=", 1) for kv in w[2:])
        elif w[:2] == ["gt", "cwd"]:
            t.cwd = line.split(" ", 2)[2]
        elif w[:2] == ["gt", "vq"]:
            t.vq = (int(w[2]), int(w[3]), int(w[4]), int(w[5]))
        elif w[:2] == ["gt", "injected"]:
            t.injected = w[2] == "1"
        elif w == ["done"]:
            t.done = True
        elif w[:1] == ["error"]:
            t.error = line
    return t


def wait_truth(path: Path, timeout: float = WAIT_S) -> Truth:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t = read_truth(path)
        assert not t.error, t.error
        if t.done:
            return t
        time.sleep(0.2)
    raise AssertionError(f"the fake game wrote no truth to {path} in {timeout} s")


def recorded(rec: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(calling module, hook) -> (calls, bytes) in a recording (FAILED records, sampled
    stacks' STACK records and moved reallocs' FREE halves left out: one record per call)."""
    got: dict[tuple[str, str], tuple[int, int]] = {}
    with Recording(rec) as r:
        meta = r.meta
        names = [h.name for h in meta.hooks]
        mm = ModuleMap(list(meta.modules))
        for msg in r:
            if isinstance(msg, ModuleEvent):
                (mm.add if msg.action == "add" else mm.remove)(msg.module)
                continue
            if not isinstance(msg, Batch) or not len(msg.records):
                continue
            k = msg.records["kind"]
            recs = msg.records[(k != Kind.FAILED) & (k != Kind.STACK)
                               & ~realloc_halves(msg.records)]
            mods = mm.lookup(recs["caller"].astype(np.uint64))
            for mod, hook, size in zip(mods.tolist(), recs["hook"].tolist(),
                                       recs["size"].tolist(), strict=True):
                name = mm.modules[mod].name if mod != UNKNOWN else "?"
                c, b = got.get((name, names[hook]), (0, 0))
                got[(name, names[hook])] = (c + 1, b + size)
    return got


def assert_exact(truth: Truth, rec: Path) -> None:
    """Every call the fakes counted is in the recording, and nothing else from their modules."""
    got = recorded(rec)
    mods = truth.modules()
    mine = {k: v for k, v in got.items() if k[0] in mods}
    diff = {k: (mine.get(k), truth.calls.get(k)) for k in set(mine) | set(truth.calls)
            if mine.get(k) != truth.calls.get(k)}
    assert not diff, f"(module, hook): (recorded, truth) differ: {diff}"


def stats(out: Path) -> dict[str, Any]:
    return json.loads((out / "MemoryPoolNVSE_stats.json").read_text())["monitor"]


def assert_final(mon: dict[str, Any], truth: Truth, profile: Any = None) -> None:
    """The JSON's live bytes per heap and per module are the fakes' own. (This lane found the
    realloc ordering race, one attach session in five under Wine, where HeapReAlloc is slow: a
    realloc moving its block to an address another thread freed during the call. A moved
    realloc is now two records, docs/agent.md "Ordering guarantees"; it was an xfail here.)"""
    heaps = {h: v["current_bytes"] for h, v in mon["heaps"].items()}
    want = truth.live_by_heap(profile) if profile else truth.live_by_heap()
    got_heaps = {h: heaps.get(h, 0) for h in want}
    mods = mon["modules_live_bytes"]
    got_mods = {m: mods.get(m, 0) for m in truth.live_by_module()}
    assert got_heaps == want
    assert got_mods == truth.live_by_module()
    # (untracked frees may come from Wine's own DLLs freeing what they allocated before the hooks)
    assert mon["dropped_events"] == 0


@contextlib.contextmanager
def running_game(exe: Path, work: Path,
                 **env: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The fake game started by Wine, stopped before its workload (FAKE_GAME_GO) and holding
    its kept blocks after it (FAKE_GAME_HOLD); yields (process, Windows PID). The caller creates
    work/go and work/hold."""
    for f in ("go", "hold", "ready", "truth.txt"):
        (work / f).unlink(missing_ok=True)
    e = game_env(FAKE_GAME_GO=winpath(work / "go"), FAKE_GAME_HOLD=winpath(work / "hold"),
                 FAKE_GAME_READY=winpath(work / "ready"),
                 FAKE_GAME_TRUTH=winpath(work / "truth.txt"),
                 **env)
    proc = subprocess.Popen(["wine", exe.name], cwd=exe.parent, env=e, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + WAIT_S
        while not (work / "ready").exists() or not (work / "ready").read_text().strip():
            assert proc.poll() is None, f"the fake game exited {proc.returncode} before READY"
            assert time.monotonic() < end, "the fake game never got READY"
            time.sleep(0.2)
        yield proc, int((work / "ready").read_text())
    finally:
        (work / "go").touch()
        (work / "hold").touch()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
