"""The host's ring reader on a mapping it does not trust (no Frida: the reader on its own).

Whatever a buggy or hostile target writes into the shared mapping, the reader counts what it
cannot use ("unknown records") and never crashes, hangs or hands on a record it did not
validate."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvse_monitor import native
from nvse_monitor.capture import ringlayout as rl
from nvse_monitor.capture.reader import RingReader
from nvse_monitor.stream.events import RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import Batch

NHOOKS = 4
_NATIVE = {"on": True}  # which path the next Ring's reader takes (the reader_path fixture)


@pytest.fixture(autouse=True, params=["native", "numpy"])
def reader_path(request):
    """Every test here runs on the compiled reader (nvse_monitor/native) and on its numpy twin.
    An install without the compiled kernels fails the native runs (CI builds them), unless
    NVSE_MONITOR_NATIVE=0 asks for numpy only."""
    if request.param != "numpy":
        if os.environ.get("NVSE_MONITOR_NATIVE") == "0":
            pytest.skip("NVSE_MONITOR_NATIVE=0")
        assert native.KERNELS is not None, native.STATUS
    _NATIVE["on"] = request.param == "native"
    yield request.param
    _NATIVE["on"] = True


class Ring:
    """A ring in plain memory, with a producer written in Python (the agent's protocol)."""

    def __init__(self, ptr_size: int = 8, slots: int = 64,
                 compiled: bool | None = None) -> None:
        self.layout = rl.Layout(ptr_size, slots)
        self.buf = bytearray(self.layout.bytes)
        rl.init_header(self.buf, self.layout, "wait", 1000)
        self.slots = np.frombuffer(self.buf, dtype=self.layout.slot_dtype(), count=slots,
                                   offset=rl.HEADER_BYTES)
        self.head = 0
        self.out: list = []
        self.now = 0
        self.reader = RingReader(self.buf, self.layout, NHOOKS, self.out.append,
                                 lambda: self.now,
                                 compiled=_NATIVE["on"] if compiled is None else compiled)

    def word(self, off: int, v: int) -> None:
        fmt = self.layout.word
        struct.pack_into(fmt, self.buf, off, v & (self.layout.wrap - 1))

    def publish(self, kind: int = Kind.ALLOC, hook: int = 0, ptr: int = 0x1000, size: int = 16,
                tid: int = 7, flags: int = 0) -> None:
        s = self.slots[self.head % self.layout.slots]
        r = np.zeros(1, RECORD_DTYPE)[0]
        r["kind"], r["hook"], r["ptr"], r["size"], r["tid"] = kind, hook, ptr, size, tid
        r["flags"] = flags
        s["rec"] = r
        s["pub"] = (self.head + 1) & (self.layout.wrap - 1)
        self.head += 1
        self.word(rl.OFF_HEAD, self.head)

    def records(self) -> np.ndarray:
        got = [m.records for m in self.out if isinstance(m, Batch)]
        return np.concatenate(got) if got else np.empty(0, RECORD_DTYPE)


@pytest.mark.parametrize("ptr_size", [4, 8])
def test_reads_published_records_in_order_across_wraps(ptr_size):
    ring = Ring(ptr_size)
    for lap in range(5):
        for i in range(50):
            ring.publish(ptr=0x1000 + lap * 100 + i)
        ring.now += 1000
        ring.reader.drain(0.01)
    recs = ring.records()
    assert len(recs) == 250
    assert np.array_equal(recs["ptr"], [0x1000 + lap * 100 + i for lap in range(5)
                                        for i in range(50)])
    assert np.array_equal(recs["seq"], np.arange(250))
    assert np.all(np.diff(recs["ts_us"].astype(np.int64)) >= 0)
    assert ring.reader.counters().published == 250


def test_ia32_positions_wrap_at_32_bits():
    ring = Ring(4, 64)
    start = (1 << 32) - 30  # the target's 32-bit head is about to wrap
    ring.head = start
    ring.reader.tail = start
    ring.reader._anchor_pos = [start]
    ring.word(rl.OFF_HEAD, start)
    ring.word(rl.OFF_TAIL, start)
    for i in range(60):
        ring.publish(ptr=i + 1)
    ring.reader.drain(0.01)
    assert np.array_equal(ring.records()["ptr"], np.arange(1, 61))


def test_unpublished_slot_holds_back_later_records():
    ring = Ring()
    ring.publish(ptr=1)
    ring.head += 1  # a reservation whose record is not published yet (a realloc in flight)
    ring.word(rl.OFF_HEAD, ring.head)
    ring.publish(ptr=3)
    ring.reader.drain(0.01)
    assert list(ring.records()["ptr"]) == [1]
    assert ring.reader.tail == 1


def test_invalid_kinds_and_hooks_are_counted_not_passed_on():
    ring = Ring()
    ring.publish(kind=Kind.ALLOC)
    ring.publish(kind=0)
    ring.publish(kind=9)
    ring.publish(hook=NHOOKS)  # outside the profile
    ring.publish(kind=Kind.FREE)
    ring.reader.drain(0.01)
    assert list(ring.records()["kind"]) == [Kind.ALLOC, Kind.FREE]
    assert ring.reader.counters().unknown_records == 3


def test_late_frida_thread_records_are_filtered():
    ring = Ring()
    ring.word(rl.OFF_NEW_HEAD, 2)  # two threads made first calls...
    ring.word(rl.OFF_NEW_HEAD + 8, 2)  # ...both classified
    ring.word(rl.OFF_NEW_HEAD + 16, 1)  # one is Frida's
    ring.word(rl.OFF_LATE_TIDS, 99)
    ring.publish(tid=7)
    ring.publish(tid=99)
    ring.publish(tid=7)
    ring.reader.drain(0.01)
    assert list(ring.records()["tid"]) == [7, 7]


def test_marker_puts_control_message_in_place():
    ring = Ring()
    ring.publish(ptr=1)
    ring.publish(kind=rl.KIND_MARK, ptr=5)
    ring.publish(ptr=2)
    ring.reader.control(5, "module loaded")  # arrived from Frida's thread
    ring.reader.drain(0.01)
    seq = [m if isinstance(m, str) else list(m.records["ptr"]) for m in ring.out
           if not (isinstance(m, Batch) and len(m.records) == 0)]
    assert seq == [[1], "module loaded", [2]]


def test_drop_and_stall_tallies_unwrap():
    ring = Ring(4)
    ring.word(rl.OFF_DROPS, 5)
    ring.word(rl.OFF_DROPS + 2 * 4, 3)  # frees
    ring.word(rl.OFF_STALLS, 2)
    ring.word(rl.OFF_STALLS + 4, 1500)
    ring.word(rl.OFF_STALLS + 8, 1000)
    c = ring.reader.drain(0.01)
    assert (c.dropped, c.dropped_frees, c.frees) == (5, 3, 3)
    assert (c.stalls, c.stall_us, c.stall_max_us) == (2, 1500, 1000)
    ring.word(rl.OFF_DROPS, 2)  # 32-bit tally wrapped: 2^32 - 5 + 2 more
    assert ring.reader.drain(0.01).dropped == (1 << 32) + 2


def test_heartbeat_and_host_stalled_flag():
    ring = Ring()
    struct.pack_into("<I", ring.buf, rl.OFF_HOST_STALLED, 1)
    polls = ring.reader.polls
    ring.reader.drain(0.01)
    assert ring.reader.polls > polls
    assert struct.unpack_from("<Q", ring.buf, rl.OFF_HOST_POLLS)[0] == ring.reader.polls
    assert struct.unpack_from("<I", ring.buf, rl.OFF_HOST_STALLED)[0] == 1  # nothing taken yet
    ring.publish()
    ring.reader.drain(0.01)
    assert struct.unpack_from("<I", ring.buf, rl.OFF_HOST_STALLED)[0] == 0


def test_final_counts_slots_never_published():
    ring = Ring()
    ring.publish()
    ring.head += 2  # two threads died mid-call
    ring.word(rl.OFF_HEAD, ring.head)
    c = ring.reader.final(0.01)
    assert (c.published, c.dropped, c.dropped_frees) == (1, 2, 2)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.tuples(st.integers(0, 4096 + 64 * 64 - 8), st.binary(min_size=1,
                                                                             max_size=64)),
                        max_size=40),
       records=st.integers(0, 200), ptr_size=st.sampled_from([4, 8]))
def test_fuzzed_mapping_never_breaks_the_reader(garbage, records, ptr_size):
    """Random bytes anywhere in the header and the ring, between honest records: the reader
    neither raises nor hangs, and every record it hands on is valid."""
    ring = Ring(ptr_size)
    for i in range(records):
        ring.publish(ptr=i + 1)
        if i % 50 == 0:
            for off, data in garbage:
                ring.buf[off:off + len(data)] = data[:len(ring.buf) - off]
            ring.reader.drain(0.005)
    ring.reader.final(0.005)
    recs = ring.records()
    assert np.all((recs["kind"] >= Kind.ALLOC) & (recs["kind"] <= Kind.FAILED))
    assert np.all(recs["hook"] < NHOOKS)
    c = ring.reader.counters()
    assert c.published == len(recs)
    assert min(c.dropped, c.stalls, c.unknown_records) >= 0


def test_times_come_from_positions_between_looks():
    """A record's time lies between the last look that did not see it reserved and the first
    that did, also across an idle spell (no per-record clock in the target)."""
    ring = Ring(slots=64)
    ring.now = 1000
    ring.reader.drain(0.005)  # a look at an empty ring
    for i in range(10):
        ring.publish(ptr=i + 1)
    ring.now = 2000
    ring.reader.drain(0.005)  # sees the 10: reserved between 1000 and 2000
    for t in (5000, 9000):  # idle looks
        ring.now = t
        ring.reader.drain(0.005)
    for i in range(10):
        ring.publish(ptr=100 + i)
    ring.now = 10000
    ring.reader.drain(0.005)
    ts = ring.records()["ts_us"].astype(np.int64)
    assert np.all((ts[:10] >= 1000) & (ts[:10] <= 2000))
    assert np.all((ts[10:] >= 9000) & (ts[10:] <= 10000))
    assert np.all(np.diff(ts) >= 0)


def test_a_few_records_wait_for_a_later_look_and_keep_their_times(monkeypatch):
    """A look that finds fewer than PROCESS_MIN_RECORDS new records notes only its time anchor
    (the take's fixed cost dominated at moderate rates); a later look takes them, at most
    PROCESS_WAIT_S after the first that saw them, and their times still come from the looks
    around them. drain() (flush, stop) takes at once; so does a look that finds 1/8 of a small
    ring."""
    import time
    import types

    import nvse_monitor.capture.reader as reader_mod

    clock = [100.0]  # the reader's clock only
    monkeypatch.setattr(reader_mod, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=time.sleep))
    ring = Ring(slots=1024)
    r = ring.reader
    ring.now = 1000
    assert r._poll() == 0  # empty
    for i in range(5):
        ring.publish(ptr=i + 1)
    ring.now = 2000
    assert r._poll() == 0 and not ring.records().size  # left for later, anchor noted
    for i in range(5):
        ring.publish(ptr=10 + i)
    ring.now = 3000
    clock[0] += reader_mod.PROCESS_WAIT_S / 2
    assert r._poll() == 0 and not ring.records().size
    ring.now = 4000
    clock[0] += reader_mod.PROCESS_WAIT_S  # the first of them has waited long enough
    assert r._poll() == 10
    recs = ring.records()
    assert recs["ptr"].tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14]
    ts = recs["ts_us"].astype(np.int64)
    assert np.all((ts[:5] >= 1000) & (ts[:5] <= 2000))  # from the looks around them,
    assert np.all((ts[5:] >= 2000) & (ts[5:] <= 3000))  # not from the look that took them
    ring.publish(ptr=99)
    ring.now = 5000
    r.drain(0.005)  # a flush does not wait
    assert ring.records()["ptr"].tolist()[-1] == 99
    # enough records are taken at the first look that sees them
    monkeypatch.setattr(reader_mod, "PROCESS_MIN_RECORDS", 8)
    for i in range(8):
        ring.publish(ptr=200 + i)
    assert r._poll() == 8
    small = Ring(slots=64)  # 1/8 of it is enough, whatever PROCESS_MIN_RECORDS says
    monkeypatch.setattr(reader_mod, "PROCESS_MIN_RECORDS", 1 << 14)
    for i in range(7):
        small.publish(ptr=300 + i)
    assert small.reader._poll() == 0
    small.publish(ptr=307)
    assert small.reader._poll() == 8


_RECORD = st.tuples(
    st.sampled_from([Kind.ALLOC, Kind.FREE, Kind.REALLOC, Kind.FAILED, Kind.STACK,
                     rl.KIND_MARK, 0, 7, 200]),
    st.integers(0, 6),  # hook: NHOOKS and over are unknown (a STACK's chunk index)
    st.sampled_from([0, 1, 2, 4, 6, 7, 16, 17, 0x8003, 0xFFFF]),  # flags
    st.sampled_from([0, 0x1000, 0x2000, 2**64 - 16]),  # ptr
    st.sampled_from([0, 1, 100, 2**63]),  # size
    st.sampled_from([7, 8, 99]),  # tid (99: a Frida thread)
    st.booleans())  # a reservation left unpublished before it (a thread mid-call)


@pytest.mark.parametrize("reader_path", ["both"], indirect=True)
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=st.lists(_RECORD, max_size=150), ptr_size=st.sampled_from([4, 8]),
       look_every=st.integers(1, 60))
def test_compiled_and_numpy_readers_agree(stream, ptr_size, look_every):
    """The compiled reader hands on the same batches, control messages and counters as the
    numpy one, record for record, whatever the target wrote (garbage kinds, bad STACK chunks,
    markers, a late Frida thread, unpublished slots that are skipped at the end)."""
    rings = [Ring(ptr_size, 256, compiled=True), Ring(ptr_size, 256, compiled=False)]
    for ring in rings:
        ring.word(rl.OFF_NEW_HEAD, 1)
        ring.word(rl.OFF_NEW_HEAD + ptr_size, 1)
        ring.word(rl.OFF_NEW_HEAD + 2 * ptr_size, 1)
        ring.word(rl.OFF_LATE_TIDS, 99)
    for i, (kind, hook, flags, ptr, size, tid, hole) in enumerate(stream):
        for ring in rings:
            if hole:
                ring.head += 1
                ring.word(rl.OFF_HEAD, ring.head)
            ring.publish(kind, hook, ptr, size, tid, flags)
            if kind == rl.KIND_MARK:
                ring.reader.control(ptr, f"mark {ptr}")
            if i % look_every == 0:
                ring.now += 1000
                ring.reader.drain(0.0)
    for ring in rings:
        ring.reader._stuck_since = -1e9  # the holes are skipped at once, not after 2 s
        ring.reader.final(0.0)

    def seen(ring):
        return [(m.records.tobytes(), m.counters) if isinstance(m, Batch) else m
                for m in ring.out if not (isinstance(m, Batch) and len(m.records) == 0)]

    assert seen(rings[0]) == seen(rings[1])
    assert rings[0].reader.counters() == rings[1].reader.counters()
