"""A small recorded session with the shared ring's counters (issue 13) for the views' tests:
policy wait, one stall burst, a dropped free (block A's fate uncertain), a later leak (B)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nvse_monitor.stream.events import RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import (
    AgentCounters,
    Batch,
    HookInfo,
    Module,
    SessionEnd,
    SessionMeta,
)
from nvse_monitor.stream.recording import write_recording

EXE = Module("Game.exe", 0x400000, 0x100000)
STALLS, STALL_US, STALL_MAX_US = 250, 1_500_000, 50_000


def _recs(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    a = np.zeros(len(rows), RECORD_DTYPE)
    for i, (kind, ptr, size, ts, caller) in enumerate(rows):
        a[i]["kind"], a[i]["ptr"], a[i]["size"], a[i]["ts_us"] = kind, ptr, size, ts
        a[i]["caller"], a[i]["seq"], a[i]["hook"] = caller, i, 0 if kind == Kind.ALLOC else 1
    return a


def write(path: Path) -> Path:
    meta = SessionMeta("Game.exe", 77, "ia32", "windows", "test",
                       hooks=[HookInfo("malloc", "libc", "alloc"),
                              HookInfo("free", "libc", "free")],
                       modules=[EXE], wall_clock_zero_us=1_700_000_000_000_000,
                       extra={"on_full": "wait", "max_wait_ms": 50})
    lost = dict(dropped=1, dropped_frees=1)
    stalled = dict(stalls=STALLS, stall_us=STALL_US, stall_max_us=STALL_MAX_US)
    msgs = [
        Batch(100_000, AgentCounters(allocs=1, published=1), _recs(
            [(Kind.ALLOC, 0xA000, 40, 50_000, EXE.base + 0x100)])),
        Batch(200_000, AgentCounters(allocs=1, frees=1, published=1, stalls=100,
                                     stall_us=600_000, stall_max_us=STALL_MAX_US, **lost),
              _recs([])),
        Batch(300_000, AgentCounters(allocs=3, frees=2, published=4, **stalled, **lost), _recs(
            [(Kind.ALLOC, 0xB000, 7, 250_000, EXE.base + 0x200),
             (Kind.ALLOC, 0xC000, 9, 260_000, EXE.base + 0x300),
             (Kind.FREE, 0xC000, 0, 270_000, EXE.base + 0x300)])),
        Batch(2_000_000, AgentCounters(allocs=3, frees=2, published=4, **stalled, **lost),
              _recs([])),
    ]
    end = SessionEnd(2_000_000, "target-exited", True, counters=msgs[-1].counters)
    write_recording(path, meta, [*msgs, end])
    return path
