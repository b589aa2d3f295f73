"""The synthetic workload: consistent pointers, counters that match the records, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from nvse_monitor.stream.events import RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import (
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    Module,
    ModuleEvent,
    SessionEnd,
)
from nvse_monitor.stream.synthetic import LARGE_BYTES, generate, generate_records


def replay_live_set(recs: np.ndarray) -> dict:
    """A reference allocator model (per-record Python loop: small inputs only)."""
    live: dict[int, int] = {}
    untracked: list[int] = []
    reused = 0
    seen: set[int] = set()
    for k, p, op, s in zip(recs["kind"].tolist(), recs["ptr"].tolist(),
                           recs["old_ptr"].tolist(), recs["size"].tolist(), strict=True):
        if k == Kind.ALLOC or (k == Kind.REALLOC and op == 0):
            assert p != 0 and p not in live, "allocation returned a live pointer"
            reused += p in seen
            seen.add(p)
            live[p] = s
        elif k == Kind.FREE:
            if live.pop(p, None) is None:
                untracked.append(p)
        elif k == Kind.REALLOC:
            assert op in live, "realloc of a pointer that is not live"
            del live[op]
            if p:
                assert s > 0 and (p == op or p not in live)
                live[p] = s
            else:
                assert s == 0
        else:
            assert k == Kind.FAILED and p == 0
    return {"live": live, "untracked": untracked, "reused": reused}


@pytest.fixture(scope="module")
def stream():
    meta, msgs = generate(120_000, seed=3, live_target=5_000, idle_prob=5e-5)
    return meta, list(msgs)


def records_of(msgs) -> np.ndarray:
    return np.concatenate([m.records for m in msgs if isinstance(m, Batch)])


def test_meta_says_synthetic(stream):
    meta, _ = stream
    assert meta.mode == "synthetic" and meta.target == "synthetic-workload"
    assert meta.extra["seed"] == 3 and len(meta.hooks) >= 4 and len(meta.modules) >= 3


def test_pointers_are_consistent_and_reused(stream):
    _, msgs = stream
    recs = records_of(msgs)
    model = replay_live_set(recs)
    assert model["reused"] > 1000, "addresses are reused after a free"
    # the only frees of unknown pointers are the deliberate pre-attach ones: each freed once
    untracked = model["untracked"]
    assert 0 < len(untracked) <= 0.002 * len(recs)
    assert len(set(untracked)) == len(untracked)
    allocated = set(recs["ptr"][recs["kind"] == Kind.ALLOC].tolist())
    assert not allocated & set(untracked)
    # about live_target long-lived blocks (+ the short-lived pool)
    assert 4_000 <= len(model["live"]) <= 9_000


def test_event_mix(stream):
    meta, msgs = stream
    recs = records_of(msgs)
    kinds = np.bincount(recs["kind"], minlength=5)
    assert kinds[Kind.ALLOC] > 0.4 * len(recs) and kinds[Kind.FREE] > 0.35 * len(recs)
    assert 0 < kinds[Kind.REALLOC] < 0.1 * len(recs) and 0 < kinds[Kind.FAILED] < 100
    re = recs[recs["kind"] == Kind.REALLOC]
    assert ((re["old_ptr"] == 0) & (re["ptr"] != 0)).any(), "realloc(NULL, n)"
    assert ((re["ptr"] == 0) & (re["size"] == 0)).any(), "realloc(p, 0)"
    assert ((re["ptr"] == re["old_ptr"]) & (re["ptr"] != 0)).any(), "in-place realloc"
    assert ((re["ptr"] != re["old_ptr"]) & (re["ptr"] != 0) & (re["old_ptr"] != 0)).any()
    big = recs["size"] >= LARGE_BYTES
    ok = recs["kind"] != Kind.FAILED
    assert (big & ok).any() and (recs["dur_us"][big & ok] > 0).all()
    assert (recs["dur_us"][~big] == 0).all()
    # roles match kinds
    roles = np.array([h.role for h in meta.hooks])
    assert set(roles[recs["hook"][recs["kind"] == Kind.FREE]]) <= {"free"}
    assert set(roles[recs["hook"][recs["kind"] == Kind.REALLOC]]) == {"realloc"}
    assert set(roles[recs["hook"][recs["kind"] == Kind.ALLOC]]) <= {"alloc", "calloc"}
    # callers fall inside the module map, from more than one module
    bases = np.array([m.base for m in meta.modules], dtype=np.uint64)
    ends = bases + np.array([m.size for m in meta.modules], dtype=np.uint64)
    inside = (recs["caller"][:, None] >= bases) & (recs["caller"][:, None] < ends)
    assert inside.any(axis=1).all() and (inside.sum(axis=0) > 0).all()
    assert 2 <= len(np.unique(recs["tid"])) <= 4


def test_time_sequence_and_batches(stream):
    _, msgs = stream
    recs = records_of(msgs)
    assert (np.diff(recs["ts_us"].astype(np.int64)) >= 0).all()
    assert np.array_equal(recs["seq"], np.arange(len(recs), dtype=np.uint32))
    batches = [m for m in msgs if isinstance(m, Batch)]
    nows = [b.now_us for b in batches]
    assert nows == sorted(nows)
    for b in batches:
        if len(b.records):
            assert int(b.records["ts_us"].max()) <= b.now_us
    assert any(len(b.records) == 0 for b in batches), "quiet periods send empty batches"
    assert max(len(b.records) for b in batches) <= 4096


def test_counters_match_records(stream):
    _, msgs = stream
    seen = np.zeros(5, dtype=np.int64)
    nbytes = 0
    for m in msgs:
        if isinstance(m, Batch):
            r = m.records
            seen += np.bincount(r["kind"], minlength=5)
            keep = (r["kind"] == Kind.ALLOC) | (r["kind"] == Kind.REALLOC)
            nbytes += int(r["size"][keep].sum())
            c = m.counters
            assert (c.allocs, c.frees, c.reallocs, c.failures) == tuple(seen[1:5])
            assert c.bytes_allocated == nbytes and c.dropped == 0
            assert c.published == int(seen.sum())
    end = msgs[-1]
    assert isinstance(end, SessionEnd) and end.expected and end.reason == "end-of-recording"
    assert end.counters == c


def test_drops_controls_and_failed_hooks():
    plugin = Module("p.dll", 0x70000000, 0x1000)
    meta, msgs = generate(
        20_000, seed=5, drops=[(5_000, 300), (9_000, 10)], failed_hooks=["calloc"],
        controls=[(8_000, ModuleEvent(0, "add", plugin)), (20_000, AgentError(0, "x"))],
    )
    msgs = list(msgs)
    hooks = [m for m in msgs if isinstance(m, HookEvent)]
    calloc = [h.hook for h in hooks if not h.ok]
    assert len(hooks) == len(meta.hooks) and [meta.hooks[i].name for i in calloc] == ["calloc"]
    recs = records_of(msgs)
    assert len(recs) == 20_000 - 310 and not (recs["hook"] == calloc[0]).any()
    assert np.array_equal(recs["seq"], np.arange(len(recs), dtype=np.uint32))
    end = msgs[-1].counters
    assert end.dropped == 310 and end.published == len(recs)
    assert end.allocs + end.frees + end.reallocs + end.failures == 20_000
    # the module event sits between batches, at the time of call 8000
    i = next(i for i, m in enumerate(msgs) if isinstance(m, ModuleEvent))
    before = [m for m in msgs[:i] if isinstance(m, Batch)]
    assert sum(b.counters.published - (before[j - 1].counters.published if j else 0)
               for j, b in enumerate(before)) == before[-1].counters.published
    calls_before = before[-1].counters.published + before[-1].counters.dropped
    assert calls_before == 8_000
    assert msgs[i].ts_us >= before[-1].now_us
    assert isinstance(msgs[-2], AgentError) and isinstance(msgs[-1], SessionEnd)


def test_deterministic_per_seed():
    a = generate_records(30_000, seed=9)[1]
    b = generate_records(30_000, seed=9)[1]
    c = generate_records(30_000, seed=10)[1]
    assert a.dtype == RECORD_DTYPE and np.array_equal(a, b) and not np.array_equal(a, c)


def test_generate_records_matches_the_stream():
    meta, msgs = generate(10_000, seed=4)
    recs = records_of(list(msgs))
    meta2, recs2 = generate_records(10_000, seed=4)
    assert meta == meta2 and np.array_equal(recs, recs2)


def test_zero_events_and_bad_arguments():
    _, msgs = generate(0, seed=1)
    msgs = list(msgs)
    assert isinstance(msgs[-1], SessionEnd) and msgs[-1].counters == AgentCounters()
    with pytest.raises(ValueError):
        generate(10, seed=1, failed_hooks=["nope"])
    with pytest.raises(ValueError):
        generate(10, seed=1, controls=[(11, AgentError(0, "x"))])
