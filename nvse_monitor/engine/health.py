"""The health machine and the log-line sink (docs/engine.md has the rules).

Status is derived from a few facts rather than stored: SHUTDOWN after finish; ERROR once any
error cause happened (sticky); INITIALIZING until the session is active; DEGRADED while any
degradation cause holds; ACTIVE otherwise. Transient causes (allocation failures, dropped events,
output write failures) clear after `recovery_us` of stream time without a new occurrence;
persistent causes (a failed hook, the tracking limit) never clear; condition causes (address
space low) hold exactly while their condition does and are cleared explicitly.
Every log line goes through `log()`, which counts levels and keeps is_healthy / last_error.
"""

from __future__ import annotations

from ..outputs.rows import LOG_LEVELS, LogLine, Status


class Health:
    def __init__(self, tid: int, recovery_us: int, sink: list) -> None:
        self.tid = tid
        self.recovery_us = recovery_us
        self.sink = sink  # outputs of the current feed, appended in time order
        self.log_counts = {lvl: 0 for lvl in LOG_LEVELS}
        self.is_healthy = True
        self.last_error = "none"
        self.started = False
        self.active = False
        self.error = False
        self.shutdown = False
        self.persistent: dict[str, int] = {}  # cause -> ts of first occurrence
        self.transient: dict[str, int] = {}  # cause -> ts of latest occurrence
        self.conditions: dict[str, int] = {}  # cause -> ts it started holding
        self.reported = Status.UNINITIALIZED

    # -- log lines -------------------------------------------------------------------------------
    def log(self, ts: int, level: str, message: str, tid: int | None = None) -> None:
        self.sink.append(LogLine(int(ts), level, self.tid if tid is None else int(tid), message))
        self.log_counts[level] += 1
        if level in ("ERROR", "CRITICAL"):
            self.is_healthy = False
            self.last_error = message

    @property
    def error_count(self) -> int:
        return self.log_counts["ERROR"]

    @property
    def warning_count(self) -> int:
        return self.log_counts["WARN"]

    @property
    def critical_count(self) -> int:
        return self.log_counts["CRITICAL"]

    # -- status ----------------------------------------------------------------------------------
    @property
    def status(self) -> Status:
        if self.shutdown:
            return Status.SHUTDOWN
        if self.error:
            return Status.ERROR
        if not self.started:
            return Status.UNINITIALIZED
        if not self.active:
            return Status.INITIALIZING
        if self.persistent or self.transient or self.conditions:
            return Status.DEGRADED
        return Status.ACTIVE

    @property
    def causes(self) -> list[str]:
        return sorted(set(self.persistent) | set(self.transient) | set(self.conditions))

    def _sync(self, ts: int, reason: str) -> None:
        new = self.status
        if new != self.reported:
            self.log(ts, "INFO", f"Status: {self.reported.value} -> {new.value} ({reason})")
            self.reported = new

    def start(self, ts: int) -> None:
        self.started = True
        self._sync(ts, "monitor starting")

    def activate(self, ts: int, reason: str) -> None:
        if not self.active:
            self.active = True
            self._sync(ts, reason)

    def degrade_transient(self, ts: int, cause: str) -> None:
        self.advance(ts)
        self.transient[cause] = int(ts)
        self._sync(ts, cause)

    def touch_transient(self, ts: int, cause: str) -> None:
        """A repeat occurrence that produced no line: only restarts the recovery timer."""
        if cause in self.transient:
            self.transient[cause] = max(self.transient[cause], int(ts))
        else:
            self.degrade_transient(ts, cause)

    def degrade_persistent(self, ts: int, cause: str) -> None:
        self.advance(ts)
        self.persistent.setdefault(cause, int(ts))
        self._sync(ts, cause)

    def set_condition(self, ts: int, cause: str) -> None:
        """A condition cause starts holding: DEGRADED until clear_condition()."""
        self.advance(ts)
        self.conditions.setdefault(cause, int(ts))
        self._sync(ts, cause)

    def clear_condition(self, ts: int, cause: str, reason: str) -> None:
        self.advance(ts)
        if self.conditions.pop(cause, None) is not None:
            self._sync(ts, reason)

    def fail(self, ts: int, level: str, message: str, cause: str) -> None:
        """An error cause: log it (ERROR/CRITICAL) and enter ERROR for good."""
        self.advance(ts)
        self.log(ts, level, message)
        self.error = True
        self._sync(ts, cause)

    def advance(self, ts: int) -> None:
        """Stream time reached `ts`: clear transient causes whose quiet period ended before it."""
        if not self.transient or self.error or self.shutdown:
            return
        last = max(self.transient.values())
        t_clear = last + self.recovery_us
        if ts >= t_clear:
            names = ", ".join(sorted(self.transient))
            self.transient.clear()
            self.log(t_clear, "INFO",
                     f"Recovered: no new {names} for {self.recovery_us / 1e6:g} s")
            self._sync(t_clear, "transient problems cleared")

    def finish(self, ts: int) -> None:
        self.shutdown = True
        self._sync(ts, "monitor shutting down")
