"""The live consumer's merging of queued batches (capture/consumer.py): small batches wait a
little for the ones behind them, so that the engine makes one pass over many (its cost is
mostly per pass); a large one goes at once; the order of everything queued is kept."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from nvse_monitor.capture.consumer import Consumer
from nvse_monitor.capture.options import SessionOptions
from nvse_monitor.stream.events import RECORD_DTYPE
from nvse_monitor.stream.messages import Batch, SessionEnd


class _Pipeline:
    def __init__(self) -> None:
        self.passes: list[list[Batch]] = []

    def feed_many(self, batches: list[Batch]) -> None:
        self.passes.append(list(batches))


class _Loop(Consumer):
    """The consumer's state that _feed_batches touches, without a session."""

    def __init__(self, opts: SessionOptions) -> None:
        self.opts = opts
        self.q = queue.Queue()
        self.pipeline = _Pipeline()
        self.agent = None
        self.recorder = None
        self._stop_started = False
        self._messages = self._records = self._last_ts = 0
        self._last_counters = None


def batch(n: int, t: int) -> Batch:
    r = np.zeros(n, RECORD_DTYPE)
    r["ptr"] = np.arange(n) + 1
    return Batch(now_us=t, counters=None, records=r)


def test_small_batches_wait_for_the_ones_behind_them() -> None:
    c = _Loop(SessionOptions(merge_min_records=1000, merge_wait_s=0.5))

    def reader() -> None:  # a moderate rate: 100 records every 10 ms
        for i in range(1, 8):
            time.sleep(0.01)
            c.q.put(batch(100, i))
        c.q.put(SessionEnd(99, "end", True))

    threading.Thread(target=reader, daemon=True).start()
    t0 = time.monotonic()
    nxt = c._feed_batches(batch(100, 0))
    took = time.monotonic() - t0
    assert isinstance(nxt, SessionEnd)  # the first item that is not a batch comes back
    [one_pass] = c.pipeline.passes
    assert [b.now_us for b in one_pass] == list(range(8))  # all eight, in order
    assert took < 0.45  # it ended at the SessionEnd, not at the wait's end
    assert c._records == 800


def test_enough_records_or_the_wait_end_the_run() -> None:
    c = _Loop(SessionOptions(merge_min_records=1000, merge_wait_s=0.05))
    assert c._feed_batches(batch(1000, 0)) is None  # enough: fed at once, nothing waited for
    t0 = time.monotonic()
    c._feed_batches(batch(10, 1))  # nothing behind it: waits merge_wait_s, then goes alone
    took = time.monotonic() - t0
    assert 0.04 <= took < 0.5
    assert [[b.now_us for b in p] for p in c.pipeline.passes] == [[0], [1]]
    c._stop_started = True  # stopping: no waiting
    t0 = time.monotonic()
    c._feed_batches(batch(10, 2))
    assert time.monotonic() - t0 < 0.04
