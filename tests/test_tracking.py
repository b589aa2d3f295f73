"""The vectorised live table against a dict, through growth, deletes and cuckoo evictions."""

from __future__ import annotations

import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import nvse_monitor.engine.tracking as tr
from nvse_monitor.engine.tracking import MAX_LOAD, MIN_SLOTS, WAYS, LiveTable, columns


def cols_for(keys: np.ndarray, salt: int = 0):
    k = keys.astype(np.uint64)
    return columns(k, k * np.uint64(3) + np.uint64(salt), k + np.uint64(1), k ^ np.uint64(7),
                   (k % np.uint64(5)).astype(np.uint8), (k % np.uint64(300)).astype(np.uint16))


def check_same(t: LiveTable, ref: dict[int, int]) -> None:
    e = t.entries()
    assert t.count == len(ref) == len(e)
    assert dict(zip(e.ptr.tolist(), e.size.tolist(), strict=True)) == ref


def add_random(t: LiveTable, ref: dict[int, int], rng: np.random.Generator, n: int) -> None:
    """Up to n new random pointers into the table and the reference dict alike."""
    new = np.unique(rng.integers(1, 1 << 40, n, dtype=np.uint64) << np.uint64(4))
    new = new[t.lookup(new) < 0]
    t.insert(cols_for(new))
    ref.update(zip(new.tolist(), (new * np.uint64(3)).tolist(), strict=True))


def test_insert_lookup_delete_and_growth_against_dict() -> None:
    rng = np.random.default_rng(1)
    t = LiveTable()
    ref: dict[int, int] = {}
    for _round in range(30):
        add_random(t, ref, rng, 5000)
        keys = np.array(list(ref), dtype=np.uint64)
        gone = rng.choice(keys, len(keys) // 3, replace=False)
        slots = t.lookup(gone)
        assert (slots >= 0).all()
        assert t.get(slots).ptr.tolist() == gone.tolist()
        t.delete(slots)
        for k in gone.tolist():
            del ref[k]
        assert (t.lookup(gone) == -1).all()
        assert t.count <= MAX_LOAD * t.slots
    check_same(t, ref)
    e = t.entries()
    assert (t.get(t.lookup(e.ptr)).ts == e.ptr + np.uint64(1)).all()


def test_dense_inserts_force_evictions_and_keep_every_key() -> None:
    # Consecutive small pointers into a table filled to the brim: many both-buckets-full cases.
    t = LiveTable(slots=2048)
    keys = (np.arange(1, 1801, dtype=np.uint64)) * np.uint64(16)
    t.insert(cols_for(keys[:1000]))
    t.insert(cols_for(keys[1000:]))
    check_same(t, dict(zip(keys.tolist(), (keys * np.uint64(3)).tolist(), strict=True)))
    assert t.keys[t._park] == 0  # stuck keys parked there during the inserts: emptied


def test_growth_moved_in_small_slices_matches_dict(monkeypatch) -> None:
    # Two old buckets per slice: many slice boundaries, where a new bucket takes entries from
    # two slices (the second continues after the ways the first filled).
    monkeypatch.setattr(tr, "GROW_SLICE", 2 * WAYS)
    rng = np.random.default_rng(5)
    t = LiveTable()
    ref: dict[int, int] = {}
    for _round in range(12):
        add_random(t, ref, rng, 1500)
        gone = rng.choice(np.array(list(ref), dtype=np.uint64), len(ref) // 4, replace=False)
        t.delete(t.lookup(gone))
        for k in gone.tolist():
            del ref[k]
    assert t.slots > 4 * MIN_SLOTS  # grew several times
    check_same(t, ref)
    keys = np.array(list(ref), dtype=np.uint64)
    assert (t.get(t.lookup(keys)).ts == keys + np.uint64(1)).all()


def _keys_hashing_to(x: int, n: int) -> np.ndarray:
    """n keys whose first hash has high half x (so the same bucket for any table size)."""
    inv = pow(int(tr._C1), -1, 1 << 64)
    return np.array([inv * ((x << 32) | j) % (1 << 64) for j in range(1, n + 1)],
                    dtype=np.uint64)


def test_growth_places_entries_that_overflow_their_new_bucket() -> None:
    # 16 entries, 8 in each of two neighbouring old buckets, whose new buckets are one and the
    # same: 8 fit there, the other 8 must go through the normal placement.
    t = LiveTable(slots=MIN_SLOTS)
    old_nb, new_nb = t.nbuckets, 182
    ob = next(b for b in range(1, old_nb)
              if ((b << 32) // old_nb * new_nb) >> 32 == (((b << 32) // old_nb - 1) * new_nb) >> 32)
    x0 = -(-(ob << 32) // old_nb)  # first x of old bucket ob
    lower, upper = _keys_hashing_to(x0 - 1, WAYS), _keys_hashing_to(x0, WAYS)
    new_b = (x0 * new_nb) >> 32
    assert ((x0 - 1) * new_nb) >> 32 == new_b
    for keys, b in ((lower, ob - 1), (upper, ob)):
        assert (t._buckets(keys)[0] == b).all()
        slots = b * WAYS + np.arange(WAYS)  # white box: fill both old buckets directly
        t.keys[slots] = keys
        t.fp[slots] = tr._fingerprint(keys)
        t.vals[slots] = tr.pack(cols_for(keys))
    t.count = 2 * WAYS
    t._grow(new_nb * WAYS)
    assert t.nbuckets == new_nb
    keys = np.concatenate((lower, upper))
    check_same(t, dict(zip(keys.tolist(), (keys * np.uint64(3)).tolist(), strict=True)))
    assert np.count_nonzero(t.keys2d[new_b]) == WAYS


def test_growth_is_in_place_unless_an_array_is_held_elsewhere() -> None:
    t = LiveTable()
    first = np.arange(1, 5001, dtype=np.uint64) * np.uint64(16)
    t.insert(cols_for(first))
    held = t.keys  # a reference from outside: the next growth must copy, not move, this one
    snapshot = held.copy()
    second = first + np.uint64(1 << 36)
    t.insert(cols_for(second))
    assert (held == snapshot).all() and held is not t.keys
    del held
    ident, slots = id(t.keys), t.slots
    third = first + np.uint64(2 << 36)
    t.insert(cols_for(third))
    assert t.slots > slots
    if sys.gettrace() is None:  # a Python tracer holds frame references: copies then
        assert id(t.keys) == ident  # grown in place (realloc), not copied
    keys = np.concatenate((first, second, third))
    check_same(t, dict(zip(keys.tolist(), (keys * np.uint64(3)).tolist(), strict=True)))


def test_write_changes_columns_not_keys() -> None:
    t = LiveTable()
    keys = np.array([16, 32, 48], dtype=np.uint64)
    t.insert(cols_for(keys))
    s = t.lookup(keys[:2])
    t.write(s, cols_for(keys[:2], salt=5))
    assert t.get(t.lookup(keys)).size.tolist() == [53, 101, 144]
    assert t.find1(32) == s[1] and t.find1(64) == -1


def test_memory_per_live_entry_stays_bounded() -> None:
    t = LiveTable()
    keys = np.arange(1, 200_001, dtype=np.uint64) * np.uint64(48)
    t.insert(cols_for(keys))
    assert t.nbytes / t.count <= 37 / 0.59  # 37 B a slot, load >= GROW_TO after growth


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=400))
def test_random_ops_match_dict(ops) -> None:
    t = LiveTable()
    ref: dict[int, int] = {}
    for ins, k in ops:
        key = np.array([k * 8], dtype=np.uint64)
        slot = t.lookup(key)
        if ins and slot[0] < 0:
            t.insert(cols_for(key))
            ref[k * 8] = k * 24
        elif not ins and slot[0] >= 0:
            t.delete(slot)
            del ref[k * 8]
    check_same(t, ref)


def _colliding(n: int) -> np.ndarray:
    """Pointers in pairs whose 32-bit grouping hashes are equal (p*C and p*C + 1 share the
    high half when the low half does not carry)."""
    from nvse_monitor.engine.classify import HASH

    c = int(HASH)
    inv = pow(c, -1, 1 << 64)
    out = []
    p = 0x10000
    while len(out) < 2 * n:
        p += 16
        if (p * c) & 0xFFFFFFFF < 0x80000000:
            out += [p, (p + inv) % (1 << 64)]
    return np.array(out, dtype=np.uint64)


def test_pointer_order_groups_colliding_hashes_exactly() -> None:
    from nvse_monitor.engine.classify import HASH, pointer_order

    pairs = _colliding(50)
    h = (pairs * HASH) >> np.uint64(32)
    assert (h[0::2] == h[1::2]).all() and (pairs[0::2] != pairs[1::2]).all()
    rng = np.random.default_rng(3)
    p = rng.choice(pairs, 2000)  # interleaved events on colliding pointers
    order, sp = pointer_order(p)
    ref = np.argsort(p, kind="stable")
    # same groups, each group in time order (group order itself may differ)
    assert (sp == p[order]).all()
    first = np.r_[True, sp[1:] != sp[:-1]]
    assert len(np.unique(sp)) == first.sum()  # every pointer in one contiguous run
    for v in np.unique(p):
        assert order[sp == v].tolist() == ref[p[ref] == v].tolist()


def test_fingerprint_collisions_fall_back_to_whole_keys(monkeypatch) -> None:
    import nvse_monitor.engine.tracking as tr

    # Every key gets the same fingerprint: each probe must confirm against the real keys.
    monkeypatch.setattr(tr, "_fingerprint", lambda k: np.ones(len(k), dtype=np.uint16))
    rng = np.random.default_rng(9)
    t = LiveTable()
    keys = np.unique(rng.integers(1, 1 << 40, 3000, dtype=np.uint64) << np.uint64(4))
    t.insert(cols_for(keys[:2000]))
    s = t.lookup(keys)
    assert (s[:2000] >= 0).all() and (s[2000:] == -1).all()
    assert t.get(s[:2000]).ptr.tolist() == keys[:2000].tolist()
    t.delete(s[:1000])
    check_same(t, dict(zip(keys[1000:2000].tolist(), (keys[1000:2000] * np.uint64(3)).tolist(),
                           strict=True)))
