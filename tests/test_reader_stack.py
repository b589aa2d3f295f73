"""The ring reader and issue 11's records (no Frida): STACK chunks pass through validated, call
records keep their SAMPLED / VIA_WRAPPER flags, and nothing is counted differently."""

from __future__ import annotations

import numpy as np
from test_ring_reader import Ring, reader_path  # noqa: F401 (both reader paths)

from nvse_monitor.capture import ringlayout as rl
from nvse_monitor.stream.events import FLAG_SAMPLED, FLAG_VIA_WRAPPER, RECORD_DTYPE, Kind


def publish(ring: Ring, kind: int, hook: int = 0, flags: int = 0, ptr: int = 0x1000,
            size: int = 16, caller: int = 0x4000) -> None:
    s = ring.slots[ring.head % ring.layout.slots]
    r = np.zeros(1, RECORD_DTYPE)[0]
    r["kind"], r["hook"], r["flags"], r["ptr"], r["size"], r["caller"], r["tid"] = \
        kind, hook, flags, ptr, size, caller, 7
    s["rec"] = r
    s["pub"] = (ring.head + 1) & (ring.layout.wrap - 1)
    ring.head += 1
    ring.word(rl.OFF_HEAD, ring.head)


def test_stack_chunks_pass_and_flags_are_kept() -> None:
    ring = Ring(8)
    # a sampled call with 6 frames: two chunks, then its record
    publish(ring, Kind.STACK, hook=0, flags=6, ptr=0x10, size=0x30, caller=0x40)
    publish(ring, Kind.STACK, hook=1, flags=6, ptr=0x50, size=0, caller=0)
    publish(ring, Kind.ALLOC, flags=FLAG_SAMPLED | FLAG_VIA_WRAPPER, size=100)
    publish(ring, Kind.FREE, flags=FLAG_VIA_WRAPPER)  # FREE records carry no flags
    publish(ring, Kind.ALLOC, flags=0x8000 | FLAG_SAMPLED, size=50)  # unknown bits dropped
    ring.reader.drain(0.01)
    recs = ring.records()
    assert recs["kind"].tolist() == [Kind.STACK, Kind.STACK, Kind.ALLOC, Kind.FREE, Kind.ALLOC]
    assert recs["flags"].tolist() == [6, 6, FLAG_SAMPLED | FLAG_VIA_WRAPPER, 0, FLAG_SAMPLED]
    assert recs["hook"].tolist()[:2] == [0, 1]
    assert np.array_equal(recs["seq"], np.arange(5))
    c = ring.reader.counters()
    # the chunks are records handed on, not calls: counts of calls and bytes are unchanged
    assert (c.allocs, c.frees, c.failures, c.bytes_allocated) == (2, 1, 0, 150)
    assert c.published == 5 and c.unknown_records == 0


def test_bad_stack_chunks_are_unknown() -> None:
    ring = Ring(8)
    publish(ring, Kind.STACK, hook=0, flags=0)   # no frames
    publish(ring, Kind.STACK, hook=0, flags=17)  # more than 16 frames
    publish(ring, Kind.STACK, hook=2, flags=8)   # chunk 2 of an 8-frame stack (2 chunks)
    publish(ring, Kind.STACK, hook=1, flags=8)   # fine
    publish(ring, 7)                              # no such kind
    ring.reader.drain(0.01)
    recs = ring.records()
    assert recs["kind"].tolist() == [Kind.STACK] and recs["hook"].tolist() == [1]
    assert ring.reader.counters().unknown_records == 4
