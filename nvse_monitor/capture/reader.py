"""The host's reader: consumes the agent's records straight from the shared ring.

One thread. Each look at the ring ("poll") bumps the host's heartbeat in the header, notes
(head, now) as a time anchor, takes every published record from tail on in one vectorised
copy, advances tail, and hands the records on as a `Batch`: about every 1 ms while records
flow, backing off to 20 ms when the ring is idle.

Producers read no clock: a record's time is interpolated from its ring position between the
anchors around it (resolution: the time between two looks, ~1 ms under load; docs/agent.md).
Everything read from the mapping is untrusted: a record with an unknown kind or hook is counted
in `unknown_records` and skipped; header words are only ever used within bounds.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import native
from ..stream.events import (
    FLAG_REALLOC_HALF,
    FLAG_SAMPLED,
    FLAG_VIA_WRAPPER,
    MAX_STACK_FRAMES,
    RECORD_DTYPE,
    STACK_FRAMES_PER_RECORD,
    Kind,
)
from ..stream.messages import AgentCounters, Batch, StreamMessage
from . import ringlayout as rl

POLL_BUSY_S = 0.001
# A look that finds fewer new records than this (and than 1/8 of the ring) only notes the time
# anchor and leaves them for a later look, at most PROCESS_WAIT_S: at a moderate rate each
# look's fixed cost (~0.1 ms of numpy calls and a Batch) dominated. Their times still come from
# the 1 ms anchors.
PROCESS_MIN_RECORDS = 1 << 14
PROCESS_WAIT_S = 0.01
# Records per Batch handed on: the engine takes GIL-holding numpy passes over a batch, and the
# reader must get its turn often (producers may be waiting for it).
BATCH_RECORDS = 1 << 16
POLL_IDLE_MAX_S = 0.02
EMPTY_BATCH_S = 0.25  # a quiet ring still advances time this often
CLASSIFY_WAIT_S = 1.0  # records of threads JS has not classified yet wait at most this long
STUCK_SLOT_S = 2.0  # a reserved slot never published (its thread died mid-call): skipped
MARK_WAIT_S = 2.0  # a marker's control message must arrive within this
# kind (byte 48) and hook (byte 49) of a record as one little-endian u16: its half-word index
_KH_WORD = RECORD_DTYPE.fields["kind"][1] // 2
assert RECORD_DTYPE.fields["hook"][1] == RECORD_DTYPE.fields["kind"][1] + 1
CALL_FLAGS = FLAG_SAMPLED | FLAG_VIA_WRAPPER
# the flags a record keeps, by kind: calls the ones we know, FREE whether it is a realloc's
# free half, STACK its frame count
_KEEP_FLAGS = np.zeros(256, np.uint16)
_KEEP_FLAGS[[Kind.ALLOC, Kind.REALLOC, Kind.FAILED]] = CALL_FLAGS
_KEEP_FLAGS[Kind.FREE] = FLAG_REALLOC_HALF
_KEEP_FLAGS[Kind.STACK] = 0xFFFF


class RingReader:
    """Reads `layout`'s ring in `buf`. `emit` gets Batches and the control messages that
    markers put in order; `agent_now_us()` maps the host's clock onto the agent's time."""

    def __init__(self, buf: Any, layout: rl.Layout, nhooks: int,
                 emit: Callable[[StreamMessage], None], agent_now_us: Callable[[], int],
                 max_inflight_records: int | None = None, compiled: bool = True) -> None:
        self.layout = layout
        # the compiled take and checks (nvse_monitor/native), else the numpy ones below: the
        # same records, counters and batches either way
        self._k = native.KERNELS if compiled else None
        self.nhooks = nhooks
        self._emit = emit
        self._now = agent_now_us
        self._mv = memoryview(buf)
        self._slots = np.frombuffer(buf, dtype=layout.slot_dtype(), count=layout.slots,
                                    offset=rl.HEADER_BYTES)
        self._pub = self._slots["pub"]
        # slot i of a stretch from position pos is published when pub - (pos + 1) == i, in the
        # target's word width (wrapping like the agent's positions): one subtraction and one
        # comparison against this, instead of building the expected words each look
        self._iota = np.arange(layout.slots, dtype=self._pub.dtype)
        # valid records by (kind | hook << 8), the low half-word of a record's last word: one
        # lookup per record instead of three comparisons of 56-byte-strided fields
        kinds = np.arange(256)
        ok_kind = (kinds >= Kind.ALLOC) & (kinds <= Kind.FAILED)
        valid = ok_kind[None, :] & (kinds[:, None] < nhooks)  # [hook, kind]
        valid[:MAX_STACK_FRAMES // STACK_FRAMES_PER_RECORD, Kind.STACK] = True  # chunk index
        self._valid = valid.reshape(-1)
        self._valid_u8 = self._valid.astype(np.uint8)
        self._kcounts = np.zeros(7, np.uint64)  # nvsm_take_checked's counts (kernels.c C_*)
        self._kkept = ctypes.c_uint64()
        self._kmark = np.zeros(2, np.uint64)  # a marker ended the stretch; its ptr
        self._klast = np.zeros(1, np.uint64)  # the time of the last slot taken
        # the records as rows of 7 u64 words: a strided copy of these is a plain loop, where
        # numpy copies a structured field element by element (~17x slower)
        self._words = np.frombuffer(buf, dtype=np.uint64, count=layout.slots * 8,
                                    offset=rl.HEADER_BYTES).reshape(layout.slots, 8)[:, :7]
        self._word = struct.Struct(layout.word)
        self._mask = layout.wrap - 1
        self.tail = 0  # our own unwrapped copy; the header's is only ever written
        self._anchor_pos: list[int] = [0]
        self._anchor_us: list[int] = [0]
        self._last_ts = 0
        self._seq = 0
        # cumulative counters of what was read (records) and tallied by producers (drops)
        self._c = dict(allocs=0, frees=0, reallocs=0, failures=0, bytes_allocated=0,
                       published=0, unknown_records=0, lost_slots=0)
        self._drops = [0] * 6  # unwrapped drop tallies
        self._stalls = [0] * 3
        self._stuck_since: float | None = None
        self._waiting_since: float | None = None  # records left for a later look since then
        self._last_emit = 0.0
        self._marks: dict[int, StreamMessage] = {}
        self._marks_cv = threading.Condition()
        self._lock = threading.Lock()  # one poll at a time (the thread, or flush/stop)
        self._inflight = 0
        self._inflight_max = max_inflight_records
        self._inflight_cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    # ------------------------------------------------------------ header access
    def _get(self, off: int) -> int:
        return self._word.unpack_from(self._mv, off)[0]

    def _put(self, off: int, v: int) -> None:
        self._word.pack_into(self._mv, off, v & self._mask)

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self._mv, off)[0]

    def _unwrap(self, raw: int, near: int) -> int:
        """A wrapped word as the 64-bit value at or after `near` (within one wrap)."""
        return near + ((raw - near) & self._mask)

    # ------------------------------------------------------------ thread
    def start(self) -> RingReader:
        self._thread = threading.Thread(target=self._run, name="nvse-monitor-ring", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        idle = POLL_BUSY_S
        while not self._stop.is_set():
            with self._lock:
                n = self._poll()
            if n >= self.layout.slots // 4:
                idle = 0.0  # far behind: look again at once
            elif n or self._waiting_since is not None:
                idle = POLL_BUSY_S
            else:
                idle = min(max(idle * 2, POLL_BUSY_S), POLL_IDLE_MAX_S)
            if idle:
                self._stop.wait(idle)

    def stop(self) -> None:
        self._stop.set()
        with self._inflight_cv:
            self._inflight_max = None
            self._inflight_cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def ack(self, records: int) -> None:
        """The consumer has fed this many records (flow control, when enabled)."""
        with self._inflight_cv:
            self._inflight -= records
            self._inflight_cv.notify_all()

    def drain(self, until_empty_s: float = 2.0) -> AgentCounters:
        """Read everything published now (flush, and the final read after stop())."""
        deadline = time.monotonic() + until_empty_s
        with self._lock:
            while True:
                n = self._poll(force_emit=True)
                head = self._unwrap(self._get(rl.OFF_HEAD), self.tail)
                if head - self.tail > self.layout.slots:
                    head = self.tail
                if n == 0 and (head == self.tail or time.monotonic() > deadline):
                    break
                if n == 0:
                    time.sleep(0.001)
            return self.counters()

    def final(self, until_empty_s: float = 0.5) -> AgentCounters:
        """The target is gone (or the session over): whatever it published is still in our
        view of the mapping; read it all. Slots reserved but never published (a thread ended
        mid-call) are counted lost, which makes block fates uncertain."""
        self.stop()  # also ends flow control: the caller may be the consumer itself
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self.drain(until_empty_s)
        with self._lock:
            head = self._unwrap(self._get(rl.OFF_HEAD), self.tail)
            if 0 < head - self.tail <= self.layout.slots:
                self._c["lost_slots"] += head - self.tail
                self.tail = head
                self._send(np.empty(0, RECORD_DTYPE), self._now())  # the counters say so
            return self.counters()

    # ------------------------------------------------------------ control messages in order
    def control(self, mark: int, msg: StreamMessage) -> None:
        """A control message that a marker record places (from Frida's thread)."""
        with self._marks_cv:
            self._marks[mark] = msg
            self._marks_cv.notify_all()

    def _deliver_mark(self, mark: int) -> None:
        deadline = time.monotonic() + MARK_WAIT_S
        with self._marks_cv:
            while mark not in self._marks and time.monotonic() < deadline:
                self._marks_cv.wait(0.01)
                self._beat()
            msg = self._marks.pop(mark, None)
        if msg is not None:
            self._emit(msg)

    # ------------------------------------------------------------ one look at the ring
    def counters(self) -> AgentCounters:
        c, d, s = self._c, self._drops, self._stalls
        return AgentCounters(
            allocs=c["allocs"] + d[1], frees=c["frees"] + d[2], reallocs=c["reallocs"] + d[3],
            failures=c["failures"] + d[4], bytes_allocated=c["bytes_allocated"] + d[5],
            dropped=d[0] + c["lost_slots"], published=c["published"],
            dropped_frees=d[2] + d[3] + c["lost_slots"],
            stalls=s[0], stall_us=s[1], stall_max_us=s[2],
            unknown_records=c["unknown_records"])

    def _tallies(self) -> None:
        for i in range(6):
            self._drops[i] = self._unwrap(self._get(rl.OFF_DROPS + i * self.layout.ptr_size),
                                          self._drops[i])
        for i in (0, 1):
            self._stalls[i] = self._unwrap(self._get(rl.OFF_STALLS + i * self.layout.ptr_size),
                                           self._stalls[i])
        self._stalls[2] = self._get(rl.OFF_STALLS + 2 * self.layout.ptr_size)

    def _beat(self) -> None:
        """The host's heartbeat: producers waiting on a full ring give up when it stops (a
        host that is gone or hung), not while we wait for the engine or for JS."""
        self.polls += 1
        self._put(rl.OFF_HOST_POLLS, self.polls)

    def _poll(self, force_emit: bool = False) -> int:
        """One look: returns the number of records taken."""
        self._beat()
        head = self._unwrap(self._get(rl.OFF_HEAD), self.tail)
        if head - self.tail > self.layout.slots:  # garbage: a head never runs that far ahead
            head = self.tail + self.layout.slots
        now = self._now()
        # (head, now): records before head were reserved by now, those at or after it later.
        # While head stands still, the first look that saw it bounds the records before it
        # and the latest look the records after it: two anchors at one position (np.interp
        # takes the right-hand one for positions at or after it).
        pos, us = self._anchor_pos, self._anchor_us
        if head > pos[-1]:
            pos.append(head)
            us.append(now)
        elif head == pos[-1]:
            if len(pos) >= 2 and pos[-2] == head:
                us[-1] = now
            else:
                pos.append(head)
                us.append(now)
        pending = head - self.tail
        if not force_emit and 0 < pending < min(PROCESS_MIN_RECORDS, self.layout.slots // 8):
            t = time.monotonic()
            if self._waiting_since is None:
                self._waiting_since = t
            if t - self._waiting_since < PROCESS_WAIT_S:
                return 0
        self._waiting_since = None
        if self._k is not None:
            n = self._take_checked(head, now)
        else:
            recs = self._take(head)
            self._tallies()
            n = len(recs)
            if n:
                self._process(recs, now)
        if not n and (force_emit or time.monotonic() - self._last_emit >= EMPTY_BATCH_S):
            self._send(np.empty(0, RECORD_DTYPE), now)
        return n

    def _take(self, head: int) -> np.ndarray:
        """Published records from tail on (both segments of a wrap), tail advanced past them."""
        mask = self.layout.slots - 1
        segs: list[tuple[int, int]] = []  # (first slot, count) of each published stretch
        pos = self.tail
        stuck = False
        while pos < head:
            i0 = pos & mask
            cnt = min(head - pos, self.layout.slots - i0)
            ok = np.subtract(self._pub[i0:i0 + cnt], self._pub.dtype.type((pos + 1) & self._mask))
            ok = np.equal(ok, self._iota[:cnt])
            k = cnt if ok.all() else int(np.argmin(ok))
            if k:
                segs.append((i0, k))
                pos += k
            if k < cnt:
                stuck = True
                break
        # one array for both segments of a wrap (concatenating structured arrays is slow),
        # filled before tail gives the slots back to the producers
        rows = np.empty((pos - self.tail, 7), np.uint64)
        at = 0
        for i0, k in segs:
            np.copyto(rows[at:at + k], self._words[i0:i0 + k])
            at += k
        if segs:
            self.tail = pos
            self._put(rl.OFF_TAIL, self.tail)
            struct.pack_into("<I", self._mv, rl.OFF_HOST_STALLED, 0)  # waiting is worth it
            self._stuck_since = None
        if stuck:
            self._skip_stuck()
        return rows.view(RECORD_DTYPE).reshape(len(rows))

    def _take_checked(self, head: int, now: int) -> int:
        """_take and _process compiled (kernels.c nvsm_take_checked): each record is checked
        while this core has it in cache, instead of in a second pass over the copy. The same
        batches, counters and markers as the numpy path: stretches end every BATCH_RECORDS
        slots and at each marker, everything published is taken (and the producers' tallies
        read) before the first batch is handed on, and each batch's counts are added as it
        goes. Returns the slots taken."""
        k, lts, mark, kc = self._k, self._klast, self._kmark, self._kcounts
        xp = np.asarray(self._anchor_pos, np.float64)
        fp = np.asarray(self._anchor_us, np.float64)
        lts[0] = self._last_ts
        stretches: list[tuple[np.ndarray, np.ndarray, int | None]] = []
        taken = 0
        stuck = False
        while self.tail < head:
            late = self._late_tids()
            kc[:] = 0
            rows = np.empty(min(head - self.tail, BATCH_RECORDS), RECORD_DTYPE)
            used = k.nvsm_take_checked(
                self._slots.ctypes.data, self.layout.slots, self.layout.ptr_size, self._mask,
                self.tail, head, BATCH_RECORDS, rows.ctypes.data, xp.ctypes.data, fp.ctypes.data,
                len(xp), lts.ctypes.data, self._valid_u8.ctypes.data, _KEEP_FLAGS.ctypes.data,
                MAX_STACK_FRAMES, STACK_FRAMES_PER_RECORD, late.ctypes.data, len(late),
                self._seq & 0xFFFFFFFF, kc.ctypes.data, ctypes.byref(self._kkept),
                mark.ctypes.data)
            if not used:
                stuck = True
                break
            kept = self._kkept.value
            self._seq += kept
            self.tail += used
            taken += used
            self._put(rl.OFF_TAIL, self.tail)
            stretches.append((rows[:kept], kc.copy(), int(mark[1]) if mark[0] else None))
            if not mark[0] and used < BATCH_RECORDS and self.tail < head:
                stuck = True  # an unpublished slot
                break
        if taken:
            self._last_ts = int(lts[0])
            struct.pack_into("<I", self._mv, rl.OFF_HOST_STALLED, 0)
            self._stuck_since = None
            self._prune_anchors()
        if stuck:
            self._skip_stuck()
        self._tallies()
        c = self._c
        for recs, counts, at_mark in stretches:
            for i, key in enumerate(("allocs", "frees", "reallocs", "failures",
                                     "bytes_allocated", "published", "unknown_records")):
                c[key] += int(counts[i])
            if len(recs):
                self._send(recs, now)
            if at_mark is not None:  # a marker: its control message goes here, in order
                self._deliver_mark(at_mark)
        return taken

    def _skip_stuck(self) -> None:
        """The slot at tail is reserved but not published. A realloc holds its slot across
        the call, so wait; a thread that died mid-call never publishes: skip it after a while
        (counted as a dropped record of unknown kind, which makes block fates uncertain)."""
        t = time.monotonic()
        if self._stuck_since is None:
            self._stuck_since = t
        elif t - self._stuck_since > STUCK_SLOT_S:
            self.tail += 1
            self._put(rl.OFF_TAIL, self.tail)
            self._c["lost_slots"] += 1
            self._stuck_since = None

    def _process(self, recs: np.ndarray, now: int) -> None:
        first = self.tail - len(recs)
        # the anchors' times never decrease, so neither do the interpolated times; only the
        # first record can fall behind the previous batch's last (a late-published realloc)
        recs["ts_us"] = np.interp(np.arange(first, self.tail, dtype=np.float64),
                                  np.asarray(self._anchor_pos, np.float64),
                                  np.asarray(self._anchor_us, np.float64))
        ts = recs["ts_us"]
        if ts[0] < self._last_ts:
            np.maximum(ts, np.uint64(self._last_ts), out=ts)
        self._last_ts = int(recs["ts_us"][-1])
        self._prune_anchors()
        # kind | hook << 8 of each record, contiguous: read once here instead of strided
        # field by field in every test below (each strided pass streams the whole batch)
        kh = np.ascontiguousarray(recs.view(np.uint16).reshape(len(recs), -1)[:, _KH_WORD])
        marks = np.flatnonzero(kh.view(np.uint8)[::2] == rl.KIND_MARK)
        start = 0
        for m in marks:
            if m > start:
                self._records(recs[start:m], kh[start:m], now)
            self._deliver_mark(int(recs["ptr"][m]))
            start = m + 1
        if start < len(recs):
            self._records(recs[start:], kh[start:], now)

    def _records(self, recs: np.ndarray, kh: np.ndarray, now: int) -> None:
        for i in range(0, len(recs), BATCH_RECORDS):
            self._batch(recs[i:i + BATCH_RECORDS], kh[i:i + BATCH_RECORDS], now)

    def _prune_anchors(self) -> None:
        keep = max(0, int(np.searchsorted(self._anchor_pos, self.tail, side="right")) - 1)
        if keep:
            del self._anchor_pos[:keep]
            del self._anchor_us[:keep]

    def _batch(self, recs: np.ndarray, kh: np.ndarray, now: int) -> None:
        """Valid records of the target's threads on to the consumer (kh: kind | hook << 8 of
        each record), renumbered and counted."""
        valid = self._valid.take(kh)
        stack = kh.view(np.uint8)[::2] == Kind.STACK
        if stack.any():  # a STACK chunk: hook = chunk index, flags = frames in the whole stack
            frames = recs["flags"][stack]
            chunk = recs["hook"][stack].astype(np.uint16)
            valid[stack] &= (frames >= 1) & (frames <= MAX_STACK_FRAMES) \
                & (chunk * STACK_FRAMES_PER_RECORD < frames)
        n_ok = int(np.count_nonzero(valid))
        if n_ok < len(recs):
            self._c["unknown_records"] += len(recs) - n_ok
            recs, kh = recs[valid], kh[valid]
        late = self._late_tids()
        if late.size:
            keep = ~np.isin(recs["tid"], late)
            recs, kh = recs[keep], kh[keep]
        n = len(recs)
        if n == 0:
            return
        recs["seq"] = np.arange(self._seq, self._seq + n, dtype=np.uint64)  # wraps to u32
        self._seq += n
        kind = kh.view(np.uint8)[::2]  # little-endian: the low byte
        recs["flags"] &= _KEEP_FLAGS.take(kind)
        counts = np.bincount(kind, minlength=5)
        c = self._c
        c["allocs"] += int(counts[Kind.ALLOC])
        frees = int(counts[Kind.FREE])
        if frees:  # the free half of a moved realloc is no free call (its REALLOC counts)
            frees -= int(np.count_nonzero(recs["flags"][kind == Kind.FREE] & FLAG_REALLOC_HALF))
        c["frees"] += frees
        c["reallocs"] += int(counts[Kind.REALLOC])
        c["failures"] += int(counts[Kind.FAILED])
        grew = kind == Kind.ALLOC
        if counts[Kind.REALLOC]:
            grew |= (kind == Kind.REALLOC) & (recs["ptr"] != 0)
        c["bytes_allocated"] += int(recs["size"][grew].sum(dtype=np.uint64))
        c["published"] += n
        self._send(recs, now)

    def _late_tids(self) -> np.ndarray:
        """Frida threads found after init: their records are not the target's. Records of a
        thread JS has not classified yet wait for it (CLASSIFY_WAIT_S at most)."""
        ps = self.layout.ptr_size
        need = self._get(rl.OFF_NEW_HEAD)
        deadline = time.monotonic() + CLASSIFY_WAIT_S
        while ((self._get(rl.OFF_NEW_HEAD + ps) - need) & self._mask) > self._mask // 2 \
                and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.001)
            self._beat()
        n_late = min(self._get(rl.OFF_NEW_HEAD + 2 * ps), rl.LATE_TIDS)
        if n_late == 0:
            return np.empty(0, np.uint32)
        words = np.frombuffer(self._mv, dtype=np.dtype(self.layout.word), count=n_late,
                              offset=rl.OFF_LATE_TIDS)
        return (words & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    def _send(self, recs: np.ndarray, now: int) -> None:
        n = len(recs)
        if n and self._inflight_max is not None:
            with self._inflight_cv:
                while (self._inflight_max is not None and self._inflight > 0
                       and self._inflight + n > self._inflight_max):
                    self._inflight_cv.wait(0.01)  # the engine is behind: the ring waits
                    self._beat()
                self._inflight += n
        self._last_emit = time.monotonic()
        self._emit(Batch(now_us=max(now, self._last_ts), counters=self.counters(), records=recs))
