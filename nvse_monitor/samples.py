"""Sampled stacks (issue 11): the agent's STACK chunks attached to their sampled calls, the
sampled blocks still live, and heapprofd-style estimates per stack (docs/attribution.md).

The agent samples allocations by bytes with a Poisson process of mean N = SessionMeta.sample_bytes:
an allocation of s bytes is sampled with probability p = 1 - exp(-s/N), so each sampled one
stands for 1/p allocations and s/p bytes (the Horvitz-Thompson weights heapprofd and tcmalloc
use). Those are *estimates*: only the stacks are sampled; the engine's counts stay exact.

Per batch (the engine's records and events), all vectorised but for the sampled calls:
1. STACK chunks are matched to the same thread's next record (chunks of a thread come just
   before its sampled call's record): kept when that record has FLAG_SAMPLED, discarded when a
   record without it comes first (its call record was dropped). A thread's chunks left at the
   end of a batch wait for the next one.
2. Stacks are interned (raw frames -> id); frames in no known module (the agent's own code)
   are dropped, order kept (frame 0 = innermost).
3. Sampled blocks live now: ptr -> stack, size, weights. Whether an event's pointer is a sampled
   block is first asked of a counting hash filter (one multiply, shift and gather per event),
   exactly only on its hits: cheap when few blocks are sampled, which is the point of sampling.
4. Per stack: estimated live bytes/allocations now, at the global live-bytes peak (the events
   of the peak's batch applied up to the peak's index), and allocated bytes/allocations
   (cumulative).
Deterministic: no clocks, no randomness; the same records give the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .events import FLAG_SAMPLED, MAX_STACK_FRAMES, STACK_FRAMES_PER_RECORD, Kind
from .modmap import UNKNOWN, ModuleMap

_STACK = int(Kind.STACK)
_FRAME_FIELDS = ("ptr", "old_ptr", "size", "caller")  # a chunk's frames, in order
_HASH = np.uint64(0x9E3779B97F4A7C15)
_MIN_BITS = 16
_LOAD = 16  # filter slots per sampled live block at least: ~1/16 false hits per event at most


def weights(size: np.ndarray | float, sample_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, allocations) one sampled allocation of `size` bytes stands for: s/p and 1/p with
    p = 1 - exp(-s/N). Size 0 is never sampled by bytes: weight 1 allocation, 0 bytes."""
    s = np.asarray(size, dtype=np.float64)
    p = -np.expm1(-s / float(sample_bytes))  # 1 - exp(-s/N), exact for small s/N
    with np.errstate(divide="ignore", invalid="ignore"):
        count = np.where(p > 0, 1.0 / np.where(p > 0, p, 1.0), 1.0)
    return s * count, count


@dataclass(frozen=True)
class Stack:
    """One interned stack: return addresses (frame 0 = the allocating call's), each frame's
    module index in the engine's ModuleMap when it was first seen."""

    frames: tuple[int, ...]
    modules: tuple[int, ...]


@dataclass
class StackFigures:
    """Estimates per stack id (float64 arrays indexed by id) and exact sampled counts."""

    bytes: np.ndarray
    allocations: np.ndarray
    sampled: np.ndarray  # int64: sampled allocations (or sampled blocks live)


class _Filter:
    """A counting hash filter over pointers: slot counts, so removals need no rebuild."""

    def __init__(self, bits: int = _MIN_BITS) -> None:
        self.bits = bits
        self.shift = np.uint64(64 - bits)
        self.counts = np.zeros(1 << bits, np.uint32)

    def slots(self, p: np.ndarray) -> np.ndarray:
        return ((p * _HASH) >> self.shift).view(np.int64)

    def add(self, ptrs: list[int]) -> None:
        if ptrs:
            np.add.at(self.counts, self.slots(np.array(ptrs, np.uint64)), 1)

    def remove(self, ptr: int) -> None:
        self.counts[int(self.slots(np.array([ptr], np.uint64))[0])] -= 1

    def hits(self, p: np.ndarray) -> np.ndarray:
        """Indices of `p` that may be in the set (all that are, a few that are not)."""
        return np.flatnonzero(self.counts.take(self.slots(p)))


class SampledStacks:
    """Fed by the engine once per batch (Engine.samples; None when sample_bytes == 0)."""

    def __init__(self, sample_bytes: int, modmap: ModuleMap) -> None:
        if sample_bytes <= 0:
            raise ValueError("sample_bytes must be > 0")
        self.sample_bytes = int(sample_bytes)
        self.modmap = modmap
        self.stacks: list[Stack] = []
        self._ids: dict[tuple[int, ...], int] = {}  # filtered frames -> id
        self._raw: dict[bytes, int] = {}  # raw 16-frame row -> id
        # thread -> (chunk index expected next, frame count, frames so far) of a stack whose
        # call record has not come yet
        self._pending: dict[int, tuple[int, int, list[int]]] = {}
        # sampled blocks live now: ptr -> (stack id, size, est. bytes, est. allocations, caller)
        self.live: dict[int, tuple[int, int, float, float, int]] = {}
        self._filter = _Filter()
        n = 64
        self._live_b = np.zeros(n)
        self._live_n = np.zeros(n)
        self._live_k = np.zeros(n, np.int64)
        self._alloc_b = np.zeros(n)
        self._alloc_n = np.zeros(n)
        self._alloc_k = np.zeros(n, np.int64)
        self._peak: StackFigures | None = None
        self.sampled_allocations = 0  # sampled calls that allocated
        self.stackless = 0  # of which the stack was lost (dropped chunks): their call site only
        self.discarded_stacks = 0  # chunk runs whose call record never came (dropped)

    # -- results --
    def live_now(self) -> StackFigures:
        n = len(self.stacks)
        return StackFigures(self._live_b[:n].copy(), self._live_n[:n].copy(),
                            self._live_k[:n].copy())

    def at_peak(self) -> StackFigures:
        """At the first moment the session's live bytes reached their peak (empty before any
        peak with samples)."""
        n = len(self.stacks)
        p = self._peak
        if p is None:
            return StackFigures(np.zeros(n), np.zeros(n), np.zeros(n, np.int64))
        pad = n - len(p.bytes)
        return StackFigures(np.pad(p.bytes, (0, pad)), np.pad(p.allocations, (0, pad)),
                            np.pad(p.sampled, (0, pad)))

    def allocated(self) -> StackFigures:
        n = len(self.stacks)
        return StackFigures(self._alloc_b[:n].copy(), self._alloc_n[:n].copy(),
                            self._alloc_k[:n].copy())

    def frame_addresses(self) -> list[int]:
        """Every distinct frame address of the stacks (for symbol look-ups), sorted."""
        return sorted({a for s in self.stacks for a in s.frames})

    # -- feeding --
    def feed(self, r: np.ndarray, ev_ptr: np.ndarray | None, ev_etype: np.ndarray | None,
             ev_rec: np.ndarray | None, peak_at: int | None) -> None:
        """One batch (or run of batches): its records `r`; its events' pointers, types (0 free,
        1 alloc, 2 failure) and record indices (None: one event per record), None when it has no
        events; `peak_at`: the event index where the session's live bytes reached a new peak in
        this batch (None: no new peak)."""
        kind = r["kind"]
        new = self._sampled_calls(r, kind)  # (record index, stack id) per sampled allocation
        if ev_ptr is None:
            return
        # sampled allocations -> their events (the alloc part of a realloc is its last event)
        if new:
            ri = np.array([x[0] for x in new], np.int64)
            ei = ri if ev_rec is None else np.searchsorted(ev_rec, ri, side="right") - 1
            ok = (ei >= 0) & (ev_etype[np.maximum(ei, 0)] == 1)
            ok &= ev_ptr[np.maximum(ei, 0)] != 0
            if ev_rec is not None:
                ok &= ev_rec[np.maximum(ei, 0)] == ri
            sid = [x[1] for x in new]
            adds = {int(e): s for e, s, k in zip(ei.tolist(), sid, ok.tolist(), strict=True) if k}
        else:
            adds = {}
        if not self.live and not adds:
            if peak_at is not None:
                self._snap_peak()
            return
        if adds:
            self._filter.add([int(ev_ptr[e]) for e in adds])
        # events that may end a sampled block: frees, and allocations over a live one
        cand = self._filter.hits(ev_ptr)
        ptrs = ev_ptr[cand].tolist()
        batch_new = {int(ev_ptr[e]) for e in adds}
        live = self.live
        todo = sorted({int(i) for i, p in zip(cand.tolist(), ptrs, strict=True)
                       if p in live or p in batch_new} | set(adds))
        if adds:
            size = r["size"]
            sizes = {e: int(size[e if ev_rec is None else int(ev_rec[e])]) for e in adds}
            caller = r["caller"]
            callers = {e: int(caller[e if ev_rec is None else int(ev_rec[e])]) for e in adds}
        peaked = peak_at is None
        for e in todo:
            if not peaked and e > peak_at:
                self._snap_peak()
                peaked = True
            p = int(ev_ptr[e])
            old = live.pop(p, None)
            if old is not None:  # a free, or an allocation over a live block (REPLACE)
                self._filter.remove(p)
                self._live_b[old[0]] -= old[2]
                self._live_n[old[0]] -= old[3]
                self._live_k[old[0]] -= 1
            s = adds.get(e)
            if s is not None:
                self._add(p, s, sizes[e], callers[e])
        if not peaked:
            self._snap_peak()
        self._grow_filter()

    def _add(self, p: int, s: int, size: int, caller: int) -> None:
        wb, wn = weights(size, self.sample_bytes)
        wb, wn = float(wb), float(wn)
        self.live[p] = (s, size, wb, wn, caller)
        self._live_b[s] += wb
        self._live_n[s] += wn
        self._live_k[s] += 1
        self._alloc_b[s] += wb
        self._alloc_n[s] += wn
        self._alloc_k[s] += 1
        self.sampled_allocations += 1

    def _snap_peak(self) -> None:
        n = len(self.stacks)
        self._peak = StackFigures(self._live_b[:n].copy(), self._live_n[:n].copy(),
                                  self._live_k[:n].copy())

    def _grow_filter(self) -> None:
        f = self._filter
        if len(self.live) * _LOAD <= len(f.counts):
            return
        bits = max(_MIN_BITS, (len(self.live) * _LOAD * 2 - 1).bit_length())
        self._filter = _Filter(bits)
        self._filter.add(list(self.live))

    # -- chunks -> stacks --
    def _sampled_calls(self, r: np.ndarray, kind: np.ndarray) -> list[tuple[int, int]]:
        """(record index, stack id) of each sampled call of the batch that allocated, in record
        order; consumes the STACK chunks."""
        flags = r["flags"]
        st = np.flatnonzero(kind == _STACK)
        sm = np.flatnonzero(flags & FLAG_SAMPLED)
        if len(sm) and len(st):
            sm = sm[kind[sm] != _STACK]  # a STACK record's flags are its frame count
        if not len(st) and not len(sm) and not self._pending:
            return []
        tid = r["tid"]
        out: list[tuple[int, int]] = []
        # The records that matter, in order: chunks and sampled calls. A chunk run of a thread
        # ends at its thread's next record; with records of other threads in between, whether
        # that is a sampled call is checked on the thread's positions in the batch.
        idx = np.concatenate((st, sm))
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        is_chunk = order < len(st)
        tids = tid[idx].tolist()
        pos_of: dict[int, np.ndarray] = {}  # thread -> its record indices in this batch

        def positions(t: int) -> np.ndarray:
            p = pos_of.get(t)
            if p is None:
                p = pos_of[t] = np.flatnonzero(tid == t)
            return p

        last: dict[int, int] = {}  # thread -> record index of its latest chunk (-1: carried)
        for t in self._pending:
            last[t] = -1
        for i, ch, t in zip(idx.tolist(), is_chunk.tolist(), tids, strict=True):
            pend = self._pending.get(t)
            if pend is not None and not self._next_is(positions, t, last[t], i):
                self.discarded_stacks += 1
                pend = None
                del self._pending[t]
            if ch:
                self._chunk(r, i, t, pend)
                last[t] = i
                continue
            frames = None
            if pend is not None:
                frames = pend[2][:pend[1]]
                del self._pending[t]
            k = int(kind[i])
            if k == Kind.FAILED or (k == Kind.REALLOC and (int(r["size"][i]) == 0
                                                           or int(r["ptr"][i]) == 0)):
                continue  # allocated nothing
            if k not in (Kind.ALLOC, Kind.REALLOC):
                continue
            if not frames:  # its chunks were lost: its call site stands for the stack
                self.stackless += 1
                frames = [int(r["caller"][i])]
            out.append((i, self._intern(frames)))
        # chunks whose thread went on without a sampled call in this batch: discarded now
        for t in list(self._pending):
            p = positions(t)
            if len(p) and int(p[-1]) > last.get(t, -1):
                self.discarded_stacks += 1
                del self._pending[t]
        return out

    @staticmethod
    def _next_is(positions, t: int, after: int, at: int) -> bool:  # noqa: ANN001
        """Whether record `at` is thread t's next record after record `after` (-1: from the
        batch's start)."""
        if at == after + 1:
            return True
        p = positions(t)
        a = int(np.searchsorted(p, after, side="right"))
        return a < len(p) and int(p[a]) == at

    def _chunk(self, r: np.ndarray, i: int, t: int,
               pend: tuple[int, int, list[int]] | None) -> None:
        rec = r[i]
        ci, nframes = int(rec["hook"]), min(int(rec["flags"]), MAX_STACK_FRAMES)
        frames = [int(rec[f]) for f in _FRAME_FIELDS]
        if ci == 0:
            if pend is not None:
                self.discarded_stacks += 1
            self._pending[t] = (1, nframes, frames)
        elif pend is not None and pend[0] == ci and ci * STACK_FRAMES_PER_RECORD < pend[1]:
            self._pending[t] = (ci + 1, pend[1], pend[2] + frames)
        elif pend is not None:  # a chunk went missing: keep the frames before it
            self._pending[t] = (-1, len(pend[2]), pend[2])
        else:  # a run without its first chunk: nothing to attach it to
            self.discarded_stacks += 1

    def _intern(self, frames: list[int]) -> int:
        raw = np.zeros(MAX_STACK_FRAMES, np.uint64)
        frames = [f for f in frames[:MAX_STACK_FRAMES] if f]
        raw[:len(frames)] = frames
        key = raw.tobytes()
        sid = self._raw.get(key)
        if sid is not None:
            return sid
        mods = self.modmap.lookup(raw[:len(frames)]).tolist() if frames else []
        keep = [(f, m) for f, m in zip(frames, mods, strict=True) if m != UNKNOWN]
        fk = tuple(f for f, _ in keep)
        sid = self._ids.get(fk)
        if sid is None:
            sid = self._ids[fk] = len(self.stacks)
            self.stacks.append(Stack(fk, tuple(m for _, m in keep)))
            if sid >= len(self._live_b):
                self._grow_arrays()
        self._raw[key] = sid
        return sid

    def _grow_arrays(self) -> None:
        n = 2 * len(self._live_b)
        for name in ("_live_b", "_live_n", "_live_k", "_alloc_b", "_alloc_n", "_alloc_k"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate((a, np.zeros(n - len(a), a.dtype))))


__all__ = ["SampledStacks", "Stack", "StackFigures", "weights"]
