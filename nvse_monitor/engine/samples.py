"""Sampled stacks (issue 11): the agent's STACK chunks attached to their sampled calls, the
sampled blocks still live, and heapprofd-style estimates per stack (docs/attribution.md).

The agent samples allocations by bytes with a Poisson process of mean N = SessionMeta.sample_bytes:
an allocation of s bytes is sampled with probability p = 1 - exp(-s/N), so each sampled one
stands for 1/p allocations and s/p bytes (the Horvitz-Thompson weights heapprofd and tcmalloc
use). Those are *estimates*: only the stacks are sampled; the engine's counts stay exact.

Per batch (the engine's records and events), all vectorised but for the sampled calls:
1. STACK chunks are matched to the same thread's next record with FLAG_SAMPLED (chunks of a
   thread come just before its sampled call's record; a moved realloc's FREE half may come
   between); chunks that a new stack of the thread (its chunk 0) follows first are discarded
   (their call record was dropped). A thread's chunks left at the end of a batch wait for the
   next one.
2. Stacks are interned (raw frames -> id); frames in no known module (the agent's own code)
   are dropped, order kept (frame 0 = innermost).
3. Sampled blocks live now: ptr -> stack, size, weights. Only the events that start or end one
   are visited: the sampled allocations, the next event on each one's pointer, and the first
   event on each pointer that was a sampled block before the batch. They come from the
   engine's grouping of the batch's events by pointer (classify.PointerRuns, which tracking
   sorts anyway), and the last kind from a counting hash filter of the sampled blocks, asked
   once per distinct pointer and exactly only on its hits. So a pointer that a tight loop
   reuses thousands of times per batch costs nothing more. Without the grouping (the tracking
   limit's exact path), and in small batches where it costs more than it saves, the filter is
   asked once per event.
4. Per stack: estimated live bytes/allocations now, at the global live-bytes peak (the events
   of the peak's batch applied up to the peak's index), and allocated bytes/allocations
   (cumulative).
Deterministic: no clocks, no randomness; the same records give the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stream.events import (
    FLAG_REALLOC_HALF,
    FLAG_SAMPLED,
    MAX_STACK_FRAMES,
    STACK_FRAMES_PER_RECORD,
    Kind,
)
from .classify import PointerLinks, PointerRuns
from .modmap import UNKNOWN, ModuleMap

_STACK = int(Kind.STACK)
_FRAME_FIELDS = ("ptr", "old_ptr", "size", "caller")  # a chunk's frames, in order
_HASH = np.uint64(0x9E3779B97F4A7C15)
_MIN_BITS = 16
_SMALL = 48  # chunks + sampled calls in a batch up to which plain Python is faster than numpy
_SMALL_HITS = 256  # filter hits up to which they are checked one by one in Python
_RUNS_MIN = 4096  # events in a batch from which the engine's pointer runs pay (below: filter)
_WINDOW = 32  # records after a stack's last chunk checked at once for its thread's next one
_LOAD = 8  # filter slots per sampled live block at least: at most ~1/8 false hits per event


def weights(size: np.ndarray | float, sample_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, allocations) one sampled allocation of `size` bytes stands for: s/p and 1/p with
    p = 1 - exp(-s/N). Size 0 is never sampled by bytes: weight 1 allocation, 0 bytes."""
    s = np.asarray(size, dtype=np.float64)
    p = -np.expm1(-s / float(sample_bytes))  # 1 - exp(-s/N), exact for small s/N
    count = np.divide(1.0, p, out=np.ones_like(p), where=p > 0)
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


# Contiguous copies of the records' kind and flags (the engine's, from expand_records): each
# strided read of a record field streams the whole batch (56-byte records), these do not.
Columns = tuple[np.ndarray, np.ndarray]


def _next_record_tids(r: np.ndarray, cols: Columns) -> np.ndarray:
    """The thread of each record for the test "did the thread go on before its sampled call's
    record?": a moved realloc's FREE half (FLAG_REALLOC_HALF) comes between that realloc's
    chunks and its REALLOC record, so it belongs to no thread here."""
    kind, flags = cols
    half = (kind == Kind.FREE) & ((flags & FLAG_REALLOC_HALF) != 0)
    tid = r["tid"]
    return np.where(half, np.uint32(0xFFFFFFFF), tid) if half.any() else tid


class _NextTids:
    """_next_record_tids of a slice of the batch, computed when asked: _calls_small looks at a
    few short stretches, where a pass over the whole batch cost more than the rest."""

    def __init__(self, r: np.ndarray, cols: Columns) -> None:
        self._r, (self._kind, self._flags) = r, cols

    def __getitem__(self, s: slice) -> np.ndarray:
        return _next_record_tids(self._r[s], (self._kind[s], self._flags[s]))


class _Filter:
    """A counting hash filter over pointers: slot counts, so removals need no rebuild."""

    def __init__(self, bits: int = _MIN_BITS) -> None:
        self.bits = bits
        self.shift = np.uint64(64 - bits)
        self.counts = np.zeros(1 << bits, np.uint16)  # 8 MiB for 250 K sampled blocks

    def slots(self, p: np.ndarray) -> np.ndarray:
        return ((p * _HASH) >> self.shift).view(np.int64)

    def add(self, ptrs: np.ndarray) -> None:
        if len(ptrs) > 64:
            np.add.at(self.counts, self.slots(ptrs), 1)
        elif len(ptrs):  # ufunc.at costs ~20 µs a call: a few slots by hand
            c = self.counts
            for i in self.slots(ptrs).tolist():
                c[i] += 1

    def remove(self, ptrs: np.ndarray) -> None:
        if len(ptrs) > 64:
            np.subtract.at(self.counts, self.slots(ptrs), 1)
        elif len(ptrs):
            c = self.counts
            for i in self.slots(ptrs).tolist():
                c[i] -= 1

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
        self._frames: set[int] = set()  # every frame of self.stacks (for symbol look-ups)
        self._ids: dict[tuple[int, ...], int] = {}  # frames in known modules -> id
        self._raw: dict[tuple[int, ...], int] = {}  # frames as sent -> id
        # chunks of a stack whose call record has not come yet (a batch ended between them):
        # thread -> their rows (tid, hook, flags, 4 frames), in order
        self._pending: dict[int, np.ndarray] = {}
        # sampled blocks live now: ptr -> (stack id, size, est. bytes, est. allocations, caller)
        self.live: dict[int, tuple[int, int, float, float, int]] = {}
        self._filter = _Filter()
        # per stack id (Python lists: a few updates per sample beat numpy scalars)
        self._live_b: list[float] = []
        self._live_n: list[float] = []
        self._live_k: list[int] = []
        self._alloc_b: list[float] = []
        self._alloc_n: list[float] = []
        self._alloc_k: list[int] = []
        self._peak: tuple[list[float], list[float], list[int]] | None = None
        self.peak_us: int | None = None  # stream time of that peak
        self.sampled_allocations = 0  # sampled calls that allocated
        self.stackless = 0  # of which the stack was lost (dropped chunks): their call site only
        self.discarded_stacks = 0  # chunk runs whose call record never came (dropped)

    # -- results --
    @staticmethod
    def _figures(b: list[float], n: list[float], k: list[int], size: int) -> StackFigures:
        pad = size - len(b)
        return StackFigures(np.array(b + [0.0] * pad), np.array(n + [0.0] * pad),
                            np.array(k + [0] * pad, np.int64))

    def live_now(self) -> StackFigures:
        return self._figures(self._live_b, self._live_n, self._live_k, len(self.stacks))

    def at_peak(self) -> StackFigures:
        """At the first moment the session's live bytes reached their peak (zeros before any
        peak)."""
        p = self._peak or ([], [], [])
        return self._figures(*p, len(self.stacks))

    def allocated(self) -> StackFigures:
        return self._figures(self._alloc_b, self._alloc_n, self._alloc_k, len(self.stacks))

    def frame_addresses(self) -> list[int]:
        """Every distinct frame address of the stacks (for symbol look-ups), sorted."""
        return sorted(self._frames)

    # -- feeding --
    def feed(self, r: np.ndarray, ev_ptr: np.ndarray | None, ev_etype: np.ndarray | None,
             ev_rec: np.ndarray | None, peak_at: int | None, peak_us: int | None = None, *,
             cols: Columns, runs: PointerRuns | PointerLinks | None = None,
             picks: Columns | None = None) -> None:
        """One batch (or run of batches): its records `r`; its events' pointers, types (0 free,
        1 alloc, 2 failure) and record indices (None: one event per record), None when it has no
        events; `peak_at`: the event index where the session's live bytes reached a new peak in
        this batch (None: no new peak), at stream time `peak_us`. From the engine, to spare
        passes over the batch: `cols`, the records' kind and flags; `runs`, its events grouped by
        pointer (classify.PointerRuns or PointerLinks; None on the numpy tracking limit's exact
        path); `picks`, its STACK and SAMPLED records' indices (Events.picks, or None)."""
        # record index, stack id per sampled allocation
        ri, sid = self._sampled_calls(r, cols, picks)
        if ev_ptr is None:
            return
        if peak_at is not None:
            self.peak_us = peak_us
        # sampled allocations -> their events (the alloc part of a realloc is its last event)
        if len(ri):
            ei = ri if ev_rec is None else np.searchsorted(ev_rec, ri, side="right") - 1
            e0 = np.maximum(ei, 0)
            ok = (ei >= 0) & (ev_etype[e0] == 1) & (ev_ptr[e0] != 0)
            if ev_rec is not None:
                ok &= ev_rec[e0] == ri
            ei, ri, sid = ei[ok], ri[ok], sid[ok]
        else:
            ei = ri
        if not self.live and not len(ri):
            if peak_at is not None:
                self._snap_peak()
            return
        live = self.live
        add_p = ev_ptr[ei]
        self._filter.add(add_p)
        if isinstance(runs, PointerLinks):
            todo = self._block_events_links(ei, runs, ev_ptr)
        elif runs is not None and len(ev_ptr) >= _RUNS_MIN:
            todo = self._block_events(ei, runs)
        else:
            # Events on a pointer that may be (or become) a sampled block in this batch: the
            # filter's hits. A few (a live batch): all of them, checked one by one below; many:
            # only those that start or end a sampled block (_relevant: numpy, no loop).
            cand = self._filter.hits(ev_ptr)
            todo = cand if len(cand) <= _SMALL_HITS else self._relevant(ev_ptr, cand, ei, add_p)
        wb, wn = weights(r["size"][ri], self.sample_bytes)
        adds = dict(zip(ei.tolist(), zip(sid.tolist(), r["size"][ri].tolist(), wb.tolist(),
                                         wn.tolist(), r["caller"][ri].tolist(), strict=True),
                        strict=True))
        peaked = peak_at is None
        lb, ln, lk = self._live_b, self._live_n, self._live_k
        gone = []
        for e, p in zip(todo.tolist(), ev_ptr[todo].tolist(), strict=True):
            if not peaked and e > peak_at:
                self._snap_peak()
                peaked = True
            old = live.pop(p, None)
            if old is not None:  # a free, or an allocation over a live block (REPLACE)
                s, _, b, n, _ = old
                gone.append(p)
                lb[s] -= b
                ln[s] -= n
                lk[s] -= 1
            a = adds.get(e)
            if a is not None:
                s, _, b, n, _ = live[p] = a
                lb[s] += b
                ln[s] += n
                lk[s] += 1
                self._alloc_b[s] += b
                self._alloc_n[s] += n
                self._alloc_k[s] += 1
        self.sampled_allocations += len(adds)
        if not peaked:
            self._snap_peak()
        self._filter.remove(np.array(gone, np.uint64))
        self._grow_filter()

    def _block_events(self, ei: np.ndarray, runs: PointerRuns) -> np.ndarray:
        """In event order, exactly the events that start or end a sampled block, from the
        events grouped by pointer: the sampled allocations `ei`, the next event on each one's
        pointer, and the first event on each pointer that was a sampled block before the batch
        (its free, or an allocation over it). Only pointers and sampled calls are looked at,
        not every event: a pointer reused thousands of times in a batch costs nothing more."""
        order, starts = runs.order, runs.starts
        m = len(order)
        parts = [ei]
        if len(ei):
            pos = np.empty(m, np.intp)
            pos[order] = np.arange(m)
            nxt = pos[ei] + 1  # the position after each sampled allocation, in its run...
            run_start = np.zeros(m + 1, bool)
            run_start[starts] = True
            run_start[m] = True
            nxt = nxt[~run_start[nxt]]  # ...unless the next run (pointer) begins there
            parts.append(order[nxt])
        if self.live:
            parts.append(order[starts[self._sampled_before(runs.ptrs)]])
        return np.unique(np.concatenate(parts)) if len(parts) > 1 else ei

    def _block_events_links(self, ei: np.ndarray, links: PointerLinks,
                            ev_ptr: np.ndarray) -> np.ndarray:
        """_block_events from the compiled tracker's links: the same events, looking only at
        the sampled allocations and at each pointer's first event."""
        parts = [ei]
        if len(ei):
            nx = links.next[ei]  # the next event on each sampled allocation's pointer
            parts.append(nx[nx >= 0])
        if self.live:
            firsts = links.firsts
            parts.append(firsts[self._sampled_before(ev_ptr[firsts])])
        return np.unique(np.concatenate(parts)) if len(parts) > 1 else ei

    def _sampled_before(self, ptrs: np.ndarray) -> np.ndarray:
        """Indices of `ptrs` (a batch's first event on each pointer) that were sampled blocks
        before the batch: the filter's hits, checked in the dict."""
        h = self._filter.hits(ptrs)
        if not len(h):
            return h
        return h[np.fromiter(map(self.live.__contains__, ptrs[h].tolist()), bool, len(h))]

    def _relevant(self, ev_ptr: np.ndarray, cand: np.ndarray, ei: np.ndarray,
                  add_p: np.ndarray) -> np.ndarray:
        """Of the filter's hits (event indices), in event order, those that start or end a
        sampled block: checked exactly, then grouped by pointer, an event ends one when the
        pointer's previous event was a sampled allocation or, first in the batch, when the
        pointer was a sampled block before it."""
        live = self.live
        cp = ev_ptr[cand]
        if len(live) > 4 * len(cp):  # many sampled blocks, fewer hits: ask the dict
            in_pre = np.fromiter(map(live.__contains__, cp.tolist()), bool, len(cp))
        else:
            in_pre = np.isin(cp, np.fromiter(live, np.uint64, len(live)))
        hit = in_pre | np.isin(cp, add_p) if len(add_p) else in_pre
        cand, cp, in_pre = cand[hit], cp[hit], in_pre[hit]
        o = np.argsort(cp, kind="stable")
        sp, se = cp[o], cand[o]
        first = np.ones(len(sp), bool)
        np.not_equal(sp[1:], sp[:-1], out=first[1:])
        mark = np.zeros(len(ev_ptr), bool)
        mark[ei] = True
        is_add = mark[se]
        ends = np.zeros(len(sp), bool)
        ends[1:] = is_add[:-1]
        ends &= ~first
        ends |= first & in_pre[o]
        return np.sort(se[ends | is_add])

    def _snap_peak(self) -> None:
        self._peak = (list(self._live_b), list(self._live_n), list(self._live_k))

    def _grow_filter(self) -> None:
        f = self._filter
        if len(self.live) * _LOAD <= len(f.counts):
            return
        bits = max(_MIN_BITS, (len(self.live) * _LOAD * 2 - 1).bit_length())  # load <= 1/16
        self._filter = _Filter(bits)
        self._filter.add(np.fromiter(self.live, np.uint64, len(self.live)))

    # -- chunks -> stacks --
    def _sampled_calls(self, r: np.ndarray, cols: Columns,
                       picks: Columns | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Record indices and stack ids of the batch's sampled calls that allocated, in record
        order; consumes the STACK chunks (those of a call still to come wait in _pending)."""
        none = (np.empty(0, np.int64), np.empty(0, np.int64))
        kind, flags = cols
        if picks is not None:  # the compiled pass found them (Events.picks)
            st, sm = picks
        else:
            st = np.flatnonzero(kind == _STACK)
            sm = np.flatnonzero(flags & FLAG_SAMPLED)
            if len(st) and len(sm):  # a STACK record's flags are its frame count, not SAMPLED
                sm = sm[kind[sm] != _STACK]
        if not len(st) and not len(sm) and not self._pending:
            return none
        if len(st) + len(sm) + sum(len(p) for p in self._pending.values()) <= _SMALL:
            return self._calls_small(r, st, sm, cols)
        tid = r["tid"]
        # Chunk rows: carried ones first (record index -1: before the batch), then the batch's.
        rows = np.empty((len(st), 7), np.uint64)
        rows[:, 0], rows[:, 1], rows[:, 2] = tid[st], r["hook"][st], r["flags"][st]
        for j, f in enumerate(_FRAME_FIELDS):
            rows[:, 3 + j] = r[f][st]
        cidx = st.astype(np.int64)
        if self._pending:
            carried = np.concatenate(list(self._pending.values()))
            rows = np.concatenate((carried, rows))
            cidx = np.concatenate((np.full(len(carried), -1, np.int64), cidx))
            self._pending = {}
        # Elements: chunks and sampled calls, by thread then record order (carried first).
        nc = len(rows)
        e_idx = np.concatenate((cidx, sm.astype(np.int64)))
        e_tid = np.concatenate((rows[:, 0], tid[sm].astype(np.uint64)))
        order = np.lexsort((np.arange(len(e_idx)), e_idx, e_tid))
        e_idx, e_tid = e_idx[order], e_tid[order]
        is_chunk = order < nc
        m = len(order)
        j = np.arange(m)
        same = np.zeros(m, bool)
        np.equal(e_tid[1:], e_tid[:-1], out=same[1:])
        hook = np.full(m, -1, np.int64)
        hook[is_chunk] = rows[order[is_chunk], 1].astype(np.int64)
        # the latest chunk 0 of the thread at or before each element (a stack's start)
        start = np.maximum.accumulate(np.where(is_chunk & (hook == 0), j, -1))
        # ... and the latest element that was not a chunk, or the thread's first element: a
        # stack's chunks are the run from its chunk 0 to the call, all after that
        brk = np.maximum.accumulate(np.where(~is_chunk | ~same, j, -1))
        calls = np.flatnonzero(~is_chunk)
        prev_chunk = np.zeros(len(calls), bool)
        has_prev = calls > 0
        pc = np.maximum(calls - 1, 0)
        prev_chunk[has_prev] = is_chunk[pc[has_prev]] & same[calls[has_prev]]
        s0 = start[pc]
        # a call's chunks: from its thread's latest chunk 0, in the run right before it
        got = prev_chunk & (s0 >= brk[pc])
        # the thread's record right after its last chunk must be the call (else the chunks'
        # call was dropped and this call's own chunks were lost)
        last = e_idx[pc]
        call_rec = e_idx[calls]
        gap = np.flatnonzero(got & (call_rec > last + 1))
        tnext = _next_record_tids(r, cols)
        if len(gap):  # other threads' records in between: is one of them this thread's?
            lo, hi = last[gap] + 1, call_rec[gap]
            w = np.arange(_WINDOW)
            at = np.minimum(lo[:, None] + w, hi[:, None] - 1)  # repeats the last one: harmless
            bad = (tnext[at] == tid[hi][:, None]).any(axis=1)
            for k in np.flatnonzero(hi - lo > _WINDOW).tolist():  # long gaps: the rest
                bad[k] |= bool((tnext[int(lo[k]) + _WINDOW:int(hi[k])] == tid[int(hi[k])]).any())
            got[gap[bad]] = False
        # frames of the calls that got chunks: chunk m of a stack fills frames 4m..4m+3 while
        # the chunks go 0, 1, 2... (a missing one ends the stack: the frames before it stay)
        used = np.zeros(m, bool)
        gk = np.flatnonzero(got)
        frames = np.zeros((len(calls), MAX_STACK_FRAMES), np.uint64)
        if len(gk):
            a0, c0 = s0[gk], calls[gk]
            ok = np.ones(len(gk), bool)
            for mth in range(MAX_STACK_FRAMES // STACK_FRAMES_PER_RECORD):
                at = np.minimum(a0 + mth, m - 1)
                ok &= (a0 + mth < c0) & (hook[at] == mth)
                if not ok.any():
                    break
                frames[gk[ok], 4 * mth:4 * mth + 4] = rows[order[at[ok]], 3:]
            nfr = np.minimum(rows[order[a0], 2], MAX_STACK_FRAMES).astype(np.int64)
            frames[gk] *= np.arange(MAX_STACK_FRAMES) < nfr[:, None]
            # runs from chunk 0 to the call are spent even where a chunk was missing
            d = np.zeros(m + 1, np.int64)
            np.add.at(d, a0, 1)
            np.add.at(d, c0, -1)
            used |= np.cumsum(d[:-1]) > 0
        # which sampled calls allocated (failures and frees by realloc did not)
        kd, sz, pt = kind[call_rec], r["size"][call_rec], r["ptr"][call_rec]
        allocd = ((kd == Kind.ALLOC) | ((kd == Kind.REALLOC) & (sz != 0))) & (pt != 0)
        lost = allocd & ~frames.any(axis=1)  # its chunks were lost: its call site stands
        frames[lost, 0] = r["caller"][call_rec[lost]]
        self.stackless += int(lost.sum())
        out_ri, out_sid = [], []
        raw = self._raw
        keep = np.flatnonzero(allocd)
        keep = keep[np.argsort(call_rec[keep], kind="stable")]  # record order: stack ids do
        for i, row in zip(call_rec[keep].tolist(), frames[keep].tolist(), strict=True):
            key = tuple(row)  # not depend on how batches were cut
            sid = raw.get(key)
            out_ri.append(i)
            out_sid.append(sid if sid is not None else self._intern(key))
        # chunks left: the thread's tail waits for its call, unless its thread went on
        left = is_chunk & ~used
        if left.any():
            tail = np.zeros(m, bool)
            tail[:-1] = ~same[1:]
            tail[-1] = True  # each thread's last element
            for k in np.flatnonzero(tail & left).tolist():
                a = int(start[k])
                if a < brk[k]:
                    continue  # no chunk 0 in the run
                t, e = int(e_tid[k]), int(e_idx[k])
                if (tnext[e + 1:] == t).any():
                    continue  # its thread went on without the call: dropped
                self._pending[t] = rows[order[a:k + 1]]
                left[a:k + 1] = False
            # every run of left chunks, or chunk 0 in one, is a discarded stack
            runs = left & ((hook == 0) | ~np.concatenate(([False], left[:-1] & same[1:])))
            self.discarded_stacks += int(runs.sum())
        if not out_ri:
            return none
        return np.array(out_ri, np.int64), np.array(out_sid, np.int64)

    def _calls_small(self, r: np.ndarray, st: np.ndarray, sm: np.ndarray, cols: Columns
                     ) -> tuple[np.ndarray, np.ndarray]:
        """_sampled_calls for a batch with few chunks and sampled calls (a live batch: a few
        per millisecond): the same steps on Python lists, which beat numpy's per-call cost
        there. Same results (tests/test_samples.py compares both on random streams)."""
        tid = r["tid"]
        tnext = _NextTids(r, cols)
        rows = [tuple(x) for p in self._pending.values() for x in p.tolist()]
        cidx = [-1] * len(rows)
        self._pending = {}
        if len(st):
            cols = [tid[st], r["hook"][st], r["flags"][st], *(r[f][st] for f in _FRAME_FIELDS)]
            rows += list(zip(*(c.tolist() for c in cols), strict=True))
            cidx += st.tolist()
        nc = len(rows)
        e_idx0 = cidx + sm.tolist()
        e_tid0 = [x[0] for x in rows] + tid[sm].tolist()
        order = sorted(range(len(e_idx0)), key=lambda k: (e_tid0[k], e_idx0[k], k))
        m = len(order)
        e_idx = [e_idx0[k] for k in order]
        e_tid = [e_tid0[k] for k in order]
        is_chunk = [k < nc for k in order]
        same = [j > 0 and e_tid[j] == e_tid[j - 1] for j in range(m)]
        hook = [rows[k][1] if k < nc else -1 for k in order]
        start, brk = [0] * m, [0] * m
        s_, b_ = -1, -1
        for j in range(m):
            if is_chunk[j] and hook[j] == 0:
                s_ = j
            if not is_chunk[j] or not same[j]:
                b_ = j
            start[j], brk[j] = s_, b_
        used = [False] * m
        calls = []  # (record index, frames) of the sampled calls that allocated
        kind, size, ptr, caller = r["kind"], r["size"], r["ptr"], r["caller"]
        for j in range(m):
            if is_chunk[j]:
                continue
            i = e_idx[j]
            pc = max(j - 1, 0)
            got = j > 0 and is_chunk[pc] and same[j] and start[pc] >= brk[pc]
            last = e_idx[pc]
            if got and i > last + 1 and bool((tnext[last + 1:i] == tid[i]).any()):
                got = False
            frames = [0] * MAX_STACK_FRAMES
            if got:
                a0 = start[pc]
                for mth in range(MAX_STACK_FRAMES // STACK_FRAMES_PER_RECORD):
                    at = a0 + mth
                    if at >= j or hook[at] != mth:
                        break
                    frames[4 * mth:4 * mth + 4] = rows[order[at]][3:]
                nfr = min(rows[order[a0]][2], MAX_STACK_FRAMES)
                frames[nfr:] = [0] * (MAX_STACK_FRAMES - nfr)
                used[a0:j] = [True] * (j - a0)
            kd = int(kind[i])
            if not ((kd == Kind.ALLOC or (kd == Kind.REALLOC and int(size[i]) != 0))
                    and int(ptr[i]) != 0):
                continue
            if not any(frames):
                frames[0] = int(caller[i])
                self.stackless += 1
            calls.append((i, tuple(frames)))
        left = [c and not u for c, u in zip(is_chunk, used, strict=True)]
        if any(left):
            for j in range(m):
                if not left[j] or (j + 1 < m and same[j + 1]):
                    continue  # not its thread's last element
                a = start[j]
                if a < brk[j]:
                    continue
                t, e = e_tid[j], e_idx[j]
                if bool((tnext[e + 1:] == t).any()):
                    continue
                self._pending[t] = np.array([rows[order[x]] for x in range(a, j + 1)],
                                            np.uint64)
                left[a:j + 1] = [False] * (j + 1 - a)
            self.discarded_stacks += sum(
                1 for j in range(m) if left[j] and (hook[j] == 0 or not (
                    j > 0 and left[j - 1] and same[j])))
        if not calls:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        calls.sort()
        raw = self._raw
        sids = []
        for _, key in calls:
            sid = raw.get(key)
            sids.append(sid if sid is not None else self._intern(key))
        return np.array([i for i, _ in calls], np.int64), np.array(sids, np.int64)

    def _intern(self, raw: tuple[int, ...]) -> int:
        """The id of a stack as sent (MAX_STACK_FRAMES frames, 0 = none)."""
        key = tuple(f for f in raw if f)
        mods = self.modmap.lookup(np.array(key, np.uint64)).tolist() if key else []
        keep = [(f, m) for f, m in zip(key, mods, strict=True) if m != UNKNOWN]
        fk = tuple(f for f, _ in keep)
        sid = self._ids.get(fk)
        if sid is None:
            sid = self._ids[fk] = len(self.stacks)
            self.stacks.append(Stack(fk, tuple(m for _, m in keep)))
            self._frames.update(fk)
            for a in (self._live_b, self._live_n, self._alloc_b, self._alloc_n):
                a.append(0.0)
            self._live_k.append(0)
            self._alloc_k.append(0)
        self._raw[raw] = sid
        return sid


__all__ = ["SampledStacks", "Stack", "StackFigures", "weights"]
