"""The fast replay paths (issue 13) give exactly what the plain ones give: chunk decoding with
ISA-L or zlib, the engine's zero-copy join of back-to-back batches, and the reader thread that
decodes ahead of the engine (runs merged into one array, damage and early exits)."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from nvse_monitor.engine.engine import Engine, _joined
from nvse_monitor.outputs.pipeline import REPLAY_RUN_RECORDS, _merged, _Prefetch
from nvse_monitor.stream import codec
from nvse_monitor.stream.codec import ChunkError, decode_chunk
from nvse_monitor.stream.events import RECORD_DTYPE
from nvse_monitor.stream.messages import AgentCounters, Batch, SessionEnd
from nvse_monitor.stream.recording import (
    FRAME_CHUNK,
    RecordingError,
    open_recording,
    write_recording,
)
from nvse_monitor.stream.synthetic import generate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def chunk_payloads(path: Path) -> tuple[list[bytes], int]:
    """The chunk payloads of a recording, and its format version."""
    rec = open_recording(path)
    out = []
    try:
        while True:
            ftype, payload, _ = rec._read_frame()
            if ftype == 0:
                return out, rec.version
            if ftype == FRAME_CHUNK:
                out.append(payload)
    finally:
        rec.close()


@pytest.mark.parametrize("name", ["live-x64", "live-ia32", "synthetic-mixed"])
def test_zlib_and_isal_decode_alike(monkeypatch, name):
    pytest.importorskip("isal")
    payloads, version = chunk_payloads(FIXTURES / f"{name}.nvmrec")
    assert payloads
    fast = [decode_chunk(p, version) for p in payloads]
    monkeypatch.setattr(codec, "_inflate_lib", zlib)
    monkeypatch.setattr(codec, "_INFLATE_ERRORS", (zlib.error,))
    for p, (rows, recs) in zip(payloads, fast, strict=True):
        rows2, recs2 = decode_chunk(p, version)
        assert rows == rows2 and recs.dtype == RECORD_DTYPE
        assert recs.tobytes() == recs2.tobytes()


@pytest.mark.parametrize("use_zlib", [False, True])
def test_corrupt_deflate_stream_is_a_chunk_error(monkeypatch, use_zlib):
    if use_zlib:
        monkeypatch.setattr(codec, "_inflate_lib", zlib)
        monkeypatch.setattr(codec, "_INFLATE_ERRORS", (zlib.error,))
    payloads, version = chunk_payloads(FIXTURES / "live-x64.nvmrec")
    p = bytearray(payloads[0])
    p[-1] ^= 0xFF  # the adler32 check word
    with pytest.raises(ChunkError, match="corrupt|decompress"):
        decode_chunk(bytes(p), version)


def test_decoded_fields_wrap_like_the_fields():
    """A column stored wider than its field (a hand-made or hostile file) is cast modulo the
    field's width, as the field-by-field decoder did."""
    rng = np.random.default_rng(3)
    recs = np.zeros(300, RECORD_DTYPE)
    for f in RECORD_DTYPE.names:
        recs[f] = rng.integers(0, np.iinfo(RECORD_DTYPE[f]).max, 300, dtype=np.uint64,
                               endpoint=True)
    recs["kind"] = rng.integers(0, 6, 300)
    rows = [codec.BatchRow(7, AgentCounters(), 300)]
    rows2, got = decode_chunk(codec.encode_chunk(rows, recs))
    assert rows2 == rows and got.tobytes() == recs.tobytes()


def test_joined_is_a_view_only_for_back_to_back_slices():
    base = np.zeros(100, RECORD_DTYPE)
    base["ptr"] = np.arange(100)
    parts = [base[0:10], base[10:10], base[10:40], base[40:41]]
    j = _joined(parts)
    assert np.shares_memory(j, base) and j.tobytes() == base[:41].tobytes()
    assert j.dtype == RECORD_DTYPE
    void = np.zeros(50, np.dtype((np.void, RECORD_DTYPE.itemsize)))
    recs = void.view(RECORD_DTYPE)  # slices of it have the void array as their base
    j = _joined([recs[:5], recs[5:9]])
    assert np.shares_memory(j, void) and j.dtype == RECORD_DTYPE and len(j) == 9
    for parts in ([base[0:10], base[11:20]],  # a gap
                  [base[10:20], base[0:10]],  # out of order
                  [base[0:10], base[10:20].copy()],  # another array
                  [base[0:10:2], base[10:20]]):  # strided
        j = _joined(parts)
        assert not np.shares_memory(j, base)
        assert j.dtype == RECORD_DTYPE
        assert j.tobytes() == b"".join(p.tobytes() for p in parts)


def test_engine_feeds_views_and_copies_alike():
    meta, msgs = generate(40_000, seed=11)
    batches = [m for m in msgs if isinstance(m, Batch)]
    assert len(batches) > 10
    copies = [Batch(b.now_us, b.counters, b.records.copy()) for b in batches]
    views = _merged(copies)
    assert len({id(b.records.base) for b in views}) == 1
    assert np.shares_memory(_joined([b.records for b in views]), views[0].records.base)
    outs = []
    for run in (copies, views):
        eng = Engine(meta)
        eng.start()
        out = eng.feed_many(run) + eng.finish()
        outs.append([repr(o) for o in out])
    assert outs[0] == outs[1]


def test_merged_keeps_messages_and_order():
    end = SessionEnd(9, "x", True)
    recs = np.zeros(5, RECORD_DTYPE)
    recs["seq"] = np.arange(5)
    a = Batch(1, AgentCounters(allocs=1), recs[:2].copy())
    b = Batch(2, AgentCounters(allocs=2), recs[2:].copy())
    c = Batch(3, AgentCounters(allocs=3), recs[:1].copy())
    got = _merged([a, b, end, c])
    assert [type(m) for m in got] == [Batch, Batch, SessionEnd, Batch]
    for g, w in zip(got, [a, b, end, c], strict=True):
        if isinstance(w, Batch):
            assert (g.now_us, g.counters) == (w.now_us, w.counters)
            assert g.records.tobytes() == w.records.tobytes()
        else:
            assert g is w
    assert got[0].records.base is got[1].records.base


@pytest.fixture(scope="module")
def big_recording(tmp_path_factory):
    meta, msgs = generate(3 * REPLAY_RUN_RECORDS // 2, seed=5)
    path = tmp_path_factory.mktemp("r") / "big.nvmrec"
    write_recording(path, meta, msgs)
    return path


@pytest.mark.parametrize("ahead", [True, False])
def test_prefetch_yields_every_message_in_order(big_recording, ahead):
    want = list(open_recording(big_recording))
    rec = open_recording(big_recording)
    got, offsets = [], []
    with _Prefetch(rec, ahead=ahead) as runs:
        for msgs, offs in runs:
            assert len(msgs) == len(offs)
            got += msgs
            offsets += offs
    assert len(got) == len(want) > 2
    for g, w in zip(got, want, strict=True):
        if isinstance(w, Batch):
            assert (g.now_us, g.counters) == (w.now_us, w.counters)
            assert g.records.tobytes() == w.records.tobytes()
        else:
            assert g == w
    assert offsets == sorted(offsets) and offsets[-1] == big_recording.stat().st_size


@pytest.mark.parametrize("ahead", [True, False])
def test_prefetch_hands_over_damage_after_what_preceded_it(big_recording, tmp_path, ahead):
    data = big_recording.read_bytes()
    cut = tmp_path / "cut.nvmrec"
    cut.write_bytes(data[: len(data) * 2 // 3])
    direct, err = [], None
    try:
        for m in open_recording(cut):
            direct.append(m)
    except RecordingError as e:
        err = e
    assert err is not None
    got = []
    with pytest.raises(RecordingError) as info, \
            _Prefetch(open_recording(cut), ahead=ahead) as runs:
        for msgs, _ in runs:
            got += msgs
    assert str(info.value) == str(err)
    assert len(got) == len(direct)


@pytest.mark.parametrize("ahead", [True, False])
def test_prefetch_stops_its_thread_when_the_consumer_leaves(big_recording, ahead):
    rec = open_recording(big_recording)
    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt), _Prefetch(rec, depth=1, ahead=ahead) as runs:
        for _ in runs:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the engine works
    assert threading.active_count() == before
    assert rec._f is None  # the reader closed the file


def test_replay_files_do_not_depend_on_reading_ahead(big_recording, tmp_path):
    from nvse_monitor.outputs.pipeline import replay

    res = replay(big_recording, tmp_path / "a", read_ahead=True)
    ref = replay(big_recording, tmp_path / "b", read_ahead=False)
    assert res.error is None and res.messages == ref.messages
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) >= 5
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_snapshot_files_at_most_once_per_interval_and_always_at_the_end(tmp_path):
    from nvse_monitor.outputs.pipeline import Pipeline

    meta, msgs = generate(60_000, seed=9)
    msgs = list(msgs)
    outs = {}
    for name, every in (("all", None), ("few", 3600.0)):
        pipe = Pipeline(meta, tmp_path / name, snapshot_files_every_s=every)
        written = []
        write = pipe.files.json.write
        pipe.files.json.write = lambda snap, w=write, seen=written: (seen.append(snap), w(snap))
        pipe.start()
        for m in msgs:
            pipe.feed(m)
        pipe.finish()
        outs[name] = written
    assert len(outs["all"]) > 5  # the engine made many snapshots
    # the first, each change of status or health, and the final: not the others
    allsnaps, few = outs["all"], outs["few"]
    changes = [x for i, x in enumerate(allsnaps) if i == 0 or (x.status, x.is_healthy) !=
               (allsnaps[i - 1].status, allsnaps[i - 1].is_healthy)]
    assert few[-1].final and len(few) < len(allsnaps)
    assert [x.ts_us for x in few if not x.final] == [x.ts_us for x in changes if not x.final]
    for p in (tmp_path / "all").iterdir():
        assert p.read_bytes() == (tmp_path / "few" / p.name).read_bytes(), p.name
