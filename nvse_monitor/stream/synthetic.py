"""A synthetic allocation workload: a deterministic, vectorised stream of StreamMessages.

It stands in for a live agent (fixtures, benchmarks, property tests) and says so: the meta has
mode="synthetic" and target "synthetic-workload". The shape mimics Fallout New Vegas: a game
heap, a scrap heap and a CRT heap, callers inside FalloutNV.exe and two NVSE plugin DLLs.

How pointers stay consistent without a per-event loop: memory is a set of *slots*, each owning
two addresses (A, B). Every event touches one slot. "Toggle" events alternate alloc/free in
their slot; the others are reallocs, valid only while the slot is live (invalid ones are
discarded). A slot's state before an event is the parity of the toggles before it, which is
a grouped cumulative sum after a stable sort by slot. A realloc either stays in place or
moves A <-> B, so a free only ever frees a live pointer and addresses are reused after a free,
as with a real allocator. A small "hot" pool of slots gives short-lived churn, a large "cold"
pool holds the long-lived set (about `live_target` blocks once n_events >> live_target).

Agent counters (cumulative over every hooked call, dropped ones included):
allocs/frees/reallocs/failures count ALLOC/FREE/REALLOC/FAILED records, bytes_allocated sums
`size` over ALLOC and REALLOC records, dropped counts calls whose record the ring had no room
for, published counts records delivered. `seq` is the published record's index (mod 2**32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .. import __version__
from .events import RECORD_DTYPE, Kind
from .messages import (
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    HookInfo,
    Module,
    ModuleEvent,
    SessionEnd,
    SessionMeta,
    StreamMessage,
)

ControlMessage = ModuleEvent | HookEvent | AgentError

SYNTHETIC_TARGET = "synthetic-workload"
# 2025-11-25 00:00:00 UTC: a fixed wall clock so that generated streams are reproducible.
WALL_CLOCK_ZERO_US = 1_764_028_800_000_000
LARGE_BYTES = 1 << 20  # allocations at or above this carry dur_us (the agent's PERF threshold)
CHUNK_CALLS = 1 << 20  # calls generated per vectorised step (bounds memory; fixed for determinism)

ALLOC_ROLES = ("alloc", "calloc", "aligned_alloc", "memalign")
FREE_ROLES = ("free", "aligned_free")

DEFAULT_MODULES = (
    Module("FalloutNV.exe", 0x00400000, 0x00FDA000, r"C:\Games\FNV\FalloutNV.exe"),
    Module("nvse_1_4.dll", 0x6A000000, 0x00064000, r"C:\Games\FNV\nvse_1_4.dll"),
    Module("jip_nvse.dll", 0x6B000000, 0x0023C000, r"C:\Games\FNV\Data\NVSE\Plugins\jip_nvse.dll"),
)

DEFAULT_HOOKS = (
    HookInfo("MemoryManager::Allocate", "game", "alloc", "FalloutNV.exe"),
    HookInfo("MemoryManager::Free", "game", "free", "FalloutNV.exe"),
    HookInfo("MemoryManager::Reallocate", "game", "realloc", "FalloutNV.exe"),
    HookInfo("ScrapHeap::Allocate", "scrap", "alloc", "FalloutNV.exe"),
    HookInfo("ScrapHeap::Deallocate", "scrap", "free", "FalloutNV.exe"),
    HookInfo("malloc", "crt", "alloc", "FalloutNV.exe"),
    HookInfo("calloc", "crt", "calloc", "FalloutNV.exe"),
    HookInfo("realloc", "crt", "realloc", "FalloutNV.exe"),
    HookInfo("free", "crt", "free", "FalloutNV.exe"),
)

# Share of slots per heap name, in the hot (short-lived) and cold (long-lived) pools.
HOT_HEAP_WEIGHTS = {"scrap": 0.6, "game": 0.25, "crt": 0.15}
COLD_HEAP_WEIGHTS = {"game": 0.7, "crt": 0.3}


@dataclass(frozen=True)
class _Heap:
    name: str
    alloc_hooks: np.ndarray  # hook indices
    alloc_weights: np.ndarray
    free_hook: int
    realloc_hook: int  # -1: this heap has no realloc entry point
    base: int  # addresses of slots and of pre-attach blocks


@dataclass
class _Workload:
    """Everything drawn once per stream (sites, heaps, slot layout) plus the carried state."""

    rng: np.random.Generator
    heaps: list[_Heap]
    slot_heap: np.ndarray  # u1 heap index per slot
    slot_local: np.ndarray  # u8 slot index inside its heap
    hot: int
    cold: int
    parity: np.ndarray  # u1 per slot: 1 = live
    moved: np.ndarray  # u1 per slot: current address is B
    alloc_site_caller: np.ndarray
    alloc_site_table: np.ndarray
    alloc_site_mu: np.ndarray
    alloc_site_sigma: np.ndarray
    free_site_caller: np.ndarray
    free_site_table: np.ndarray
    tid_table: np.ndarray
    t_us: float = 0.0
    addr_bits: int = 16  # slot addresses: base + (scrambled index * 2 + moved) * 16
    pre_offset: int = 0  # pre-attach blocks live at base + pre_offset + 16 * k
    pre_next: int = 0  # next pre-attach block index


def synthetic_meta(
    *,
    seed: int,
    n_events: int,
    hooks: Sequence[HookInfo] = DEFAULT_HOOKS,
    modules: Sequence[Module] = DEFAULT_MODULES,
) -> SessionMeta:
    return SessionMeta(
        target=SYNTHETIC_TARGET,
        pid=4242,
        arch="ia32",
        platform="windows",
        profile="synthetic-fnv",
        hooks=list(hooks),
        modules=list(modules),
        wall_clock_zero_us=WALL_CLOCK_ZERO_US,
        utc_offset_s=0,
        monitor_version=__version__,
        mode="synthetic",
        extra={"generator": "nvse_monitor.synthetic", "seed": seed, "n_events": n_events},
    )


def _table(p: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """A 65536-entry lookup table: table[uniform u16] samples index (or value) with weights p.

    Much faster than rng.choice(p=...) for millions of draws; weights are quantised to 2**-16.
    """
    cdf = np.cumsum(np.asarray(p, dtype=np.float64))
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536, side="right")
    idx = np.minimum(idx, len(cdf) - 1)
    return idx if values is None else np.asarray(values)[idx]


def _draw(rng: np.random.Generator, table: np.ndarray, n: int) -> np.ndarray:
    return table[rng.integers(0, 65536, n, dtype=np.uint16)]


def _zipf(n: int, a: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    return w / w.sum()


def _heaps(hooks: Sequence[HookInfo], unusable: set[int]) -> list[_Heap]:
    heaps: list[_Heap] = []
    names: list[str] = []
    for h in hooks:
        if h.heap not in names:
            names.append(h.heap)
    for name in names:
        idx = [i for i, h in enumerate(hooks) if h.heap == name and i not in unusable]
        allocs = [i for i in idx if hooks[i].role in ALLOC_ROLES]
        frees = [i for i in idx if hooks[i].role in FREE_ROLES]
        reallocs = [i for i in idx if hooks[i].role == "realloc"]
        if not frees or not (allocs or reallocs):
            continue  # a heap that can't both allocate and free gets no traffic
        # calloc and friends are rarer than the plain entry point
        w = np.array([1.0 if hooks[i].role == "alloc" else 0.15 for i in allocs])
        heaps.append(
            _Heap(
                name=name,
                alloc_hooks=np.array(allocs if allocs else reallocs[:1], dtype=np.uint8),
                alloc_weights=(w / w.sum()) if allocs else np.ones(1),
                free_hook=frees[0],
                realloc_hook=reallocs[0] if reallocs else -1,
                base=0,  # set once the slot count is known
            )
        )
    if not heaps:
        raise ValueError("no heap has both an allocating and a freeing hook")
    return heaps


def _pool_heaps(rng, heaps: list[_Heap], n: int, weights: dict[str, float]) -> np.ndarray:
    w = np.array([weights.get(h.name, 0.1) for h in heaps], dtype=np.float64)
    return rng.choice(len(heaps), size=n, p=w / w.sum()).astype(np.uint8)


def _workload(
    rng: np.random.Generator,
    hooks: Sequence[HookInfo],
    modules: Sequence[Module],
    unusable: set[int],
    live_target: int,
    n_threads: int,
) -> _Workload:
    heaps = _heaps(hooks, unusable)
    hot = 4096
    cold = max(16, int(math.ceil(2.3 * live_target)))
    slot_heap = np.concatenate(
        [
            _pool_heaps(rng, heaps, hot, HOT_HEAP_WEIGHTS),
            _pool_heaps(rng, heaps, cold, COLD_HEAP_WEIGHTS),
        ]
    )
    # slot index within its own heap: a running count per heap
    slot_local = np.zeros(hot + cold, dtype=np.uint64)
    for k in range(len(heaps)):
        m = slot_heap == k
        slot_local[m] = np.arange(int(m.sum()), dtype=np.uint64)
    # each heap: a slot region of 2 addresses per index, then a region of pre-attach blocks
    addr_bits = max(16, int(slot_local.max()).bit_length())
    region = (1 << (addr_bits + 1)) * 16
    span = max(0x10000000, 2 * region)
    heaps = [dataclasses.replace(h, base=0x20000000 + k * span) for k, h in enumerate(heaps)]

    # call sites: mostly the game exe, some in the plugins; half of them allocate one fixed size
    mod_w = np.array([0.75] + [0.25 / max(1, len(modules) - 1)] * (len(modules) - 1))
    mod_w = mod_w[: len(modules)] / mod_w[: len(modules)].sum()

    def sites(n: int) -> np.ndarray:
        mods = rng.choice(len(modules), size=n, p=mod_w)
        base = np.array([m.base for m in modules], dtype=np.uint64)[mods]
        size = np.array([m.size for m in modules], dtype=np.float64)[mods]
        off = (rng.random(n) * (size - 16)).astype(np.uint64) + np.uint64(5)
        return base + off

    n_alloc_sites, n_free_sites = 256, 64
    sigma = rng.uniform(0.2, 1.6, n_alloc_sites)
    sigma[rng.random(n_alloc_sites) < 0.5] = 0.0
    tids = 1000 + 4 * rng.choice(4000, size=max(1, n_threads), replace=False)
    tid_p = np.full(len(tids), 0.4 / max(1, len(tids) - 1))
    tid_p[0] = 0.6 if len(tids) > 1 else 1.0
    return _Workload(
        rng=rng,
        heaps=heaps,
        slot_heap=slot_heap,
        slot_local=slot_local,
        addr_bits=addr_bits,
        pre_offset=region,
        hot=hot,
        cold=cold,
        parity=np.zeros(hot + cold, dtype=np.uint8),
        moved=np.zeros(hot + cold, dtype=np.uint8),
        alloc_site_caller=sites(n_alloc_sites),
        alloc_site_table=_table(_zipf(n_alloc_sites)),
        alloc_site_mu=rng.uniform(2.5, 8.0, n_alloc_sites),
        alloc_site_sigma=sigma,
        free_site_caller=sites(n_free_sites),
        free_site_table=_table(_zipf(n_free_sites)),
        tid_table=_table(tid_p, tids.astype(np.uint32)),
    )


def _stable_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of non-negative int keys and the sorted keys (one plain sort: faster)."""
    shift = max(1, len(keys).bit_length())
    combined = np.sort((keys.astype(np.int64) << shift) | np.arange(len(keys), dtype=np.int64))
    return combined & ((1 << shift) - 1), combined >> shift


def _group_exclusive_cumsum(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-group count of `values` strictly before each element (keys sorted, groups contiguous)."""
    v = values.astype(np.int64)
    excl = np.cumsum(v) - v
    n = len(sorted_keys)
    start = np.ones(n, dtype=bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    return excl - excl[first]


# probabilities of the event mix
P_HOT = 0.6  # share of events in the short-lived pool
P_NONTOGGLE = 0.08  # realloc candidates (kept only while their slot is live)
P_MOVE = 0.5  # a realloc that moves the block
P_REALLOC_NULL = 0.02  # an alloc done as realloc(NULL, n) (heaps with a realloc hook)
P_REALLOC_ZERO = 0.01  # a free done as realloc(p, 0)


def _main_events(w: _Workload, k: int, failure_rate: float) -> dict[str, np.ndarray]:
    """k consistent events (without ts/tid/seq), advancing the slots' state."""
    parts: list[dict[str, np.ndarray]] = []
    have = 0
    while have < k:
        need = k - have
        m = int(need * 1.1) + 256
        rng = w.rng
        slot = np.where(
            rng.random(m) < P_HOT,
            rng.integers(0, w.hot, m),
            rng.integers(w.hot, w.hot + w.cold, m),
        )
        toggle = rng.random(m) >= P_NONTOGGLE
        heap = w.slot_heap[slot]
        realloc_hook = np.array([h.realloc_hook for h in w.heaps], dtype=np.int16)[heap]
        order, s_sorted = _stable_order(slot)
        tog_excl = _group_exclusive_cumsum(s_sorted, toggle[order])
        live_sorted = (w.parity[s_sorted] ^ (tog_excl & 1)).astype(bool)
        live = np.empty(m, dtype=bool)
        live[order] = live_sorted
        is_realloc = ~toggle & live & (realloc_hook >= 0)
        failed = ~toggle & ~live & (rng.random(m) < failure_rate / (P_NONTOGGLE * 0.5))
        valid = toggle | is_realloc | failed
        # keep the prefix holding exactly `need` valid events; state then reflects only it
        cut = int(np.searchsorted(np.cumsum(valid), need)) + 1 if valid.sum() >= need else m
        move = is_realloc & (rng.random(m) < P_MOVE)
        cols = (slot, toggle, live, is_realloc, failed, valid, move, heap, realloc_hook)
        slot, toggle, live, is_realloc, failed, valid, move, heap, realloc_hook = (
            a[:cut] for a in cols
        )
        order = order[order < cut]  # still a stable order of the prefix
        s_sorted = slot[order]
        mv_excl = _group_exclusive_cumsum(s_sorted, move[order])
        moved = np.empty(cut, dtype=np.uint8)
        moved[order] = (w.moved[s_sorted] ^ (mv_excl & 1)).astype(np.uint8)
        # carry each touched slot's state: parity of its toggles and moves in this prefix
        if cut:
            starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
            touched = s_sorted[starts]
            w.parity[touched] ^= (np.add.reduceat(toggle[order], starts) & 1).astype(np.uint8)
            w.moved[touched] ^= (np.add.reduceat(move[order], starts) & 1).astype(np.uint8)

        sel = valid
        cols = (slot, toggle, live, is_realloc, failed, move, heap, realloc_hook, moved)
        slot, toggle, live, is_realloc, failed, move, heap, realloc_hook, moved = (
            a[sel] for a in cols
        )
        n = len(slot)
        bases = np.array([h.base for h in w.heaps], dtype=np.uint64)[heap]
        local = w.slot_local[slot]
        scram = (local * np.uint64(0x9E3779B1)) & np.uint64((1 << w.addr_bits) - 1)  # spread
        addr = bases + ((scram << np.uint64(1)) + moved.astype(np.uint64)) * np.uint64(16)
        other = bases + ((scram << np.uint64(1)) + (moved ^ 1).astype(np.uint64)) * np.uint64(16)

        alloc = toggle & ~live
        free = toggle & live
        has_re = realloc_hook >= 0
        r = rng.random(n)
        alloc_via_re = alloc & has_re & (r < P_REALLOC_NULL)
        free_via_re = free & has_re & (r < P_REALLOC_ZERO)

        kind = np.full(n, Kind.FREE, dtype=np.uint8)
        kind[alloc] = Kind.ALLOC
        kind[alloc_via_re | free_via_re | is_realloc] = Kind.REALLOC
        kind[failed] = Kind.FAILED

        ptr = np.where(free_via_re | failed, np.uint64(0), addr)
        ptr = np.where(move, other, ptr)
        old_ptr = np.where(is_realloc | free_via_re, addr, np.uint64(0))

        site = _draw(rng, w.alloc_site_table, n)
        size_f = np.exp(w.alloc_site_mu[site] + w.alloc_site_sigma[site] * rng.standard_normal(n))
        large = rng.random(n) < 2e-4
        size_f = np.where(large, rng.uniform(LARGE_BYTES, 24 * LARGE_BYTES, n), size_f)
        size = np.maximum(1, size_f).astype(np.uint64)
        # failures: requests the heap could not serve (often huge)
        size = np.where(failed, np.uint64(1 << 28) + size, size)
        size[(kind == Kind.FREE) | free_via_re] = 0
        caller = w.alloc_site_caller[site]
        fsite = _draw(rng, w.free_site_table, n)
        caller = np.where(kind == Kind.FREE, w.free_site_caller[fsite], caller)

        hook_alloc = np.zeros(n, dtype=np.uint8)
        for hi, h in enumerate(w.heaps):
            mh = heap == hi
            cnt = int(mh.sum())
            if cnt:
                hook_alloc[mh] = _draw(rng, _table(h.alloc_weights, h.alloc_hooks), cnt)
        free_hook = np.array([h.free_hook for h in w.heaps], dtype=np.uint8)[heap]
        hook = np.where(kind == Kind.FREE, free_hook, hook_alloc)
        hook = np.where(kind == Kind.REALLOC, realloc_hook.astype(np.uint8), hook)

        dur = np.zeros(n, dtype=np.uint32)
        big = (size >= LARGE_BYTES) & (kind != Kind.FAILED)
        if big.any():
            base_us = size[big].astype(np.float64) / 4096.0
            dur[big] = (base_us * rng.lognormal(0.0, 0.4, int(big.sum()))).astype(np.uint32) + 1
        parts.append(
            dict(kind=kind, ptr=ptr, old_ptr=old_ptr, size=size, caller=caller, hook=hook, dur=dur)
        )
        have += n
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


@dataclass
class _Plan:
    n_events: int
    rate_eps: float
    idle_prob: float
    untracked_pos: np.ndarray  # sorted call indices of pre-attach frees
    drop: np.ndarray  # sorted (start, stop) call ranges whose records are dropped
    failure_rate: float


def _calls(w: _Workload, plan: _Plan) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first call index, records of every call, dropped mask) per chunk."""
    rng = w.rng
    published = 0
    c0 = 0
    mean_gap = 1e6 / plan.rate_eps
    while c0 < plan.n_events:
        c1 = min(plan.n_events, c0 + CHUNK_CALLS)
        n = c1 - c0
        lo, hi = np.searchsorted(plan.untracked_pos, [c0, c1])
        upos = plan.untracked_pos[lo:hi] - c0
        is_untracked = np.zeros(n, dtype=bool)
        is_untracked[upos] = True
        main = _main_events(w, n - len(upos), plan.failure_rate)

        rec = np.zeros(n, dtype=RECORD_DTYPE)
        sel = ~is_untracked
        for field, key in (("kind", "kind"), ("ptr", "ptr"), ("old_ptr", "old_ptr"),
                           ("size", "size"), ("caller", "caller"), ("hook", "hook"),
                           ("dur_us", "dur")):
            if len(upos):
                col = np.zeros(n, dtype=RECORD_DTYPE[field])
                col[sel] = main[key]  # contiguous scatter, then one strided copy
                rec[field] = col
            else:
                rec[field] = main[key]
        if len(upos):
            # frees of blocks allocated before attach: unique addresses in each heap's spare range
            h = rng.integers(0, len(w.heaps), len(upos))
            bases = np.array([hp.base for hp in w.heaps], dtype=np.uint64)[h]
            idx = np.arange(w.pre_next, w.pre_next + len(upos), dtype=np.uint64)
            w.pre_next += len(upos)
            rec["kind"][upos] = Kind.FREE
            rec["ptr"][upos] = bases + np.uint64(w.pre_offset) + idx * np.uint64(16)
            rec["hook"][upos] = np.array([hp.free_hook for hp in w.heaps], dtype=np.uint8)[h]
            rec["caller"][upos] = w.free_site_caller[rng.integers(0, len(w.free_site_caller),
                                                                  len(upos))]

        gaps = rng.exponential(mean_gap, n)
        idle = rng.random(n) < plan.idle_prob
        if idle.any():
            gaps[idle] += rng.uniform(50_000, 1_500_000, int(idle.sum()))
        t = w.t_us + np.cumsum(gaps)
        w.t_us = float(t[-1])
        rec["ts_us"] = t.astype(np.uint64)
        rec["tid"] = _draw(rng, w.tid_table, n)

        dropped = np.zeros(n, dtype=bool)
        for start, stop in plan.drop:
            a, b = max(start, c0), min(stop, c1)
            if a < b:
                dropped[a - c0 : b - c0] = True
        pub_index = published + np.cumsum(~dropped) - 1
        rec["seq"] = (pub_index & 0xFFFFFFFF).astype(np.uint32)
        published += int((~dropped).sum())
        yield c0, rec, dropped
        c0 = c1


def _plan(
    rng: np.random.Generator,
    n_events: int,
    rate_eps: float,
    idle_prob: float,
    untracked_rate: float,
    drops: Sequence[tuple[int, int]],
    failure_rate: float,
) -> _Plan:
    n_untracked = int(round(n_events * untracked_rate))
    # pre-attach blocks are mostly freed early on
    pos = np.unique((rng.random(n_untracked) ** 3 * n_events).astype(np.int64))
    drop = np.array(sorted((int(p), int(p) + int(c)) for p, c in drops), dtype=np.int64)
    return _Plan(
        n_events=n_events,
        rate_eps=rate_eps,
        idle_prob=idle_prob,
        untracked_pos=pos,
        drop=drop.reshape(-1, 2),
        failure_rate=failure_rate,
    )


def _counters(recs_kind, recs_size, dropped) -> dict[str, np.ndarray]:
    """Cumulative per-call counters (inclusive) for one chunk, starting at zero."""
    is_alloc = recs_kind == Kind.ALLOC
    is_re = recs_kind == Kind.REALLOC
    return {
        "allocs": np.cumsum(is_alloc),
        "frees": np.cumsum(recs_kind == Kind.FREE),
        "reallocs": np.cumsum(is_re),
        "failures": np.cumsum(recs_kind == Kind.FAILED),
        "bytes_allocated": np.cumsum(np.where(is_alloc | is_re, recs_size, 0), dtype=np.uint64),
        "dropped": np.cumsum(dropped),
        "published": np.cumsum(~dropped),
        "dropped_frees": np.cumsum(dropped & ((recs_kind == Kind.FREE) | is_re)),
    }


def generate(
    n_events: int,
    *,
    seed: int,
    n_threads: int = 4,
    live_target: int | None = None,
    hooks: Sequence[HookInfo] = DEFAULT_HOOKS,
    modules: Sequence[Module] = DEFAULT_MODULES,
    failed_hooks: Sequence[str] = (),
    rate_eps: float = 400_000.0,
    idle_prob: float = 2e-6,
    untracked_rate: float = 1e-3,
    failure_rate: float = 1e-4,
    drops: Sequence[tuple[int, int]] = (),
    controls: Sequence[tuple[int, ControlMessage]] = (),
    batch_records: int = 4096,
    drain_us: int = 20_000,
    heartbeat_us: int = 250_000,
    hook_events: bool = True,
) -> tuple[SessionMeta, Iterator[StreamMessage]]:
    """A synthetic session: its meta and its messages, ending with a SessionEnd.

    n_events counts hooked calls; calls inside `drops` ranges ((first call index, count)) are
    counted by the agent counters but their records are not delivered. `controls` are
    (call index, message) pairs: the message is sent just before that call's record (its ts_us
    is replaced by that call's time; index n_events = after the last record). Batches hold the
    records drained in one `drain_us` tick (at most `batch_records`); quiet periods get an empty
    Batch every `heartbeat_us`. Hooks named in `failed_hooks` report a failed install and get
    no records. Deterministic for a given seed and arguments.
    """
    if n_events < 0:
        raise ValueError("n_events must be >= 0")
    if live_target is None:
        live_target = max(64, min(1_000_000, n_events // 16))
    meta = synthetic_meta(seed=seed, n_events=n_events, hooks=hooks, modules=modules)
    names = [h.name for h in hooks]
    unknown = [n for n in failed_hooks if n not in names]
    if unknown:
        raise ValueError(f"failed_hooks not in hooks: {unknown}")
    failed_idx = {names.index(n) for n in failed_hooks}
    rng = np.random.Generator(np.random.PCG64(seed))
    w = _workload(rng, hooks, modules, failed_idx, live_target, n_threads)
    plan = _plan(rng, n_events, rate_eps, idle_prob, untracked_rate, drops, failure_rate)
    ctl = sorted(((int(p), i, m) for i, (p, m) in enumerate(controls)), key=lambda x: x[:2])
    for p, _, _ in ctl:
        if not 0 <= p <= n_events:
            raise ValueError(f"control position {p} outside 0..{n_events}")

    def messages() -> Iterator[StreamMessage]:
        if hook_events:
            for i, h in enumerate(hooks):
                ok = i not in failed_idx
                detail = "" if ok else "synthetic failure: export not found"
                yield HookEvent(ts_us=0, hook=i, name=h.name, ok=ok, detail=detail)
        yield from _batches(w, plan, ctl, batch_records, drain_us, heartbeat_us)

    return meta, messages()


def _batches(
    w: _Workload,
    plan: _Plan,
    ctl: list[tuple[int, int, ControlMessage]],
    batch_records: int,
    drain_us: int,
    heartbeat_us: int,
) -> Iterator[StreamMessage]:
    keys = ("allocs", "frees", "reallocs", "failures", "bytes_allocated", "dropped", "published",
            "dropped_frees")
    base = dict.fromkeys(keys, 0)  # counters before the pending calls
    last = AgentCounters()
    last_now = 0
    ci = 0  # next control to send
    pend_c0 = 0
    pend_rec = np.zeros(0, dtype=RECORD_DTYPE)
    pend_drop = np.zeros(0, dtype=bool)
    drain = max(1, drain_us)
    cap = max(1, batch_records)

    def controls_upto(pos: int, ts: int) -> Iterator[StreamMessage]:
        nonlocal ci
        while ci < len(ctl) and ctl[ci][0] <= pos:
            yield dataclasses.replace(ctl[ci][2], ts_us=ts)
            ci += 1

    def heartbeats(until_ts: int) -> Iterator[StreamMessage]:
        nonlocal last_now
        t = last_now + heartbeat_us
        for _ in range(10_000):
            if heartbeat_us <= 0 or t >= until_ts:
                break
            yield Batch(now_us=t, counters=last, records=np.zeros(0, dtype=RECORD_DTYPE))
            last_now = t
            t += heartbeat_us

    chunks = _calls(w, plan)
    finished = False
    while not finished:
        nxt = next(chunks, None)
        if nxt is None:
            finished = True
            rec, drop = pend_rec, pend_drop
        else:
            _, crec, cdrop = nxt
            rec = np.concatenate([pend_rec, crec]) if len(pend_rec) else crec
            drop = np.concatenate([pend_drop, cdrop]) if len(pend_drop) else cdrop
        n = len(rec)
        if n == 0:
            break
        c0 = pend_c0
        tick = rec["ts_us"] // np.uint64(drain)
        cuts = np.flatnonzero(tick[1:] != tick[:-1]) + 1
        lo, hi = np.searchsorted([p for p, _, _ in ctl], [c0 + 1, c0 + n]) if ctl else (0, 0)
        forced = np.array([ctl[j][0] - c0 for j in range(lo, hi)], dtype=np.int64)
        bounds = np.unique(np.concatenate([[0], cuts, forced, [n]]))
        # split segments longer than the cap
        lens = np.diff(bounds)
        extra = [np.arange(a + cap, b, cap) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                 if b - a > cap] if (lens > cap).any() else []
        if extra:
            bounds = np.unique(np.concatenate([bounds, *extra]))
        cum = _counters(rec["kind"], rec["size"], drop)
        n_seg = len(bounds) - 1 if finished else len(bounds) - 2
        ts = rec["ts_us"]
        ends = bounds[1 : n_seg + 1] - 1
        seg_counts = {k: (cum[k][ends] + base[k]).tolist() for k in keys}
        any_drop = np.add.reduceat(drop, bounds[:-1])[:n_seg] > 0 if drop.any() else None
        for s in range(n_seg):
            a, b = int(bounds[s]), int(bounds[s + 1])
            first_ts = int(ts[a])
            yield from heartbeats(first_ts)
            yield from controls_upto(c0 + a, max(first_ts, last_now))
            tick_end = (int(tick[b - 1]) + 1) * drain - 1
            now = min(tick_end, int(ts[b])) if b < n else tick_end
            now = max(now, last_now)
            last = AgentCounters(**{k: int(seg_counts[k][s]) for k in keys})
            seg = rec[a:b]
            records = seg[~drop[a:b]] if any_drop is not None and any_drop[s] else seg
            yield Batch(now_us=now, counters=last, records=np.ascontiguousarray(records))
            last_now = now
        keep = int(bounds[n_seg])
        if keep > 0:
            base = {k: base[k] + int(cum[k][keep - 1]) for k in keys}
        pend_rec, pend_drop, pend_c0 = rec[keep:], drop[keep:], c0 + keep
    end_ts = last_now
    yield from controls_upto(plan.n_events, end_ts)
    yield SessionEnd(ts_us=end_ts, reason="end-of-recording", expected=True, counters=last)


def generate_records(n_events: int, *, seed: int, **kwargs) -> tuple[SessionMeta, np.ndarray]:
    """The same stream's records as one array (delivered records only; controls dropped)."""
    meta, msgs = generate(n_events, seed=seed, **kwargs)
    parts = [m.records for m in msgs if isinstance(m, Batch) and len(m.records)]
    recs = np.concatenate(parts) if parts else np.zeros(0, dtype=RECORD_DTYPE)
    return meta, recs


# -- issue 11: sampled stacks, as the agent would send them (off unless asked for) --
AGENT_FRAME = 0x7FFE0000  # a frame in no module (the agent's own code): the engine drops it


def site_stack(caller: int, modules: Sequence[Module], seed: int = 0) -> list[int]:
    """A deterministic stack for a call site: frame 0 = the site, then 2..13 callers drawn from a
    small pool of "functions" per module (so stacks share their outer frames, as real ones do);
    a quarter of the sites get an agent frame at position 1."""
    rng = np.random.Generator(np.random.PCG64([seed, caller & 0xFFFFFFFF]))
    depth = 2 + int(rng.integers(0, 12))
    frames = [caller]
    for d in range(depth):
        m = modules[int(rng.integers(0, len(modules)))] if d < depth - 2 else modules[0]
        fn = int(rng.integers(0, 6 if d >= depth - 3 else 24))
        frames.append(m.base + 0x1000 + fn * 0x400 + 0x10 + d % 4)
    if rng.random() < 0.25:
        frames.insert(1, AGENT_FRAME)
    return frames[:16]


def with_stacks(meta: SessionMeta, messages: Iterator[StreamMessage], sample_bytes: int,
                *, seed: int = 0) -> tuple[SessionMeta, Iterator[StreamMessage]]:
    """The same session with the agent's stack sampling simulated: each thread's allocated
    bytes run through a Poisson process of mean `sample_bytes`; a call that holds a sample point
    gets FLAG_SAMPLED and its stack's STACK chunks (site_stack of its caller) just before its
    record. seq and the published counter count the chunks. Deterministic for a seed."""
    from .events import FLAG_SAMPLED, STACK_FRAMES_PER_RECORD

    meta = dataclasses.replace(meta, sample_bytes=int(sample_bytes))
    rng = np.random.Generator(np.random.PCG64([seed, 11]))
    stacks: dict[int, list[int]] = {}
    left: dict[int, float] = {}  # thread -> bytes until its next sample point

    def sampled(r: np.ndarray) -> np.ndarray:
        kind, size = r["kind"], r["size"].astype(np.float64)
        alloc = (kind == Kind.ALLOC) | ((kind == Kind.REALLOC) & (r["size"] > 0))
        out = np.zeros(len(r), bool)
        tid = r["tid"]
        for t in np.unique(tid[alloc]).tolist():
            idx = np.flatnonzero(alloc & (tid == t))
            cum = np.cumsum(size[idx])
            x = left.get(t)
            if x is None:
                x = float(rng.exponential(sample_bytes))
            pts = []
            while x <= cum[-1]:
                pts.append(x)
                x += float(rng.exponential(sample_bytes))
            left[t] = x - float(cum[-1])
            if pts:
                out[idx[np.unique(np.searchsorted(cum, pts, side="left"))]] = True
        return out

    def messages_out() -> Iterator[StreamMessage]:
        extra = 0  # chunks published so far
        for msg in messages:
            if not isinstance(msg, Batch) or not len(msg.records):
                if isinstance(msg, Batch | SessionEnd) and msg.counters is not None and extra:
                    msg = dataclasses.replace(msg, counters=dataclasses.replace(
                        msg.counters, published=msg.counters.published + extra))
                yield msg
                continue
            r = msg.records
            hit = np.flatnonzero(sampled(r))
            parts, lo = [], 0
            for i in hit.tolist():
                parts.append(r[lo:i])
                call = r[i:i + 1].copy()
                call["flags"] |= FLAG_SAMPLED
                caller = int(call["caller"][0])
                frames = stacks.get(caller)
                if frames is None:
                    frames = stacks[caller] = site_stack(caller, meta.modules, seed)
                n = len(frames)
                k = -(-n // STACK_FRAMES_PER_RECORD)
                ch = np.zeros(k, RECORD_DTYPE)
                padded = frames + [0] * (k * STACK_FRAMES_PER_RECORD - n)
                fr = np.array(padded, np.uint64).reshape(k, STACK_FRAMES_PER_RECORD)
                for j, f in enumerate(("ptr", "old_ptr", "size", "caller")):
                    ch[f] = fr[:, j]
                ch["kind"], ch["hook"], ch["flags"] = Kind.STACK, np.arange(k), n
                ch["tid"], ch["ts_us"] = call["tid"][0], call["ts_us"][0]
                parts += [ch, call]
                lo = i + 1
            parts.append(r[lo:])
            out = np.concatenate(parts) if hit.size else r.copy()
            added = len(out) - len(r)
            out["seq"] = ((out["seq"][0].astype(np.int64) + extra if len(out) else 0)
                          + np.arange(len(out))) & 0xFFFFFFFF
            extra += added
            counters = msg.counters
            if counters is not None and extra:
                counters = dataclasses.replace(counters, published=counters.published + extra)
            yield Batch(now_us=msg.now_us, counters=counters, records=out)

    return meta, messages_out()
