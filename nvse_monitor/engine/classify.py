"""Per-batch event classification, vectorised (docs/engine.md, "Events" and "Counters").

Records become events by lookup tables on a 6-bit record code; events are grouped by pointer
with a stable sort of a pointer hash; each event's outcome (NEW, REPLACE, FREE_T, FREE_U...)
follows from the previous event on its pointer or, for the first one, from the live table.
The engine adds the tracking limit, the running sums and the outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import native
from ..stream.events import RECORD_DTYPE, Kind
from .tracking import MAX_LOAD, LiveColumns, LiveTable

# Outcome of one event (after realloc expansion).
NEW = 1  # allocation, now tracked
REPLACE = 2  # allocation of a pointer already live: the old block counts as freed unseen
OVERFLOW = 3  # allocation while tracking is full: counted in totals, not tracked
FREE_T = 4  # free of a tracked block
FREE_U = 5  # free of a pointer not tracked (allocated before attach, double free, overflow)
FAILURE = 6  # allocation that returned NULL

_ALLOC, _FREE, _REALLOC, _FAILED = (int(k) for k in (Kind.ALLOC, Kind.FREE, Kind.REALLOC,
                                                   Kind.FAILED))
_STACK = int(Kind.STACK)  # a sampled call's stack chunk: no event, not unknown (samples.py)


def _record_tables() -> tuple[np.ndarray, ...]:
    """Per record code (kind 0-7, ptr = 0 << 3, size = 0 << 4, old_ptr = 0 << 5): number of
    events, type of the first (0 free, 1 alloc, 2 failure), whether that free is of old_ptr,
    whether it is a failure, whether the kind is unknown. Rules in docs/engine.md."""
    # cnt is intp: np.repeat takes intp counts ~6x faster than int8 ones.
    cnt, etype, free_old, fail, unknown = (np.zeros(64, dt) for dt in (
        np.intp, np.int8, bool, bool, bool))
    for c in range(64):
        kind, zp, zs, zo = c & 7, c >> 3 & 1, c >> 4 & 1, c >> 5 & 1
        allocish = kind == _ALLOC or (kind == _REALLOC and not zs)
        f = kind == _FAILED or (allocish and zp)
        a = allocish and not zp
        fr = (kind == _FREE and not zp) or (kind == _REALLOC and not zo and not f)
        cnt[c] = a + fr + f
        etype[c] = 2 if f else (0 if fr else 1)
        free_old[c] = kind == _REALLOC and fr
        fail[c] = f
        unknown[c] = kind not in (_ALLOC, _FREE, _REALLOC, _FAILED, _STACK)
    return cnt, etype, free_old, fail, unknown


T_CNT, T_ETYPE, T_FREE_OLD, T_FAIL, T_UNKNOWN = _record_tables()

# Per outcome (index = outcome code): tracked bytes added, block freed, allocation counted,
# change of the live count.
O_PLUS = np.array([0, 1, 1, 0, 0, 0, 0], dtype=bool)
O_FREE = np.array([0, 0, 1, 0, 1, 0, 0], dtype=bool)
O_ALLOC = np.array([0, 1, 1, 1, 0, 0, 0], dtype=bool)
O_DCOUNT = np.array([0, 1, 0, 0, -1, 0, 0], dtype=np.int8)
# Outcome from (is alloc, block live before): 0b00 free of dead, 0b01 free of live, ...
O_FROM = np.array([FREE_U, FREE_T, NEW, REPLACE], dtype=np.uint8)


@dataclass
class Events:
    """A batch's records as events, in time order (ptr is None when there are none)."""

    ptr: np.ndarray | None  # u64; the freed pointer for frees, 0 for failures
    etype: np.ndarray  # int8: 0 free, 1 alloc, 2 failure
    ts: np.ndarray  # u64, clamped so time never goes backwards
    size: np.ndarray
    hook: np.ndarray
    caller: np.ndarray
    rec: np.ndarray | None  # record of each event (None: one event per record)
    failed: np.ndarray | None  # bool mask of failures (None: no failures)
    unknown: int  # records of unknown kinds
    last_ts: int
    rec_ts: np.ndarray | None = None  # per record, clamped: the time reached after each
    kind: np.ndarray | None = None  # per record (contiguous copies, for samples.py)
    flags: np.ndarray | None = None
    # the STACK records and the other SAMPLED ones, by record index (the compiled pass finds
    # them on its way; samples.py looks for them itself without)
    picks: tuple[np.ndarray, np.ndarray] | None = None


_FIELDS = ("ptr", "size", "ts_us", "caller", "hook", "kind", "flags")
_CHUNK = 8192  # records per slice in _columns: 448 KiB, well inside a core's L2 cache


def _columns(r: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """Contiguous copies of record fields (read several times here and in the engine: each
    pass over a 56-byte-strided field streams the whole batch). Copied a cache-sized slice at
    a time, so that only the first field of a slice comes from memory (~1.5x faster)."""
    n = len(r)
    if n <= _CHUNK:
        return [np.ascontiguousarray(r[f]) for f in names]
    out = [np.empty(n, r.dtype[f]) for f in names]
    for i in range(0, n, _CHUNK):
        s = r[i:i + _CHUNK]
        for o, f in zip(out, names, strict=True):
            o[i:i + _CHUNK] = s[f]
    return out


def expand_records(r: np.ndarray, now: int, floor: np.ndarray | None = None) -> Events:
    """Records -> events: a realloc becomes free(old) then alloc(new); the rest one event or
    none (rules in docs/engine.md). `now`: the stream time already reached; `floor`: a
    per-record lower bound on time (the times of the batches before a record's batch)."""
    n = len(r)
    if native.KERNELS is not None and n and r.dtype == RECORD_DTYPE and r.flags.c_contiguous:
        return _expand_native(r, now, floor)
    ptr, size, ts, caller, hook, kind, flags = _columns(r, _FIELDS)
    # publication order: keep output time monotonic
    if floor is not None:
        np.maximum(ts, floor, out=ts)
    if not (ts[1:] >= ts[:-1]).all():
        ts = np.maximum.accumulate(ts)
    if ts[0] < now:
        ts = np.maximum(ts, np.uint64(now))
    # A 6-bit code per record (kind, ptr = 0, size = 0, old_ptr = 0) and lookup tables give
    # its events in a few passes.
    code = np.minimum(kind, 7)  # 7: every kind past STACK (unknown)
    code |= (ptr == 0).view(np.uint8) << 3
    code |= (size == 0).view(np.uint8) << 4
    counts = np.bincount(code, minlength=64)
    any_r = bool(counts[_REALLOC::8].any())
    old = ptr[:0]
    if any_r:  # the old_ptr bit only matters for reallocs (the tables ignore it elsewhere)
        old = r["old_ptr"]
        code |= (old == 0).view(np.uint8) << 5
        counts = np.bincount(code, minlength=64)
    unknown = int(counts[T_UNKNOWN].sum())
    last_ts = int(ts[-1])
    # Lookups by .take(): much faster than fancy indexing with a small-int index array.
    if not counts[T_CNT != 1].any():  # one event per record
        rec = None
        etype = T_ETYPE.take(code)
        evp = np.where(T_FREE_OLD.take(code), old, ptr) if any_r else ptr
    else:
        rec = np.repeat(np.arange(n), T_CNT.take(code))
        if not len(rec):
            return Events(None, etype=np.empty(0, np.int8), ts=ts, size=size, hook=hook,
                          caller=caller, rec=rec, failed=None, unknown=unknown,
                          last_ts=last_ts, rec_ts=ts, kind=kind, flags=flags)
        second = np.zeros(len(rec), dtype=bool)  # the alloc part of a realloc
        np.equal(rec[1:], rec[:-1], out=second[1:])
        crec = code.take(rec)
        etype = T_ETYPE.take(crec)
        etype[second] = 1
        evp = ptr.take(rec)
        if any_r:
            fo = T_FREE_OLD.take(crec)
            fo &= ~second
            fi = np.flatnonzero(fo)
            evp[fi] = old[rec[fi]]

    def g(a: np.ndarray) -> np.ndarray:
        return a if rec is None else a.take(rec)  # take: ~1.3x fancy indexing

    failed = None
    if counts[T_FAIL].any():  # failures ride along as frees of pointer 0 (never tracked)
        failed = etype == 2
        evp = np.where(failed, np.uint64(0), evp)
    return Events(evp, etype, g(ts), g(size), g(hook), g(caller), rec, failed,
                  unknown, last_ts, ts, kind, flags)


_T_NATIVE = (T_CNT.astype(np.int64), T_ETYPE, T_FREE_OLD.view(np.uint8),
             T_UNKNOWN.view(np.uint8))


def _expand_native(r: np.ndarray, now: int, floor: np.ndarray | None) -> Events:
    """expand_records in one compiled pass (kernels.c nvsm_expand): the same Events."""
    n = len(r)
    ts, kind, flags = np.empty(n, np.uint64), np.empty(n, np.uint8), np.empty(n, np.uint16)
    cap = 2 * n  # a realloc makes two events
    rec = np.empty(cap, np.int64)  # kernels.c writes int64 (intp on 64-bit Pythons)
    etype = np.empty(cap, np.int8)
    evp, ev_ts, ev_size, ev_caller = (np.empty(cap, np.uint64) for _ in range(4))
    ev_hook = np.empty(cap, np.uint8)
    st, sm = np.empty(n, np.int64), np.empty(n, np.int64)
    out = np.zeros(6, np.uint64)
    if floor is not None:
        floor = np.ascontiguousarray(floor, np.uint64)
    a = [x.ctypes.data for x in (ts, kind, flags, *_T_NATIVE, rec, etype, evp, ev_ts, ev_size,
                                 ev_hook, ev_caller, st, sm, out)]
    native.KERNELS.nvsm_expand(r.ctypes.data, n, now,
                               None if floor is None else floor.ctypes.data, *a)
    unknown, all_one, any_fail, m, nst, nsm = (int(x) for x in out)
    last_ts = int(ts[-1])
    picks = (st[:nst], sm[:nsm])
    if not m:
        return Events(None, etype=np.empty(0, np.int8), ts=ts, size=r["size"].copy(),
                      hook=r["hook"].copy(), caller=r["caller"].copy(), rec=rec[:0],
                      failed=None, unknown=unknown, last_ts=last_ts, rec_ts=ts, kind=kind,
                      flags=flags, picks=picks)
    etype = etype[:m]
    failed = etype == 2 if any_fail else None
    # one event per record: the events' times are the records' (one array, as numpy's)
    return Events(evp[:m], etype, ts if all_one else ev_ts[:m], ev_size[:m], ev_hook[:m],
                  ev_caller[:m], None if all_one else rec[:m], failed, unknown, last_ts, ts,
                  kind, flags, picks)


HASH = np.uint64(0x9E3779B97F4A7C15)
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


def _order_packed(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of 32-bit hashes, and the hashes in that order: one sort of u64 keys
    (hash << 32 | index; ties by index, so stable). numpy sorts u64 with SIMD where the CPU
    has it (AVX2 since numpy 2.0, AVX-512 since 1.25): ~2x faster than the radix passes."""
    key = h << _S32
    key |= np.arange(len(h), dtype=np.uint64)
    key.sort()
    return (key & _LOW32).astype(np.intp), key >> _S32


def _order_radix(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same by two stable 16-bit radix argsorts (numpy sorts 16-bit keys by radix on every
    CPU): the faster one where u64 sorts have no SIMD (numpy 1.26 without AVX-512: ~3x)."""
    w = h.view(np.uint16).reshape(-1, 4)
    o = np.argsort(w[:, 0], kind="stable")
    o = o[np.argsort(w[:, 1].take(o), kind="stable")]
    return o, h.take(o)


_hash_order = None  # the faster of the two on this machine (same results), chosen on first use


def _pick_hash_order() -> None:
    global _hash_order
    h = np.random.default_rng(0).integers(0, 1 << 32, 1 << 14, dtype=np.uint64)
    best = float("inf")
    for f in (_order_packed, _order_radix):
        f(h)  # warm-up: first calls fault pages in
    for f in (_order_packed, _order_radix):
        t = time.perf_counter()
        for _ in range(3):
            f(h)
        t = time.perf_counter() - t
        if t < best:
            best, _hash_order = t, f


def pointer_order(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable order that makes events on one pointer contiguous (in time order), and p in
    that order. Sorts a 32-bit hash of the pointer (see _order_packed, _order_radix); pointers
    whose hashes collide are put right by an exact sort of just their runs."""
    n = len(p)  # < 2**32: a batch is far smaller
    if _hash_order is None:
        _pick_hash_order()
    order, hs = _hash_order((p * HASH) >> _S32)
    sp = p.take(order)
    if n < 2:
        return order, sp
    same_h = hs[1:] == hs[:-1]
    coll = same_h & (sp[1:] != sp[:-1])
    if coll.any():
        run = np.concatenate(([0], np.cumsum(~same_h)))
        bad = np.zeros(int(run[-1]) + 1, dtype=bool)
        bad[run[1:][coll]] = True
        sel = np.flatnonzero(bad[run])
        sub = order[sel]
        order[sel] = sub[np.lexsort((sub, p[sub], hs[sel]))]
        sp = p[order]
    return order, sp


@dataclass(frozen=True)
class PointerRuns:
    """The events of a run grouped by pointer: `order` lists event indices pointer by pointer,
    each pointer's in time order; its runs begin at positions `starts`, on pointers `ptrs`.
    (samples.py finds the events that start or end a sampled block with it.)"""

    order: np.ndarray
    starts: np.ndarray
    ptrs: np.ndarray


@dataclass(frozen=True)
class PointerLinks:
    """The same grouping as runs, as the compiled tracker gives it (kernels.c nvsm_track): each
    event's next event on its pointer in the batch (-1 for a pointer's last), and the events
    that are the first on their pointer in the batch, in order."""

    next: np.ndarray  # int64
    firsts: np.ndarray  # int64


def classify(table: LiveTable, p, isalloc, size, ts, caller, hook, mod):  # noqa: ANN001, ANN201
    """Outcomes of a run of events assuming no tracking limit, without touching the table.
    Events on one pointer are consecutive after a stable sort by pointer; an event's block
    state is the previous event's (an alloc leaves it live, a free leaves it not) or, for the
    first event of a pointer, whether the table holds it. Also returns the plan for
    apply_plan and the grouping (PointerRuns)."""
    m = len(p)
    order, sp = pointer_order(p)
    first = np.empty(m, dtype=bool)
    first[0] = True
    np.not_equal(sp[1:], sp[:-1], out=first[1:])
    gstart = np.flatnonzero(first)
    up = sp[gstart]
    probe = table.probe(up)  # pointer 0 (failures) is never live:
    if up[0] == 0:  # it hashes to 0 and sorts first
        probe.slots[0] = -1
    slots = probe.slots
    found = slots >= 0
    sa = isalloc.take(order)
    live = np.empty(m, dtype=bool)
    live[1:] = sa[:-1]
    live[gstart] = found
    out = np.empty(m, np.uint8)
    out[order] = O_FROM.take((sa.view(np.uint8) << 1) | live.view(np.uint8))
    # The block a free or replacement ends: the previous event's (an alloc), or the table's
    # for the first event of a pointer. Only those events need it.
    li = np.flatnonzero(live)
    src = order.take(li - 1)  # li = 0 wraps to garbage: it is a group start, overwritten below
    vz, vh, vm = size.take(src), hook.take(src), mod.take(src)  # take: ~1.3x fancy indexing
    fl = first[li]
    if fl.any():
        tv = table.get_values(slots[found])  # the keys are known: read only the values
        vz[fl] = tv["size"]
        vh[fl] = tv["hook"]
        vm[fl] = tv["module"]
    tl = order.take(li)
    osz = np.zeros(m, np.uint64)
    osz[tl] = vz
    ohk = np.zeros(m, np.uint8)
    ohk[tl] = vh
    omd = np.zeros(m, np.uint16)
    omd[tl] = vm
    glast = np.empty(len(gstart), dtype=np.intp)
    glast[:-1] = gstart[1:] - 1
    glast[-1] = m - 1
    plan = (up, probe, found, sa[glast], order[glast])
    return out, osz, ohk, omd, plan, PointerRuns(order, gstart, up)


def apply_plan(table: LiveTable, plan, size, ts, caller, hook, mod) -> None:  # noqa: ANN001
    """Make the table match the end of the classified run."""
    keys, probe, found, fin, last = plan
    slots = probe.slots
    upd = found & fin
    if upd.any():
        li = last[upd]
        table.write(slots[upd], LiveColumns(keys[upd], size[li], ts[li], caller[li], hook[li],
                                        mod[li]))
    dele = found & ~fin
    if dele.any():
        table.delete(slots[dele])
    ins = ~found & fin
    if ins.any():
        li = last[ins]
        ii = np.flatnonzero(ins)
        table.insert(LiveColumns(keys[ii], size[li], ts[li], caller[li], hook[li], mod[li]),
                 hint=probe.take(ii))


def track_compiled(table: LiveTable, cap: int, p, isalloc, size, ts, caller, hook,  # noqa: ANN001
                   mod) -> tuple:  # noqa: ANN001
    """classify + apply_plan in compiled code (kernels.c nvsm_track): each event in time order
    against the table, with the tracking limit `cap` (OVERFLOW past it, as the engine's exact
    path). Inserts that need the table grown or a cuckoo move are the table's own (numpy), then
    the loop goes on. Returns outcome, old size/hook/module, and PointerLinks."""
    ms = len(p)
    c = [np.ascontiguousarray(a, dt) for a, dt in (
        (p, np.uint64), (isalloc, bool), (size, np.uint64), (ts, np.uint64),
        (caller, np.uint64), (hook, np.uint8), (mod, np.uint16))]
    out, osz = np.empty(ms, np.uint8), np.empty(ms, np.uint64)
    ohk, omd = np.empty(ms, np.uint8), np.empty(ms, np.uint16)
    nxt, firsts = np.empty(ms, np.int64), np.empty(ms, np.int64)
    n_firsts = np.zeros(1, np.uint64)
    bn = 1 << max(4, (2 * ms - 1).bit_length())  # the batch's pointer map: load <= 1/2
    bkeys, blast = np.zeros(bn, np.uint64), np.empty(bn, np.int64)
    cnt = np.zeros(1, np.uint64)
    outs = [a.ctypes.data for a in (out, osz, ohk, omd, bkeys, blast)]
    cols = [a.ctypes.data for a in c]
    e = 0
    while e < ms:
        cnt[0] = table.count
        # the table's arrays move when it grows: their addresses are read at each call
        e = native.KERNELS.nvsm_track(
            e, ms, *cols, table.keys.ctypes.data, table.fp.ctypes.data, table.vals.ctypes.data,
            table.nbuckets, cnt.ctypes.data, int(MAX_LOAD * table.slots), cap, *outs, bn - 1,
            nxt.ctypes.data, firsts.ctypes.data, n_firsts.ctypes.data)
        table.count = int(cnt[0])
        if e < ms:
            table.insert(LiveColumns(*(a[e:e + 1] for a in (c[0], *c[2:]))))
            out[e] = NEW
            e += 1
    return out, osz, ohk, omd, PointerLinks(nxt, firsts[:int(n_firsts[0])])
