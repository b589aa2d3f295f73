"""The live-allocation set: pointer -> (size, ts, caller, hook, module), in numpy arrays.

A bucketised cuckoo hash table (two candidate buckets of `WAYS` slots per key) operated on whole
arrays of keys at once, so the engine never loops per event in Python:
- a probe compares the 16-bit fingerprints of both buckets (rows that stay in cache) and reads
  the full key only to confirm a match; no probe chains, no tombstones;
- delete just clears the slot;
- insert places keys in the emptier of their two buckets, resolving same-slot races by
  scatter-then-verify; a key whose buckets are both full moves one occupant to its other
  bucket (a one-step cuckoo move). Load stays in 60-85 %: 44-62 bytes per live block;
- growth is in place (realloc) and race-free: fast range keeps buckets in hash order, so a
  stable sort per slice of old buckets gives every entry its new way (see _rehash).
Key 0 marks an empty slot; the engine never tracks pointer 0. Keys live in their own array;
the values of a slot are one packed 27-byte record, so moving or reading an entry touches one
place instead of five column arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

if not np.little_endian:  # _row_mask reads 8 bools as one little-endian u64
    raise ImportError("nvse_monitor.engine.tracking needs a little-endian machine")

WAYS = 8  # slots per bucket: 8 u64 keys = one 64-byte cache line
MAX_LOAD = 0.85  # grow when an insert would pass this load
GROW_TO = 0.60  # load right after a grow (growth x1.42)
MIN_SLOTS = 1024
MAX_ROUNDS = 64  # insert rounds before giving up and growing (pathological collisions only)
GROW_SLICE = 1 << 17  # old slots moved per step when the table grows (bounds temporaries)

_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xC2B2AE3D27D4EB4F)
_C3 = np.uint64(0xD6E8FEB86659FD93)
_S48 = np.uint64(48)
_S32 = np.uint64(32)
_M64 = (1 << 64) - 1
_BYTESUM = np.uint64(0x0101010101010101)  # w * this: top byte = sum of w's bytes
_ALLFREE = _BYTESUM  # free-way mask of an empty bucket


@dataclass
class Probe:
    """Result of LiveTable.probe: slots, and bucket facts an insert of the absent keys reuses."""

    slots: np.ndarray  # intp, -1 where absent
    b1: np.ndarray
    b2: np.ndarray
    f1: np.ndarray  # u64 free-way masks of the b1 rows
    f2: np.ndarray  # of the b2 rows (where absent)
    nbuckets: int  # table geometry the hint is valid for

    def take(self, idx: np.ndarray) -> Probe:
        return Probe(self.slots[idx], self.b1[idx], self.b2[idx], self.f1[idx], self.f2[idx],
                     self.nbuckets)


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
VAL_DTYPE = np.dtype([("size", "<u8"), ("ts", "<u8"), ("caller", "<u8"), ("hook", "u1"),
                      ("module", "<u2")])  # packed: 27 bytes
# Stored and moved as opaque 27-byte items: numpy gathers/scatters those with a plain copy,
# while fancy indexing of the structured dtype itself is an order of magnitude slower.
VAL_VOID = np.dtype((np.void, VAL_DTYPE.itemsize))


def pack(v: LiveColumns) -> np.ndarray:
    """The value records of v (VAL_VOID items)."""
    a = np.empty(len(v), VAL_DTYPE)
    a["size"] = v.size
    a["ts"] = v.ts
    a["caller"] = v.caller
    a["hook"] = v.hook
    a["module"] = v.module
    return a.view(VAL_VOID)


def unpack(ptr: np.ndarray, vals: np.ndarray) -> LiveColumns:
    f = vals.view(VAL_DTYPE)
    return LiveColumns(ptr, f["size"], f["ts"], f["caller"], f["hook"], f["module"])


class LiveTable:
    """pointer -> columns, vectorised. Slot index = bucket * WAYS + way."""

    def __init__(self, slots: int = MIN_SLOTS) -> None:
        self.count = 0
        # The arrays are private: growth resizes them in place (see _extended).
        self.keys = np.zeros(0, np.uint64)
        # 16-bit fingerprints of the keys (0 = empty): probes compare these 16-byte rows, which
        # stay in cache, and read a full key only to confirm a fingerprint match.
        self.fp = np.zeros(0, np.uint16)
        self.vals = np.zeros(0, VAL_VOID)
        self._resize(-(-max(MIN_SLOTS, slots) // WAYS))

    # -- storage ---------------------------------------------------------------------------------

    def _resize(self, nb: int) -> None:
        """nb buckets, plus one slot no key hashes to (_place parks keys there); the arrays
        grow in place where they can, the new slots zeroed."""
        self.keys2d = self.fp2d = None  # views of the old buffers: gone before they move
        for name in ("keys", "fp", "vals"):
            setattr(self, name, _extended(self.__dict__.pop(name), nb * WAYS + 1))
        self.nbuckets = nb
        self._park = nb * WAYS
        self.keys2d = self.keys[:nb * WAYS].reshape(nb, WAYS)
        self.fp2d = self.fp[:nb * WAYS].reshape(nb, WAYS)
        self._nb_u64 = np.uint64(nb)

    @property
    def slots(self) -> int:
        return self.nbuckets * WAYS

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.fp.nbytes + self.vals.nbytes

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
    def probe(self, q: np.ndarray) -> Probe:
        """Where each key is (slot, -1 if absent), plus its buckets and their free ways as seen
        now, which a following insert of the absent keys reuses instead of reading them again."""
        n = len(q)
        slots = np.full(n, -1, dtype=np.intp)
        b1, b2 = self._buckets(q)
        if not self.count:
            f = np.full(n, _ALLFREE, dtype=np.uint64)
            return Probe(slots, b1, b2, f, f.copy(), self.nbuckets)
        fp = _fingerprint(q)
        fp2d, keys = self.fp2d, self.keys
        r1 = _rows(fp2d, b1)
        f1 = _row_mask(r1 == 0)
        m1 = _row_mask(r1 == fp[:, None])
        c = np.flatnonzero(m1)  # fingerprint seen in b1: confirm with the key
        s1 = b1[c] * WAYS + _first_byte(m1[c])
        ok = keys[s1] == q[c]
        slots[c[ok]] = s1[ok]
        doubt = [c[~ok]]
        rest = np.flatnonzero(slots < 0)
        f2 = np.zeros(n, dtype=np.uint64)
        if len(rest):
            b2r = b2[rest]
            r2 = _rows(fp2d, b2r)
            f2[rest] = _row_mask(r2 == 0)
            m2 = _row_mask(r2 == fp[rest, None])
            c2 = np.flatnonzero(m2)
            s2 = b2r[c2] * WAYS + _first_byte(m2[c2])
            ok2 = keys[s2] == q[rest[c2]]
            slots[rest[c2[ok2]]] = s2[ok2]
            doubt.append(rest[c2[~ok2]])
        dd = np.concatenate(doubt)
        if len(dd):  # a fingerprint matched another key (rare): compare whole key rows
            dd = dd[slots[dd] < 0]
            for b in (b1[dd], b2[dd]):
                m = _row_mask(_rows(self.keys2d, b) == q[dd, None])
                h = np.flatnonzero(m)
                slots[dd[h]] = b[h] * WAYS + _first_byte(m[h])
        return Probe(slots, b1, b2, f1, f2, self.nbuckets)

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Slot of each key (intp), -1 where absent. Keys must be non-zero."""
        if not len(q) or not self.count:
            return np.full(len(q), -1, dtype=np.intp)
        return self.probe(q).slots

    def get_values(self, slots: np.ndarray) -> np.ndarray:
        """The values (VAL_DTYPE fields size, ts, caller, hook, module) of occupied slots."""
        return np.take(self.vals, slots).view(VAL_DTYPE)  # take: ~1.5x fancy indexing here

    def get(self, slots: np.ndarray) -> LiveColumns:
        return unpack(self.keys[slots], np.take(self.vals, slots))

    def write(self, slots: np.ndarray, v: LiveColumns) -> None:
        """Overwrite the values (not the key) of occupied slots."""
        self.vals[slots] = pack(v)

    def delete(self, slots: np.ndarray) -> None:
        self.keys[slots] = 0
        self.fp[slots] = 0
        self.count -= len(slots)

    def insert(self, v: LiveColumns, hint: Probe | None = None) -> None:
        """Insert keys known to be absent and distinct. `hint`: their probe (same order), taken
        since the last insert (deletes in between only make it conservative)."""
        n = len(v)
        if not n:
            return
        if self.count + n > MAX_LOAD * self.slots:
            self._grow(int((self.count + n) / GROW_TO))
            hint = None
        self.count += n
        if hint is not None and hint.nbuckets != self.nbuckets:
            hint = None
        pending = self._place(v.ptr, pack(v), hint)
        while pending is not None:  # rounds stopped making progress: grow and retry
            self._grow(int(self.slots * 1.5))
            pending = self._place(*pending)

    def _place(self, ptr: np.ndarray, vals: np.ndarray,
               hint: Probe | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Put entries in a free way of the emptier of their two buckets (keys racing for one
        way: the last write wins, the others retry). When only entries whose two buckets are
        full are left, each moves one of their 16 occupants to that occupant's other bucket if
        it has room (a one-step cuckoo move) and takes its way. Returns the entries still
        unplaced when rounds stop making progress (the caller grows the table), else None."""
        fp2d = self.fp2d
        fpr = _fingerprint(ptr)
        stalled = 0
        for _ in range(MAX_ROUNDS):
            if hint is not None:
                b1, b2, f1, f2 = hint.b1, hint.b2, hint.f1, hint.f2
                hint = None
            else:
                b1, b2 = self._buckets(ptr)
                f1 = _row_mask(_rows(fp2d, b1) == 0)
                f2 = _row_mask(_rows(fp2d, b2) == 0)
            use2 = (f2 * _BYTESUM) > (f1 * _BYTESUM)  # top byte = number of free ways
            free = np.where(use2, f2, f1)
            stuck = free == 0
            if not stuck.any():
                placed = self._write_racing(self._slot(ptr, b1, b2, use2, free), ptr, vals, fpr)
            elif stuck.all():  # only entries with both buckets full are left: cuckoo moves
                placed = self._relocate(ptr, vals, fpr, b1, b2)
            else:  # the stuck ones wait until the others are placed: they write to the
                # parking slot (cheaper than taking the others out), which is emptied after
                slot = self._slot(ptr, b1, b2, use2, free)
                slot[stuck] = self._park
                placed = self._write_racing(slot, ptr, vals, fpr)
                placed &= ~stuck
                self.keys[self._park] = 0
                self.fp[self._park] = 0
            left = np.flatnonzero(~placed)
            if not len(left):
                return None
            stalled = stalled + 1 if len(left) == len(ptr) else 0
            ptr, vals, fpr = ptr[left], np.take(vals, left), fpr[left]
            if stalled >= 2:
                break
        return ptr, vals

    @staticmethod
    def _slot(ptr: np.ndarray, b1: np.ndarray, b2: np.ndarray, use2: np.ndarray,
              free: np.ndarray) -> np.ndarray:
        """A free way of the chosen bucket: half the keys take the first, half the last (fewer
        races between keys choosing one bucket)."""
        way = np.where(ptr & np.uint64(16), _first_byte(free), _last_byte(free))
        return np.where(use2, b2, b1) * WAYS + way

    def _write_racing(self, slot: np.ndarray, ptr: np.ndarray, vals: np.ndarray,
                      fpr: np.ndarray) -> np.ndarray:
        """Write entries (fingerprints fpr) into free slots; returns which won their slot (the
        key read back). Values and fingerprints are written for all at once, whatever order
        numpy writes them in: only slots that several entries wrote are rewritten with their
        winner's (found by clearing those slots' fingerprints)."""
        keys, fp = self.keys, self.fp
        keys[slot] = ptr
        won = keys[slot] == ptr
        self.vals[slot] = vals
        fp[slot] = fpr
        if not won.all():
            fp[slot[~won]] = 0
            wi = np.flatnonzero(won)
            wi = wi[fp[slot[wi]] == 0]
            ws = slot[wi]
            self.vals[ws] = np.take(vals, wi)
            fp[ws] = fpr[wi]
        return won

    def _relocate(self, ptr: np.ndarray, vals: np.ndarray, fpr: np.ndarray, b1: np.ndarray,
                  b2: np.ndarray) -> np.ndarray:
        """Entries whose buckets b1, b2 are both full: move the occupant (of the 16) whose
        other bucket has the most room there, and take its way. Returns which succeeded."""
        keys, fp2d = self.keys, self.fp2d
        n = len(ptr)
        own = np.concatenate((np.repeat(b1, WAYS), np.repeat(b2, WAYS))).reshape(2, n, WAYS)
        own = own.transpose(1, 0, 2).reshape(n, 2 * WAYS)  # row i: b1 x8 then b2 x8
        ways = np.tile(np.arange(WAYS), 2)
        cand = own * WAYS + ways  # candidate victim slots
        occ = keys[cand.reshape(-1)]
        o1, o2 = self._buckets(occ)
        alt = np.where(o1 == own.reshape(-1), o2, o1)
        altfree = _row_mask(_rows(fp2d, alt) == 0)
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
        self.fp[ds] = self.fp[vs]
        self.vals[ds] = self.vals[vs]
        keys[vs] = ptr[g]
        self.fp[vs] = fpr[g]
        self.vals[vs] = np.take(vals, g)
        done = np.zeros(n, dtype=bool)
        done[g] = True
        return done

    def _grow(self, slots: int) -> None:
        """Rehash into at least `slots` slots (more if entries will not fit)."""
        spill = self._rehash(slots)
        while spill is not None:
            spill = self._place(*spill)
            if spill is not None:  # rounds stopped making progress (pathological): bigger still
                more = self._rehash(int(self.slots * 1.5))
                if more is not None:
                    spill = (np.concatenate((spill[0], more[0])),
                             np.concatenate((spill[1], more[1])))

    def _rehash(self, slots: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Grow the arrays in place (realloc: big ones are remapped by the kernel, not copied,
        and there is never a second table) and move every entry to its bucket in the new
        geometry. Fast range is monotone in the hash and the bucket count only grows, so an
        entry never moves down and, read in old slot order, the new buckets of the entries
        (under the hash that placed each one) only go up from one old bucket to the next.
        So a slice of old buckets at a time, from the top: take its entries out, then a
        stable sort (timsort: near linear on such input) and the rank within each new bucket
        give every entry its own way, above every slice still to move. Returns the entries
        ranked past WAYS (rare at GROW_TO load), to be placed by the caller, or None."""
        old_nb = self.nbuckets
        onb = np.uint64(old_nb)
        self._resize(max(-(-max(slots, MIN_SLOTS) // WAYS), old_nb + 1))
        nb = self._nb_u64
        keys, fp, vals = self.keys, self.fp, self.vals
        step = max(1, GROW_SLICE // WAYS)
        spill_k: list[np.ndarray] = []
        spill_v: list[np.ndarray] = []
        for hi in range(old_nb, 0, -step):
            lo = max(0, hi - step)
            occ = np.flatnonzero(keys[lo * WAYS:hi * WAYS])
            if not len(occ):
                continue
            occ += lo * WAYS
            k = keys[occ]
            keys[lo * WAYS:hi * WAYS] = 0  # taken out (values are read before any write)
            fp[lo * WAYS:hi * WAYS] = 0
            h = k * _C1
            used2 = ((h >> _S32) * onb) >> _S32 != (occ // WAYS).astype(np.uint64)
            h = np.where(used2, k * _C2, h)
            nbk = (((h >> _S32) * nb) >> _S32).view(np.int64)
            order = np.argsort(nbk, kind="stable")
            sb = nbk[order]
            first = np.empty(len(sb), dtype=bool)
            first[0] = True
            np.not_equal(sb[1:], sb[:-1], out=first[1:])
            idx = np.arange(len(sb))
            rank = idx - np.maximum.accumulate(np.where(first, idx, 0))
            # The slice's top new bucket may already hold (in its first ways) entries of the
            # slice above; every other bucket it fills is empty (or was this slice's).
            top = int(sb[-1])
            rank[sb == top] += int(np.count_nonzero(self.fp2d[top]))
            slot = sb * WAYS + rank
            fit = rank < WAYS
            if not fit.all():
                out = order[~fit]
                spill_k.append(k[out])
                spill_v.append(np.take(vals, occ[out]))
                order, slot = order[fit], slot[fit]
            v = np.take(vals, occ[order])
            kk = k[order]
            keys[slot] = kk
            fp[slot] = _fingerprint(kk)
            vals[slot] = v
        if not spill_k:
            return None
        return np.concatenate(spill_k), np.concatenate(spill_v)

    def entries(self) -> LiveColumns:
        """All live blocks, in slot order (callers sort if they need an order)."""
        occ = np.flatnonzero(self.keys[:self._park])
        return self.get(occ)

    # -- scalar operations (the engine's exact slow path when tracking is full) ------------------
    def find1(self, k: int) -> int:
        for b in self._buckets1(k):
            row = self.keys2d[b].tolist()
            if k in row:
                return b * WAYS + row.index(k)
        return -1


def _extended(a: np.ndarray, n: int) -> np.ndarray:
    """a with n items, the new ones zero. In place (realloc: the kernel remaps a big buffer
    instead of copying it, and no second table is allocated) unless something else still
    refers to a (numpy's refcheck raises then): a copy, so that reference stays valid."""
    try:
        a.resize(n, refcheck=True)
        return a
    except ValueError:
        b = np.zeros(n, a.dtype)
        b[:len(a)] = a
        return b


def _fingerprint(k: np.ndarray) -> np.ndarray:
    """15-bit fingerprint with the low bit set (never 0 = empty), from a hash independent of
    the bucket hashes."""
    return ((k * _C3) >> _S48).astype(np.uint16) | np.uint16(1)


def _rows(a2d: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a2d[idx] for whole rows: np.take copies rows ~10x faster than fancy indexing does."""
    return np.take(a2d, idx, axis=0)


def _row_mask(m: np.ndarray) -> np.ndarray:
    """An (n, 8) bool array as n u64 words: non-zero iff the row has a True; the lowest set byte
    is the first True way (little-endian)."""
    return m.view(np.uint64).reshape(-1)


def _first_byte(w: np.ndarray) -> np.ndarray:
    """Index of the lowest non-zero byte of each non-zero u64 (garbage for 0)."""
    low = w & (~w + np.uint64(1))  # lowest set bit
    return (np.frexp(low.astype(np.float64))[1] - 1) >> 3


def _last_byte(w: np.ndarray) -> np.ndarray:
    """Index of the highest non-zero byte of each non-zero u64 (garbage for 0)."""
    return (np.frexp(w.astype(np.float64))[1] - 1) >> 3


def columns(ptr, size, ts, caller, hook, module) -> LiveColumns:  # noqa: ANN001
    """Build LiveColumns with the table's dtypes (tests, slow path)."""
    return LiveColumns(
        np.asarray(ptr, dtype=np.uint64), np.asarray(size, dtype=np.uint64),
        np.asarray(ts, dtype=np.uint64), np.asarray(caller, dtype=np.uint64),
        np.asarray(hook, dtype=np.uint8), np.asarray(module, dtype=np.uint16),
    )
