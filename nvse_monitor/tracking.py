"""The live-allocation set: pointer -> (size, ts, caller, hook, module), as numpy columns.

A bucketised cuckoo hash table (two candidate buckets of `WAYS` slots per key) operated on whole
arrays of keys at once, so the engine never loops per event in Python:
- lookup is a fixed two-bucket gather and compare (no probe chains, no tombstones);
- delete just clears the slot;
- insert places keys in the emptier of their two buckets, resolving same-slot races by
  scatter-then-verify, and evicts (cuckoo moves) only when both buckets are full, which is rare
  below `MAX_LOAD`. Loads of 60-90 % keep the memory per live block near 40-60 bytes.
Key 0 marks an empty slot; the engine never tracks pointer 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WAYS = 8  # slots per bucket: 8 u64 keys = one 64-byte cache line
MAX_LOAD = 0.90  # grow when an insert would pass this load
GROW_TO = 0.60  # load right after a grow (so growth is x1.5)
MIN_SLOTS = 1024
MAX_ROUNDS = 64  # insert rounds before giving up and growing (pathological collisions only)

_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xC2B2AE3D27D4EB4F)
_S32 = np.uint64(32)
_M64 = (1 << 64) - 1
_BYTESUM = np.uint64(0x0101010101010101)  # w * this: top byte = sum of w's bytes


@dataclass
class LiveColumns:
    """Parallel columns for a set of live blocks (one row per block)."""

    ptr: np.ndarray  # u64
    size: np.ndarray  # u64
    ts: np.ndarray  # u64, µs of the allocation
    caller: np.ndarray  # u64 return address
    hook: np.ndarray  # u8, index into SessionMeta.hooks (heap = that hook's heap)
    module: np.ndarray  # u16, module index at allocation time (see engine), 0xFFFF unknown

    def __len__(self) -> int:
        return len(self.ptr)

    def take(self, idx: np.ndarray) -> LiveColumns:
        return LiveColumns(*(getattr(self, f)[idx] for f in _COLS))


_COLS = ("ptr", "size", "ts", "caller", "hook", "module")
_DTYPES = {"size": np.uint64, "ts": np.uint64, "caller": np.uint64, "hook": np.uint8,
           "module": np.uint16}


class LiveTable:
    """pointer -> columns, vectorised. Slot index = bucket * WAYS + way."""

    def __init__(self, slots: int = MIN_SLOTS) -> None:
        self.count = 0
        self._alloc(max(MIN_SLOTS, slots))

    # -- storage ---------------------------------------------------------------------------------
    def _alloc(self, slots: int) -> None:
        nb = max(1, -(-slots // WAYS))
        self.nbuckets = nb
        self.keys2d = np.zeros((nb, WAYS), dtype=np.uint64)
        self.keys = self.keys2d.reshape(-1)  # flat view
        self.cols = {name: np.zeros(nb * WAYS, dtype=dt) for name, dt in _DTYPES.items()}
        self._nb_u64 = np.uint64(nb)

    @property
    def slots(self) -> int:
        return self.nbuckets * WAYS

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + sum(c.nbytes for c in self.cols.values())

    def _buckets(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Multiplicative hashes, mapped onto [0, nbuckets) by "fast range" (high 32 bits x n) >> 32,
        # so the bucket count need not be a power of two (finer growth, less memory).
        b1 = (((k * _C1) >> _S32) * self._nb_u64) >> _S32
        b2 = (((k * _C2) >> _S32) * self._nb_u64) >> _S32
        return b1.astype(np.intp), b2.astype(np.intp)

    def _buckets1(self, k: int) -> tuple[int, int]:
        nb = self.nbuckets
        return (((k * 0x9E3779B97F4A7C15) & _M64) >> 32) * nb >> 32, (
            ((k * 0xC2B2AE3D27D4EB4F) & _M64) >> 32
        ) * nb >> 32

    # -- vectorised operations ---------------------------------------------------------------------
    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Slot of each key (intp), -1 where absent. Keys must be non-zero."""
        out = np.full(len(q), -1, dtype=np.intp)
        if not len(q) or not self.count:
            return out
        b1, b2 = self._buckets(q)
        hit = _row_mask(self.keys2d[b1] == q[:, None])  # 8 bools of a row read as one u64
        h = np.flatnonzero(hit)
        out[h] = b1[h] * WAYS + _first_byte(hit[h])
        miss = np.flatnonzero(hit == 0)
        if len(miss):
            b2m = b2[miss]
            hit2 = _row_mask(self.keys2d[b2m] == q[miss, None])
            h2 = np.flatnonzero(hit2)
            out[miss[h2]] = b2m[h2] * WAYS + _first_byte(hit2[h2])
        return out

    def get(self, slots: np.ndarray) -> LiveColumns:
        c = self.cols
        return LiveColumns(self.keys[slots], c["size"][slots], c["ts"][slots],
                           c["caller"][slots], c["hook"][slots], c["module"][slots])

    def write(self, slots: np.ndarray, v: LiveColumns) -> None:
        """Overwrite the columns (not the key) of occupied slots."""
        c = self.cols
        c["size"][slots] = v.size
        c["ts"][slots] = v.ts
        c["caller"][slots] = v.caller
        c["hook"][slots] = v.hook
        c["module"][slots] = v.module

    def delete(self, slots: np.ndarray) -> None:
        self.keys[slots] = 0
        self.count -= len(slots)

    def insert(self, v: LiveColumns) -> None:
        """Insert keys known to be absent and distinct."""
        n = len(v)
        if not n:
            return
        if self.count + n > MAX_LOAD * self.slots:
            self._grow(int((self.count + n) / GROW_TO))
        self.count += n
        pending = self._place(v)
        while pending is not None:  # only after MAX_ROUNDS of evictions: grow and retry
            self.count -= len(pending)
            self._grow(int(self.slots * 1.5))
            self.count += len(pending)
            pending = self._place(pending)

    def _place(self, v: LiveColumns) -> LiveColumns | None:
        """Put entries in a free way of the emptier of their two buckets (keys racing for one
        way: the last write wins, the others retry). An entry whose two buckets are full moves
        one of their 16 occupants to that occupant's other bucket if it has room (a one-step
        cuckoo move) and takes its way. Returns the entries still unplaced when rounds stop
        making progress (the caller grows the table), else None."""
        keys, keys2d, cols = self.keys, self.keys2d, self.cols
        stalled = 0
        for _ in range(MAX_ROUNDS):
            b1, b2 = self._buckets(v.ptr)
            f1 = _row_mask(keys2d[b1] == 0)
            f2 = _row_mask(keys2d[b2] == 0)
            use2 = (f2 * _BYTESUM) > (f1 * _BYTESUM)  # top byte = number of free ways
            b = np.where(use2, b2, b1)
            free = np.where(use2, f2, f1)
            # Half the keys take their bucket's first free way, half the last: fewer races.
            way = np.where(v.ptr & np.uint64(16), _first_byte(free), _last_byte(free))
            slot = b * WAYS + way
            stuck = free == 0
            if stuck.any():
                slot[stuck] = -1
                ok = np.flatnonzero(~stuck)
                placed = np.zeros(len(v), dtype=bool)
                placed[ok] = self._write_racing(slot[ok], v, ok)
                si = np.flatnonzero(stuck)
                placed[si] = self._relocate(v, si, b1[si], b2[si])
            else:
                placed = self._write_racing(slot, v, None)
                if placed.all():
                    return None
            left = np.flatnonzero(~placed)
            if not len(left):
                return None
            stalled = stalled + 1 if len(left) == len(v) else 0
            if stalled >= 2:
                break
            v = v.take(left)
        return v

    def _write_racing(self, slot: np.ndarray, v: LiveColumns, idx: np.ndarray | None) -> np.ndarray:
        """Write entries (v, or v[idx]) into free slots; returns which won their slot."""
        keys, cols = self.keys, self.cols
        ptr = v.ptr if idx is None else v.ptr[idx]
        keys[slot] = ptr
        won = keys[slot] == ptr
        if won.all():
            for name in _DTYPES:
                col = getattr(v, name)
                cols[name][slot] = col if idx is None else col[idx]
        else:
            sel = np.flatnonzero(won) if idx is None else idx[won]
            ws = slot[won]
            for name in _DTYPES:
                cols[name][ws] = getattr(v, name)[sel]
        return won

    def _relocate(self, v: LiveColumns, si: np.ndarray, b1: np.ndarray,
                  b2: np.ndarray) -> np.ndarray:
        """Entries v[si] whose buckets b1, b2 are both full: move the occupant (of the 16) whose
        other bucket has the most room there, and take its way. Returns which succeeded."""
        keys, keys2d, cols = self.keys, self.keys2d, self.cols
        n = len(si)
        own = np.concatenate((np.repeat(b1, WAYS), np.repeat(b2, WAYS))).reshape(2, n, WAYS)
        own = own.transpose(1, 0, 2).reshape(n, 2 * WAYS)  # row i: b1 x8 then b2 x8
        ways = np.tile(np.arange(WAYS), 2)
        cand = own * WAYS + ways  # candidate victim slots
        occ = keys[cand.reshape(-1)]
        o1, o2 = self._buckets(occ)
        alt = np.where(o1 == own.reshape(-1), o2, o1)
        altfree = _row_mask(keys2d[alt] == 0)
        room = ((altfree * _BYTESUM) >> np.uint64(56)).reshape(n, 2 * WAYS)
        best = room.argmax(axis=1)
        rows = np.arange(n)
        good = room[rows, best] > 0
        flat = rows * 2 * WAYS + best
        victim = cand[rows, best]
        dest_b = alt[flat]
        dest = dest_b * WAYS + _first_byte(altfree[flat])
        # One move per victim slot and per destination bucket in a round (others retry).
        g = np.flatnonzero(good)
        _, f1 = np.unique(victim[g], return_index=True)
        g = g[f1]
        _, f2 = np.unique(dest_b[g], return_index=True)
        g = np.sort(g[f2])
        vs, ds = victim[g], dest[g]
        keys[ds] = keys[vs]
        for name in _DTYPES:
            cols[name][ds] = cols[name][vs]
        keys[vs] = v.ptr[si[g]]
        for name in _DTYPES:
            cols[name][vs] = getattr(v, name)[si[g]]
        done = np.zeros(n, dtype=bool)
        done[g] = True
        return done

    def _grow(self, slots: int) -> None:
        live = self.entries()
        self._alloc(max(slots, MIN_SLOTS))
        pending = self._place(live)
        while pending is not None:
            self._alloc(int(self.slots * 1.5))
            pending = self._place(live)

    def entries(self) -> LiveColumns:
        """All live blocks, in slot order (callers sort if they need an order)."""
        occ = np.flatnonzero(self.keys)
        return self.get(occ)

    # -- scalar operations (the engine's exact slow path when tracking is full) ------------------
    def find1(self, k: int) -> int:
        for b in self._buckets1(k):
            row = self.keys2d[b].tolist()
            if k in row:
                return b * WAYS + row.index(k)
        return -1


def _row_mask(m: np.ndarray) -> np.ndarray:
    """A (n, 8) bool array as n u64 words: non-zero iff the row has a True; the lowest set byte
    is the first True way (little-endian)."""
    return m.view(np.uint64).reshape(-1).copy()


def _first_byte(w: np.ndarray) -> np.ndarray:
    """Index of the lowest non-zero byte of each non-zero u64 (garbage for 0)."""
    low = w & (~w + np.uint64(1))  # lowest set bit
    return (np.frexp(low.astype(np.float64))[1] - 1) >> 3


def _last_byte(w: np.ndarray) -> np.ndarray:
    """Index of the highest non-zero byte of each non-zero u64 (garbage for 0)."""
    return (np.frexp(w.astype(np.float64))[1] - 1) >> 3


def _concat(a: LiveColumns, b: LiveColumns) -> LiveColumns:
    if not len(b):
        return a
    if not len(a):
        return b
    return LiveColumns(*(np.concatenate((getattr(a, f), getattr(b, f))) for f in _COLS))


def columns(ptr, size, ts, caller, hook, module) -> LiveColumns:  # noqa: ANN001
    """Build LiveColumns with the table's dtypes (tests, slow path)."""
    return LiveColumns(
        np.asarray(ptr, dtype=np.uint64), np.asarray(size, dtype=np.uint64),
        np.asarray(ts, dtype=np.uint64), np.asarray(caller, dtype=np.uint64),
        np.asarray(hook, dtype=np.uint8), np.asarray(module, dtype=np.uint16),
    )
