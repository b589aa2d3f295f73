"""The agent's ring as both sides see it (agent/hotpath.c NvShared, docs/format.md "Shared ring").

A header of HEADER_BYTES in 64-byte lines, then `slots` slots of 64 bytes (the 56-byte record and
a publish word). Every position and tally is a word of the TARGET's pointer width (4 bytes in a
32-bit game) that wraps modulo 2^width: the host unwraps them against its own 64-bit copies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..stream.events import RECORD_DTYPE

MAGIC = 0x524D564E  # "NVMR"
VERSION = 1
HEADER_BYTES = 4096
SLOT_SIZE = 64
KIND_MARK = 5  # a marker record: ptr = number of the control message that belongs here

# byte offsets in the header
OFF_HEAD = 64
OFF_TAIL = 128
OFF_DROPS = 192  # drop_n, allocs, frees, reallocs, failures, bytes (words)
OFF_STALLS = 256  # stall_n, stall_us, stall_max_us (words)
OFF_ON_FULL = 320  # u32: 0 drop, 1 wait
OFF_MAX_WAIT_US = 324  # u32
OFF_CLOSING = 328  # u32
OFF_HOST_STALLED = 332  # u32
OFF_HOST_POLLS = 336  # word
OFF_NEW_HEAD = 384  # words: new_head, new_done, n_late
OFF_LATE_TIDS = 512
LATE_TIDS = 32


@dataclass(frozen=True)
class Layout:
    ptr_size: int  # the target's: 4 (ia32) or 8
    slots: int

    @property
    def word(self) -> str:
        return "<I" if self.ptr_size == 4 else "<Q"

    @property
    def wrap(self) -> int:
        return 1 << (8 * self.ptr_size)

    @property
    def bytes(self) -> int:
        return HEADER_BYTES + self.slots * SLOT_SIZE

    def slot_dtype(self) -> np.dtype:
        if self.ptr_size == 8:
            return np.dtype([("rec", RECORD_DTYPE), ("pub", "<u8")])
        return np.dtype([("rec", RECORD_DTYPE), ("pub", "<u4"), ("pad", "<u4")])


def init_header(buf: memoryview | bytearray, layout: Layout, on_full: str,
                max_wait_ms: float) -> None:
    """What the host writes before the agent maps the ring (the rest starts at zero)."""
    struct.pack_into("<IIIIQQ", buf, 0, MAGIC, VERSION, layout.ptr_size, SLOT_SIZE,
                     layout.slots, HEADER_BYTES)
    struct.pack_into("<II", buf, OFF_ON_FULL, 1 if on_full == "wait" else 0,
                     min(0xFFFFFFFF, int(max_wait_ms * 1000)))
