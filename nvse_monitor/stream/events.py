"""The one binary event record, shared by the agent's ring, the live stream and recordings.

Layout (little-endian, 56 bytes, see docs/format.md). The agent's C code fills it field by
field; pointers are stored as 64-bit even for 32-bit targets so one format serves both.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

RECORD_SIZE = 56


class Kind(IntEnum):
    ALLOC = 1  # ptr = result, size = requested bytes (calloc: n * m)
    FREE = 2  # ptr = block freed (NULL frees are not recorded)
    REALLOC = 3  # old_ptr -> ptr, size = new size; old_ptr 0 = alloc, size 0 = free
    FAILED = 4  # an alloc/calloc/realloc that returned NULL for size > 0
    # 5 is the agent's marker record (capture/reader.py), never seen past the reader
    STACK = 6  # one chunk of a sampled call's stack (issue 11): see STACK_* below


# flags of ALLOC/REALLOC/FAILED records
FLAG_SAMPLED = 0x0001  # this call was sampled: its STACK chunks came just before (same tid)
FLAG_VIA_WRAPPER = 0x0002  # `caller` is the outermost profile wrapper's caller, not the hooked
#                            function's own return address
# the flag of FREE records: the free half of a realloc that moved its block (old_ptr -> ptr
# became FREE old_ptr, published in the realloc's own slot, then REALLOC ptr with old_ptr 0 after
# the call; docs/agent.md "Ordering guarantees"). Not a free call; ptr 0 for realloc(NULL, n).
FLAG_REALLOC_HALF = 0x0004

# A STACK record carries up to STACK_FRAMES_PER_RECORD return addresses in ptr, old_ptr, size,
# caller (in that order; 0 = no frame); hook = chunk index (0, 1, ...); flags = the number of
# frames in the whole stack (every chunk); tid = the sampled call's thread. A sampled call's
# thread publishes its chunks (in order) before the call's own record, which has FLAG_SAMPLED
# (a moved realloc publishes its FREE half between them): the engine attaches the thread's
# latest stack to it, and discards chunks that a new stack of the thread follows first (their
# call record was dropped). Frame 0 is the hooked call's own return address; frames go outwards,
# at most MAX_STACK_FRAMES.
STACK_FRAMES_PER_RECORD = 4
MAX_STACK_FRAMES = 16


RECORD_DTYPE = np.dtype(
    [
        ("ts_us", "<u8"),  # µs since the agent's time zero (monotonic)
        ("ptr", "<u8"),
        ("old_ptr", "<u8"),
        ("size", "<u8"),
        ("caller", "<u8"),  # return address of the hooked call
        ("tid", "<u4"),  # OS thread id of the caller
        ("dur_us", "<u4"),  # call duration, only for size >= large threshold, else 0
        ("kind", "u1"),  # Kind
        ("hook", "u1"),  # index into SessionMeta.hooks
        ("flags", "<u2"),  # FLAG_* (FREE records: FLAG_REALLOC_HALF or 0)
        ("seq", "<u4"),  # agent's ring position (wraps): gaps/dups show transport faults
    ]
)
assert RECORD_DTYPE.itemsize == RECORD_SIZE


def realloc_halves(records: np.ndarray) -> np.ndarray:
    """Which records are the FREE half of a moved realloc (FLAG_REALLOC_HALF): records, not
    calls, so call counts leave them out (the realloc's REALLOC record is the call)."""
    return (records["kind"] == Kind.FREE) & ((records["flags"] & FLAG_REALLOC_HALF) != 0)


def decode_records(buf: bytes | bytearray | memoryview) -> np.ndarray:
    """Records from a raw byte buffer (a live batch's payload). Raises ValueError on a bad size."""
    if len(buf) % RECORD_SIZE:
        raise ValueError(f"record payload of {len(buf)} bytes is not a multiple of {RECORD_SIZE}")
    return np.frombuffer(buf, dtype=RECORD_DTYPE)
