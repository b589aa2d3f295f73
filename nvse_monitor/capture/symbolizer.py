"""Function names for the call sites a live session shows (issue 11, docs/symbols.md).

Which addresses: only those the outputs name (Engine.symbol_wants: the distinct callers of live
blocks and of the largest allocations, later the frames of sampled stacks), each asked once.
When: on a thread of its own, every `interval_s` (the target may exit at any moment, and a leak
report at exit can only use names resolved before), and once more at stop, while the agent is
still loaded. How: the agent's `symbolize` RPC (agent.js, the end), in chunks of `chunk`
addresses, at most `max_per_pass` per pass: bounded work in the target, never on its hot path.
The answers go into the stream as SymbolNames messages (so recordings keep them); a failure
(agent gone, RPC error, timeout) goes there too, as the message's `error`, and the engine logs
it once; the offset form then stays for the addresses not named.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..stream.messages import SymbolNames

DEFAULT_INTERVAL_S = 2.0
DEFAULT_CHUNK = 4000  # addresses per RPC (the agent refuses more than 20,000)
DEFAULT_MAX_PER_PASS = 20_000
FINAL_PASS_TIMEOUT_S = 10.0

Resolve = Callable[[list[int]], Sequence[Any]]


def agent_resolver(script: Any) -> Resolve:
    """The agent's symbolize RPC: addresses in, [module, function, offset] per address out."""
    def resolve(addresses: list[int]) -> Sequence[Any]:
        return script.exports_sync.symbolize([f"0x{a:x}" for a in addresses])
    return resolve


def function_text(name: str | None, offset: int | None) -> str | None:
    """The `function` part of a site label: "name+0xoff", "name" when the offset is unknown."""
    if not name:
        return None
    return name if offset is None else f"{name}+0x{int(offset):x}"


class Symbolizer:
    def __init__(self, resolve: Resolve, wants: Callable[[], np.ndarray],
                 emit: Callable[[SymbolNames], None], now_us: Callable[[], int], *,
                 interval_s: float = DEFAULT_INTERVAL_S, chunk: int = DEFAULT_CHUNK,
                 max_per_pass: int = DEFAULT_MAX_PER_PASS) -> None:
        self.resolve = resolve
        self.wants = wants
        self.emit = emit
        self.now_us = now_us
        self.interval_s = interval_s
        self.chunk = max(1, chunk)
        self.max_per_pass = max(1, max_per_pass)
        self.asked: set[int] = set()  # every address asked (named or not): asked once
        self.named = 0
        self.error: str | None = None  # the first failure; no more passes after it
        self.seconds = 0.0  # time spent in the agent's RPC, in total
        self._lock = threading.Lock()  # one pass at a time
        self._stop = threading.Event()
        self._final = False  # in the final pass: its failures are reported after stop()
        self._thread: threading.Thread | None = None

    def start(self) -> Symbolizer:
        self._thread = threading.Thread(target=self._run, name="nvse-monitor-symbols",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_pass()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=FINAL_PASS_TIMEOUT_S)

    def final_pass(self, timeout_s: float = FINAL_PASS_TIMEOUT_S) -> None:
        """At stop, with the agent still loaded: the periodic passes end, then one last pass
        (every address left, in chunks) on a thread given `timeout_s` at most; a pass that
        takes longer is reported as the error and left to finish on its own."""
        self.stop()
        self._final = True
        done = threading.Event()

        def work() -> None:
            try:
                while self.run_pass(max_addresses=None) and self.error is None \
                        and not done.is_set():
                    pass
            finally:
                done.set()

        t = threading.Thread(target=work, name="nvse-monitor-symbols-final", daemon=True)
        t.start()
        if not done.wait(timeout_s):
            done.set()
            self._fail(f"the final pass took longer than {timeout_s:g} s", [])

    def run_pass(self, max_addresses: int | None = -1) -> int:
        """One pass: the wanted addresses not asked yet (at most max_per_pass, or
        `max_addresses`; None: all), resolved in chunks. Returns how many were asked."""
        limit = self.max_per_pass if max_addresses == -1 else max_addresses
        with self._lock:
            if self.error is not None:
                return 0
            try:
                wanted = self.wants()
            except Exception:  # noqa: BLE001 - the engine is finishing: nothing to name
                return 0
            new = [a for a in np.asarray(wanted, dtype=np.uint64).tolist() if a not in self.asked]
            if limit is not None:
                new = new[:limit]
            for i in range(0, len(new), self.chunk):
                part = new[i:i + self.chunk]
                t0 = time.perf_counter()
                try:
                    answers = self.resolve(part)
                    if len(answers) != len(part):
                        raise ValueError(f"{len(answers)} answers for {len(part)} addresses")
                except Exception as exc:  # noqa: BLE001 - agent gone, RPC error: logged
                    self._fail(_one_line(exc), new[i:])
                    return i
                finally:
                    self.seconds += time.perf_counter() - t0
                self.asked.update(part)
                names = {}
                for a, ans in zip(part, answers, strict=True):
                    text = function_text(ans[1], ans[2]) if isinstance(ans, list | tuple) \
                        and len(ans) >= 3 else None
                    if text is not None:
                        names[a] = text
                if names:
                    self.named += len(names)
                    self.emit(SymbolNames(self.now_us(), names))
            return len(new)

    def _fail(self, why: str, unresolved: list[int]) -> None:
        if self.error is not None:
            return
        self.error = why
        if self._stop.is_set() and not self._final:
            return  # the session is over (the target went): nothing left to show them
        self.emit(SymbolNames(self.now_us(), {}, error=why, unresolved=len(unresolved)))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
