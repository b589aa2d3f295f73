"""How a session ended, as the SessionEnd message the engine logs: an asked-for stop, an exec,
an exit, a crash or a kill, from Frida's detach reason, the exit watcher's notice and, for a
spawned program, its wait status. A mixin of LiveSession (session.py)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from ..stream.messages import AgentCounters, SessionEnd
from .queue_items import _Detached
from .targets import ExitNotice, ExitStatus, describe_wait_status


class SessionEnding:
    """The end of a LiveSession; its state is set in LiveSession.__init__."""

    pid: int
    mode: str
    _notes: list[str]
    _last_ts: int
    _stop_reason: str | None
    _final_counters: AgentCounters | None
    _last_counters: AgentCounters | None
    _exit_notice: ExitNotice | None
    _exit_status: ExitStatus | None
    _spawn_exe: str | None
    _exe_at_detach: str | None

    def _end_message(self, detached: _Detached) -> SessionEnd:
        counters = self._final_counters or self._last_counters
        crash = _crash_summary(detached.crash)
        if detached.reason == "application-requested" and self._stop_reason is not None:
            return SessionEnd(self._last_ts, self._stop_reason, True, "", counters)
        notice = self._exit_notice
        new = self._exe_at_detach
        if detached.reason == "process-terminated" and new and new != self._spawn_exe:
            # Not an end: the program exec'd and the agent went with the old image (Frida
            # reports it as process-terminated).
            self._notes.append(
                f"the program replaced itself with {new} (exec): the hooks were in the program "
                f"it replaced, so {new} runs on (PID {self.pid}) unmonitored; to monitor it, "
                f"start it directly (nvse-monitor spawn -- {new} ARGS...) or attach to it "
                f"while it runs (nvse-monitor attach {self.pid})")
            return SessionEnd(self._last_ts, "target-exec", True, "", counters)
        if detached.reason == "process-terminated" and self.mode == "spawn":
            # Our own child: its wait status says exactly how it ended.
            status = self._wait_status()
            if status is not None:
                self._notes.append(f"the program {describe_wait_status(status)}")
            if status is not None and os.WIFEXITED(status):
                return SessionEnd(self._last_ts, "target-exited", True, "", counters)
            if status is not None and os.WIFSIGNALED(status):
                sig = _signal_name(os.WTERMSIG(status))
                what = f"crashed: {notice.what}; " if notice and notice.how == "crash" else ""
                return SessionEnd(self._last_ts, detached.reason, False,
                                  crash or f"{what}killed by {sig}", counters)
        if detached.reason == "process-terminated" and notice is not None and notice.how == "exit":
            return SessionEnd(self._last_ts, "target-exited", True, "", counters)
        if notice is not None and notice.how == "abort":
            crash = crash or f"the target called abort() (thread {notice.tid})"
        elif notice is not None and notice.how == "crash":
            crash = crash or f"crashed: {notice.what} (thread {notice.tid})"
        elif detached.reason == "process-terminated" and not crash:
            crash = "no exit() call seen: killed by a signal or crashed"
        return SessionEnd(self._last_ts, detached.reason, False, crash, counters)

    def _wait_status(self) -> int | None:
        """The spawned program's wait status: from its pidfd (exact, also when Frida reaped
        it first), else our own waitpid()."""
        status = self._exit_status.status() if self._exit_status is not None else None
        return status if status is not None else self._reap_spawned()

    def _reap_spawned(self, timeout_s: float = 2.0) -> int | None:
        """The wait status of the spawned program (Frida's spawn makes it our child), or None
        when it is not ours to reap (another platform, or already reaped)."""
        if os.name != "posix" or not self.pid:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except OSError:  # ECHILD: not our child, or Frida reaped it first
                return None
            if pid == self.pid:
                return status
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)


def _crash_summary(crash: Any) -> str:
    if crash is None:
        return ""
    summary = getattr(crash, "summary", None) or str(crash)
    return " ".join(str(summary).split())[:500]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
