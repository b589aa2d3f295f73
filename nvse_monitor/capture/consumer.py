"""The consumer: the main thread's loop that feeds the queued stream messages to the Pipeline
(and the RecordingWriter) in arrival order, keeps the live status line, and stops the session
when asked (signals, --duration, request_stop) through the agent's stop(). A mixin of
LiveSession (session.py; the threads are described there)."""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import frida

from ..stream.messages import (
    AddressSpace,
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    ModuleEvent,
    SessionEnd,
    StreamMessage,
    SymbolNames,
)
from .options import SessionError
from .queue_items import _AddrSpaceError, _ChildAdded, _Detached, _WorkerDone
from .targets import ExitNotice, TargetError

STREAM_TYPES = (Batch, ModuleEvent, HookEvent, AgentError, SessionEnd, AddressSpace,
                SymbolNames)
STOP_TIMEOUT_S = 15.0  # agent stop() + detach; then we detach without the final drain


class Consumer:
    """The run loop of LiveSession; its state is set in LiveSession.__init__."""

    opts: Any  # SessionOptions
    q: queue.Queue[Any]
    device: Any  # frida.core.Device
    session: Any  # frida.core.Session
    agent: Any  # agent_host.AgentHandle
    pid: int
    pipeline: Any  # outputs.pipeline.Pipeline
    recorder: Any  # stream.recording.RecordingWriter
    status: Any  # views.live_status.StatusLine
    symbolizer: Any
    _exit_script: Any
    _exit_notice: ExitNotice | None
    _addrspace_watch: Any  # addrspace.Watch
    _stop_reason: str | None
    _stop_started: bool
    _stop_deadline: float
    _stop_fed: threading.Event
    _duration_deadline: float | None
    _pending_detach: _Detached | None
    _final_counters: AgentCounters | None
    _last_counters: AgentCounters | None
    _last_ts: int
    _agent_errors: int
    _messages: int
    _records: int
    _notes: list[str]

    # ---- blocking agent calls ------------------------------------------------------------------
    def _call_in_worker(self, name: str, fn: Callable[[], Any], sink: list[Any]) -> Any:
        """Run a blocking agent call on a worker thread while queued items go to `sink`."""
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                box["error"] = exc
            self.q.put(_WorkerDone(name))

        threading.Thread(target=work, name=f"nvse-monitor-{name}", daemon=True).start()
        while True:
            item = self.q.get()
            if isinstance(item, _WorkerDone) and item.name == name:
                break
            if isinstance(item, _Detached):
                sink.append(item)
                continue
            sink.append(item)
        if "error" in box:
            exc = box["error"]
            if any(isinstance(i, _Detached) for i in sink):
                raise TargetError(f"the target went away while the agent was loading ({exc})")
            if isinstance(exc, (TargetError, SessionError)):
                raise exc
            if isinstance(exc, frida.core.RPCException | frida.InvalidOperationError):
                raise SessionError(f"the agent failed to start in PID {self.pid}: {exc}") from None
            raise exc
        return box["result"]

    # ---- consumer loop --------------------------------------------------------------------------
    def _consume(self) -> _Detached:
        if self._pending_detach is not None:
            return self._pending_detach
        last_status = last_leaks = 0.0
        while True:
            try:
                item = self.q.get(timeout=0.1)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, Batch):
                    item = self._feed_batches(item)  # may hand back the next non-batch item
                    continue
                detached = self._handle(item)
                if detached is not None:
                    return detached
                item = None
            now = time.monotonic()
            deadline = self._duration_deadline
            if self._stop_reason is None and deadline is not None and now >= deadline:
                self._stop_reason = "duration"
            if self._stop_reason is not None and not self._stop_started:
                self._begin_stop()
            if self._stop_started and now > self._stop_deadline:
                self._notes.append("agent stop() timed out: detached without the final drain")
                self._stop_deadline = float("inf")
                threading.Thread(target=self._detach_quietly, daemon=True).start()
            if self.status is not None and now - last_status >= 0.5:
                last_status = now
                self.status.update(self.pipeline, self._last_counters, self._records, now)
            if self.pipeline is not None and now - last_leaks >= 0.5:
                last_leaks = now  # `top DIR` in another process may ask for the leaks now
                self.pipeline.answer_leak_request()

    def _handle(self, item: Any) -> _Detached | None:
        if isinstance(item, STREAM_TYPES):
            self._feed(item)
        elif isinstance(item, ExitNotice):
            # abort() and crashes outrank "exit": on abort() Frida runs the watcher's dispose
            # (which says "exit") before its exception handler reports the SIGABRT
            first = self._exit_notice
            if first is None or (first.how == "exit" and item.how != "exit"):
                self._exit_notice = item
        elif isinstance(item, _WorkerDone):
            if item.name == "stop":
                self._stop_fed.set()  # what the stop drained is fed: the last names may come
            if item.name == "stop" and item.error is None and item.result is not None:
                self._final_counters = _counters(item.result)
            elif item.error is not None:
                self._notes.append(f"agent {item.name}() failed: {item.error}")
        elif isinstance(item, _Detached):
            return item
        elif isinstance(item, _AddrSpaceError):
            self._notes.append(f"address-space sampling stopped: {item.message}")
        elif isinstance(item, _ChildAdded) and self.device is not None:
            with contextlib.suppress(Exception):  # a later child of a launcher: not monitored
                self.device.resume(item.child.pid)
        return None

    def _feed_batches(self, first: Batch) -> Any:
        """Feed `first` and the batches queued right behind it in one engine pass
        (Pipeline.feed_many: each batch keeps its own time and counters, the files are the same
        as feeding them one by one, minus superseded intermediate snapshots); returns the first
        queued item that is not a batch, or None. The recording gets every agent batch as is."""
        batches = [first]
        n = len(first.records)
        nxt = None
        # At a moderate rate the reader hands on small batches, and an engine pass costs
        # ~0.4 ms whatever its size: a small run waits a little for the batches behind it (the
        # files are rewritten a few times a second at most; the records keep their own times).
        # With the reader's fewer takes: ~20 % of a core at 1 M events/s instead of ~48 %.
        linger = time.monotonic() + self.opts.merge_wait_s
        while n < self.opts.merge_records:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                wait = linger - time.monotonic()
                if n >= self.opts.merge_min_records or wait <= 0 or self._stop_started:
                    break
                try:
                    item = self.q.get(timeout=wait)
                except queue.Empty:
                    break
            if not isinstance(item, Batch):
                nxt = item
                break
            batches.append(item)
            n += len(item.records)
        for b in batches:
            self._account(b)
        assert self.pipeline is not None
        self.pipeline.feed_many(batches)
        return nxt

    def _feed(self, msg: StreamMessage) -> None:
        assert self.pipeline is not None
        self._account(msg)
        self.pipeline.feed(msg)

    def _account(self, msg: StreamMessage) -> None:
        """Counts, time and the recording for one message about to be fed."""
        self._messages += 1
        if isinstance(msg, Batch):
            self._records += len(msg.records)
            if self.agent is not None:
                self.agent.ack(len(msg.records))  # flow control: the reader may hand on more
            self._last_counters = msg.counters
            self._last_ts = max(self._last_ts, msg.now_us)
        else:
            self._last_ts = max(self._last_ts, int(getattr(msg, "ts_us", 0)))
            if isinstance(msg, AgentError):
                self._agent_errors += 1
        if self.recorder is not None:
            try:
                self.recorder.write(msg)
            except OSError as exc:  # disk full...: keep monitoring, the recording ends here
                self._notes.append(f"recording stopped: {self.opts.record}: {exc.strerror or exc}")
                with contextlib.suppress(OSError):
                    self.recorder.close()
                self.recorder = None

    # ---- stopping -------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stop_started = True
        self._stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        if self.status is not None:
            self.status.note(f"stopping ({self._stop_reason}): removing hooks, final drain...")

        def work() -> None:
            result, error = None, None
            try:
                result = self.agent.stop()  # reverts hooks, drains everything, final counters
            except Exception as exc:  # noqa: BLE001 - the target may be gone already
                error = exc
            self.q.put(_WorkerDone("stop", result, error))
            if self.symbolizer is not None:
                # The last names while the agent is still loaded (the hooks are off): for the
                # blocks the final drain brought too, once the consumer has fed them.
                self._stop_fed.wait(5.0)
                if error is None:
                    self.symbolizer.final_pass()
                else:
                    self.symbolizer.stop()
            self._detach_quietly()

        threading.Thread(target=work, name="nvse-monitor-stop", daemon=True).start()

    def _detach_quietly(self) -> None:
        if self.symbolizer is not None:
            self.symbolizer.stop()
        if self._addrspace_watch is not None:
            self._addrspace_watch.unload()
        with contextlib.suppress(Exception):
            self.agent.unload()
        with contextlib.suppress(Exception):
            if self._exit_script is not None:
                self._exit_script.unload()
        with contextlib.suppress(Exception):
            assert self.session is not None
            self.session.detach()

    # ---- signals --------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            if self._stop_reason is None:
                self._stop_reason = "interrupted"
                self._notes.append(f"stopped by {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)

    def request_stop(self, reason: str = "interrupted") -> None:
        """Ask a running session to stop (thread-safe; used by tests and embedders)."""
        if self._stop_reason is None:
            self._stop_reason = reason


def _counters(d: Any) -> AgentCounters | None:
    if isinstance(d, AgentCounters):
        return d
    if isinstance(d, dict):
        known = AgentCounters.__dataclass_fields__
        return AgentCounters(**{k: int(v) for k, v in d.items() if k in known})
    return None
