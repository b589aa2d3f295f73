"""Test harness for the agent (no tests here): compile the C targets, run them under a real agent.

Shared by tests/test_agent*.py and bench/bench_hook_cost.py (no pytest dependency here).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from nvse_monitor.capture.agent_host import AgentConfig, AgentHandle, load_agent
from nvse_monitor.capture.hookprofile import Profile, load_profile
from nvse_monitor.stream.events import FLAG_REALLOC_HALF, RECORD_DTYPE, Kind, realloc_halves
from nvse_monitor.stream.messages import AgentCounters, Batch, HookEvent, ModuleEvent

TARGETS = Path(__file__).parent / "agent_targets"


def m32_problem() -> str | None:
    """Why `gcc -m32` cannot build a threaded program here, or None when it can."""
    probe = "#include <pthread.h>\nint main(void){pthread_self();return 0;}\n"
    try:
        r = subprocess.run(["gcc", "-m32", "-pthread", "-x", "c", "-", "-o", os.devnull],
                           input=probe.encode(), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"gcc -m32 not usable: {e}"
    if r.returncode != 0:
        return "gcc -m32 cannot link (install gcc-multilib): " + r.stderr.decode()[-200:]
    return None


def build(src: str, out_dir: Path, arch: str = "x64", shared: bool = False,
          opt: str = "-O0") -> Path:
    """Compile tests/agent_targets/<src> for x64 or ia32 (cached by name in out_dir)."""
    stem = Path(src).stem
    out = out_dir / (f"lib{stem}-{arch}.so" if shared else f"{stem}-{arch}")
    if out.exists():
        return out
    cmd = ["gcc", opt, "-g", "-pthread", "-Wno-alloc-size-larger-than", str(TARGETS / src),
           "-o", str(out)]
    if arch == "ia32":
        cmd.insert(1, "-m32")
    if shared:
        cmd[1:1] = ["-shared", "-fPIC"]
    else:
        cmd.append("-ldl")
    subprocess.run(cmd, check=True, capture_output=True)
    return out


class Monitored:
    """A target process with the agent loaded; collects every stream message in order."""

    def __init__(self, argv: list[str], profile: Profile | str = "linux-libc",
                 config: AgentConfig | None = None, attach: bool = True) -> None:
        import frida

        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.messages: list[Any] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = self.readline().split()
        assert self.ready and self.ready[0] == "ready", f"target said {self.ready!r}"
        self.pid = self.proc.pid
        self.session = frida.attach(self.pid)
        self.detached: list[str] = []
        self.session.on("detached", lambda reason, crash: self.detached.append(reason))
        self.agent: AgentHandle = load_agent(self.session, self.profile, config or AgentConfig(),
                                             on_message=self._on_message)

    def _on_message(self, msg: Any) -> None:
        with self._lock:
            self.messages.append(msg)

    # ---------------------------------------------------------------- target I/O

    def readline(self, timeout: float = 30.0) -> str:
        line = self.proc.stdout.readline()  # the targets answer quickly; pytest-timeout guards
        if not line:
            raise AssertionError(f"target exited (rc={self.proc.poll()}) before answering")
        return line.decode().rstrip("\n")

    def say(self, text: str = "go") -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def read_until(self, end: str = "done") -> list[list[str]]:
        lines = []
        while (line := self.readline()) != end:
            lines.append(line.split())
        return lines

    # ---------------------------------------------------------------- collected messages

    def batches(self) -> list[Batch]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, Batch)]

    def records(self) -> np.ndarray:
        bs = [b.records for b in self.batches()]
        return np.concatenate(bs) if bs else np.empty(0, RECORD_DTYPE)

    def hook_events(self) -> list[HookEvent]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, HookEvent)]

    def module_events(self) -> list[ModuleEvent]:
        with self._lock:
            return [m for m in self.messages if isinstance(m, ModuleEvent)]

    def hook_index(self, name: str) -> int:
        return [h.name for h in self.profile.hooks].index(name)

    def wait_for(self, pred, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.01)
        return pred()

    # ---------------------------------------------------------------- teardown

    def stop(self) -> AgentCounters:
        return self.agent.stop()

    def close(self, finish_lines: int = 3) -> int | None:
        """Stop the agent (hooks reverted, final drain), let the target run to its end, then
        unload. The target exits before the unload: on ia32 Frida itself sometimes crashes or
        hangs a target that keeps running after an unload (seen with a trivial script too);
        unloading under a running target is tested on x64 (test_stop_reverts_hooks...)."""
        with contextlib.suppress(Exception):
            self.agent.stop()
        try:
            for _ in range(finish_lines):
                self.say("end")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.agent.unload()
        with contextlib.suppress(Exception):
            self.session.detach()
        return rc

    def __enter__(self) -> Monitored:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.close()


def counters_delta(a: AgentCounters, b: AgentCounters) -> dict[str, int]:
    return {k: getattr(b, k) - getattr(a, k) for k in
            ("allocs", "frees", "reallocs", "failures", "bytes_allocated")}


def tally(records: np.ndarray) -> dict[str, int]:
    """What the agent's counters should say about these records (a moved realloc's FREE half
    is no free call)."""
    k = records["kind"]
    grown = ((k == 1) | ((k == 3) & (records["ptr"] != 0)))
    half = realloc_halves(records)
    return {
        "allocs": int((k == 1).sum()), "frees": int((k == 2).sum() - half.sum()),
        "reallocs": int((k == 3).sum()), "failures": int((k == 4).sum()),
        "bytes_allocated": int(records["size"][grown].sum()),
    }


def as_records(calls: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """The records a list of calls (kind, ptr, old_ptr, size) gives, with flags and the index
    of the call each comes from: a realloc that moved its block (ptr not 0, not old_ptr) is its
    FREE half (FLAG_REALLOC_HALF, in the realloc's slot) then a REALLOC with old_ptr 0."""
    out = []
    for i, (k, p, o, sz) in enumerate(calls):
        if k == Kind.REALLOC and p != 0 and p != o:
            out.append((Kind.FREE, o, 0, 0, FLAG_REALLOC_HALF, i))
            out.append((Kind.REALLOC, p, 0, sz, 0, i))
        else:
            out.append((k, p, o, sz, 0, i))
    return out
