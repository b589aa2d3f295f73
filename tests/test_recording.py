"""Recording files: round trips, the live-writer contract, and every kind of damage."""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvse_monitor.stream.codec import CHUNK_HEADER, MAX_CHUNK_RECORDS, BatchRow, decode_chunk
from nvse_monitor.stream.events import RECORD_DTYPE, Kind
from nvse_monitor.stream.messages import (
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    Module,
    ModuleEvent,
    SessionEnd,
    StreamMessage,
)
from nvse_monitor.stream.recording import (
    FILE_HEADER,
    FRAME_CHUNK,
    FRAME_CONTROL,
    FRAME_END,
    FRAME_HEADER,
    FRAME_META,
    MAGIC,
    MAX_FRAME_BYTES,
    RecordingError,
    RecordingWriter,
    _frame,
    info,
    open_recording,
    read_recording,
    write_recording,
)
from nvse_monitor.stream.synthetic import generate

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS.parent / "fixtures"


def same(a: StreamMessage, b: StreamMessage) -> bool:
    if isinstance(a, Batch) or isinstance(b, Batch):
        return (
            isinstance(a, Batch)
            and isinstance(b, Batch)
            and a.now_us == b.now_us
            and a.counters == b.counters
            and b.records.dtype == RECORD_DTYPE
            and np.array_equal(a.records, b.records)
        )
    return a == b


def assert_same(got: list[StreamMessage], want: list[StreamMessage]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert same(g, w), f"message {i} differs: {g!r} != {w!r}"


@pytest.fixture(scope="module")
def session():
    meta, msgs = generate(
        30_000,
        seed=7,
        drops=[(10_000, 300)],
        failed_hooks=["calloc"],
        controls=[
            (5_000, ModuleEvent(0, "add", Module("plugin.dll", 0x70000000, 0x10000, "C:\\p.dll"))),
            (5_000, HookEvent(0, -1, "plugin.dll", False, "prologue jumps into nvhr.dll")),
            (20_000, AgentError(0, "Error: access violation in onLeave")),
            (30_000, ModuleEvent(0, "remove", Module("plugin.dll", 0x70000000, 0x10000))),
        ],
        batch_records=1000,
    )
    return meta, list(msgs)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, session):
    meta, msgs = session
    path = tmp_path_factory.mktemp("rec") / "session.nvmrec"
    write_recording(path, meta, msgs, chunk_records=4096)
    return path


def frame_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(offset, type, total length) of every frame, parsed independently of the reader."""
    data = path.read_bytes()
    pos, out = FILE_HEADER.size, []
    while pos < len(data):
        ftype, _, _, length, _ = FRAME_HEADER.unpack_from(data, pos)
        out.append((pos, ftype, FRAME_HEADER.size + length))
        pos += FRAME_HEADER.size + length
    assert pos == len(data)
    return out


def read_all(path) -> tuple[list[StreamMessage], RecordingError | None]:
    rec = open_recording(path)
    got: list[StreamMessage] = []
    try:
        for m in rec:
            got.append(m)
    except RecordingError as e:
        assert rec.error is e and rec.ended_cleanly is False
        return got, e
    return got, None


def check_error(e: RecordingError, path, offset: int | None = None) -> None:
    s = str(e)
    assert "\n" not in s and str(path) in s
    if offset is not None:
        assert e.offset == offset and s.endswith(f"at byte {offset}")


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_preserves_every_message(recorded, session):
    meta, msgs = session
    rec = open_recording(recorded)
    assert rec.meta == meta
    got = list(rec)
    assert_same(got, msgs)
    assert rec.ended_cleanly and rec.error is None and rec.end == msgs[-1]
    assert {type(m) for m in got} == {Batch, HookEvent, ModuleEvent, AgentError, SessionEnd}
    assert rec.offset == recorded.stat().st_size


@pytest.mark.parametrize("chunk_records", [1, 777, 65536])
def test_chunking_does_not_change_the_messages(tmp_path, session, chunk_records):
    meta, msgs = session
    path = tmp_path / "r.nvmrec"
    write_recording(path, meta, msgs, chunk_records=chunk_records, chunk_us=10**12)
    assert_same(read_recording(path)[1], msgs)
    n_chunks = sum(1 for _, t, _ in frame_offsets(path) if t == FRAME_CHUNK)
    n_batches = sum(isinstance(m, Batch) for m in msgs)
    assert (n_chunks == n_batches) if chunk_records == 1 else (n_chunks < n_batches)


def test_chunks_never_span_a_control_message(recorded, session):
    _, msgs = session
    types = [t for _, t, _ in frame_offsets(recorded)]
    assert types[0] == FRAME_META and types[-1] == FRAME_END
    # hook events at start, a module add + hook event, an agent error, a module remove
    n_controls = sum(not isinstance(m, Batch | SessionEnd) for m in msgs)
    assert types.count(FRAME_CONTROL) == n_controls


def test_fixtures_are_readable_and_small():
    for name in ("synthetic-small.nvmrec", "synthetic-mixed.nvmrec"):
        path = FIXTURES / name
        rec = open_recording(path)
        n = sum(len(m.records) for m in rec if isinstance(m, Batch))
        assert rec.ended_cleanly and rec.meta.mode == "synthetic"
        assert path.stat().st_size < 1_000_000
        assert path.stat().st_size / n <= 8.0, "≤ 8 bytes per event on the fixtures"


def test_fixtures_match_their_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fixtures", TESTS / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, make in mod.FIXTURE_MAKERS.items():
        meta, msgs = make()
        write_recording(tmp_path / name, meta, msgs)
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), (
            f"{name} is stale: run python tests/make_fixtures.py"
        )


records_strategy = st.lists(
    st.tuples(
        st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 0x401000, 2**64 - 1]),
        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
        st.integers(0, 255), st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1),
    ),
    max_size=300,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=records_strategy, splits=st.lists(st.integers(0, 300), max_size=5),
       now=st.integers(0, 2**64 - 1), big=st.integers(0, 2**64 - 1))
def test_codec_is_lossless_on_arbitrary_records(tmp_path_factory, rows, splits, now, big):
    recs = np.array(rows, dtype=RECORD_DTYPE)
    cuts = sorted({min(s, len(recs)) for s in splits})
    parts = np.split(recs, cuts)
    msgs: list[StreamMessage] = [
        Batch(now_us=(now + i * 7) % 2**64, counters=AgentCounters(i, big, 0, 1, big, i, i),
              records=p)
        for i, p in enumerate(parts)
    ]
    msgs.append(SessionEnd(ts_us=now, reason="x", expected=False, counters=AgentCounters()))
    path = tmp_path_factory.mktemp("h") / "h.nvmrec"
    meta, _ = generate(0, seed=0)
    write_recording(path, meta, msgs)
    assert_same(read_recording(path)[1], msgs)


def test_empty_session_round_trips(tmp_path):
    meta, msgs = generate(0, seed=0, hook_events=False)
    msgs = list(msgs)
    assert [type(m) for m in msgs] == [SessionEnd]
    write_recording(tmp_path / "e.nvmrec", meta, msgs)
    assert_same(read_recording(tmp_path / "e.nvmrec")[1], msgs)


# --- live writing ------------------------------------------------------------------------------


def test_live_writer_file_is_readable_while_open(tmp_path, session):
    meta, msgs = session
    path = tmp_path / "live.nvmrec"
    w = RecordingWriter(path, meta, chunk_records=2000)
    half = len(msgs) // 2
    for m in msgs[:half]:
        w.write(m)
    w.flush()
    got, err = read_all(path)  # the writer is still open (as if it had been killed now)
    assert err is not None and "cut short" in str(err)
    check_error(err, path, path.stat().st_size)
    assert_same(got, msgs[:half])
    for m in msgs[half:]:
        w.write(m)
    w.close()
    assert_same(read_all(path)[0], msgs)
    with pytest.raises(ValueError):
        w.write(msgs[0])


def test_writer_refuses_messages_after_the_end(tmp_path, session):
    meta, msgs = session
    with RecordingWriter(tmp_path / "x.nvmrec", meta) as w:
        w.write(msgs[-1])
        with pytest.raises(ValueError):
            w.write(msgs[-1])


def test_unflushed_batches_are_written_by_time(tmp_path, session):
    meta, msgs = session
    path = tmp_path / "t.nvmrec"
    w = RecordingWriter(path, meta, chunk_records=10**6, chunk_us=50_000)
    batches = [m for m in msgs if isinstance(m, Batch)]
    for b in batches:
        w.write(b)
    # without flush or close, everything older than ~50 ms of agent time is on disk
    got, _ = read_all(path)
    assert sum(isinstance(m, Batch) for m in got) >= len(batches) // 2
    w.close()


# --- damage ------------------------------------------------------------------------------------


def test_truncation_at_every_frame_boundary_and_inside_every_frame(tmp_path, recorded, session):
    _, msgs = session
    data = recorded.read_bytes()
    frames = frame_offsets(recorded)
    cut_path = tmp_path / "cut.nvmrec"
    for i, (off, _, total) in enumerate(frames):
        for cut, expect_at in ((off, off), (off + 5, off), (off + total - 1, off)):
            cut_path.write_bytes(data[:cut])
            if i == 0:  # inside the metadata: opening fails
                with pytest.raises(RecordingError) as ei:
                    open_recording(cut_path)
                check_error(ei.value, cut_path, expect_at)
                continue
            got, err = read_all(cut_path)
            assert err is not None
            check_error(err, cut_path, expect_at)
            assert_same(got, msgs[: len(got)])  # an intact prefix
            assert ("cut short" in str(err)) == (cut == off)
            assert ("truncated frame" in str(err)) == (cut != off)
    # prefix lengths grow with the cut: the last cut loses only the trailer
    cut_path.write_bytes(data[: frames[-1][0]])
    assert len(read_all(cut_path)[0]) == len(msgs) - 1


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 15])
def test_truncated_header(tmp_path, recorded, cut):
    p = tmp_path / "h.nvmrec"
    p.write_bytes(recorded.read_bytes()[:cut])
    with pytest.raises(RecordingError) as ei:
        open_recording(p)
    check_error(ei.value, p)
    assert "truncated header" in str(ei.value)


def test_missing_file_and_directory(tmp_path):
    for p in (tmp_path / "nope.nvmrec", tmp_path):
        with pytest.raises(RecordingError) as ei:
            open_recording(p)
        check_error(ei.value, p)
        assert "cannot open" in str(ei.value)


def test_wrong_magic_and_unknown_version(tmp_path, recorded):
    data = bytearray(recorded.read_bytes())
    p = tmp_path / "m.nvmrec"
    p.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(RecordingError) as ei:
        open_recording(p)
    check_error(ei.value, p, 0)
    assert "bad magic" in str(ei.value)
    data[8:10] = struct.pack("<H", 3)
    p.write_bytes(bytes(data))
    with pytest.raises(RecordingError) as ei:
        open_recording(p)
    check_error(ei.value, p, 8)
    assert "unsupported format version 3" in str(ei.value)


def test_flipped_byte_in_every_frame_is_caught_by_its_crc(tmp_path, recorded, session):
    _, msgs = session
    data = recorded.read_bytes()
    p = tmp_path / "f.nvmrec"
    for i, (off, _ftype, total) in enumerate(frame_offsets(recorded)):
        for pos in (off + 8, off + FRAME_HEADER.size, off + total - 1):  # crc, payload start/end
            bad = bytearray(data)
            bad[pos] ^= 0x40
            p.write_bytes(bytes(bad))
            if i == 0:
                with pytest.raises(RecordingError) as ei:
                    open_recording(p)
                err = ei.value
            else:
                got, err = read_all(p)
                assert_same(got, msgs[: len(got)])
            check_error(err, p, off)
            assert "CRC mismatch" in str(err)


def test_absurd_frame_length_allocates_nothing(tmp_path, recorded):
    data = bytearray(recorded.read_bytes())
    off = frame_offsets(recorded)[1][0]
    for length in (MAX_FRAME_BYTES + 1, 2**32 - 1):
        data[off + 4 : off + 8] = struct.pack("<I", length)
        p = tmp_path / "l.nvmrec"
        p.write_bytes(bytes(data))
        got, err = read_all(p)
        assert err is not None and "corrupt frame length" in str(err)
        check_error(err, p, off)


def _with_frame(tmp_path, recorded, ftype: int, payload: bytes, at: int = 1) -> Path:
    """The recording with a validly-checksummed frame inserted before frame `at`."""
    data = recorded.read_bytes()
    off = frame_offsets(recorded)[at][0]
    p = tmp_path / "c.nvmrec"
    p.write_bytes(data[:off] + _frame(ftype, payload) + data[off:])
    return p


@pytest.mark.parametrize(
    ("ftype", "payload", "needle"),
    [
        (FRAME_CONTROL, b"{not json", "bad control JSON"),
        (FRAME_CONTROL, b"[1, 2]", "not an object"),
        (FRAME_CONTROL, b'{"type": "bogus"}', "bad control message"),
        (FRAME_CONTROL, b'{"type": "module", "ts_us": 1, "action": "add"}', "bad control"),
        (FRAME_CONTROL, b'{"type": "hook", "ts_us": -1, "hook": 0, "name": "x", "ok": true}',
         "ts_us"),
        (FRAME_CONTROL, json.dumps({"type": "end", "ts_us": 1, "reason": "x", "expected": True})
         .encode(), "session end in a control frame"),
        (FRAME_CONTROL, b"\xff\xfe", "bad control JSON"),
        (FRAME_CONTROL, b"[" * 100_000, "bad control JSON"),
        (FRAME_META, b"{}", "unexpected meta frame"),
        (FRAME_CHUNK, b"", "bad chunk"),
        (FRAME_CHUNK, CHUNK_HEADER.pack(1, 0, 10, 9), "unknown chunk codec"),
        (FRAME_CHUNK, CHUNK_HEADER.pack(2**32 - 1, 2**32 - 1, 2**32 - 1, 1), "absurd chunk"),
        (FRAME_CHUNK, CHUNK_HEADER.pack(1, 1000, 2**27, 1), "absurd decompressed size"),
        (FRAME_CHUNK, CHUNK_HEADER.pack(1, 10, 100, 1) + b"garbage", "corrupt"),
        (FRAME_CHUNK, CHUNK_HEADER.pack(0, 1000, 56000, 1) + zlib.compress(bytes(10**6)),
         "does not decompress to the stated"),
        (FRAME_CHUNK, CHUNK_HEADER.pack(1, 1, 20, 1) + zlib.compress(bytes(20)), "bad chunk"),
    ],
)
def test_checksummed_but_invalid_frames(tmp_path, recorded, session, ftype, payload, needle):
    _, msgs = session
    p = _with_frame(tmp_path, recorded, ftype, payload, at=3)
    got, err = read_all(p)
    assert err is not None, "the damaged frame must be reported"
    assert needle in str(err)
    check_error(err, p, frame_offsets(recorded)[3][0])
    assert_same(got, msgs[: len(got)])
    assert len(got) >= 2  # the frames before it were read


def test_bad_metadata(tmp_path):
    for payload, needle in [
        (b"nope", "bad metadata JSON"),
        (b'{"target": "x"}', "bad metadata"),
        (json.dumps({"target": "x", "pid": 1, "arch": "x", "platform": "x", "profile": "x",
                     "hooks": [{"name": 1}]}).encode(), "bad metadata"),
        (json.dumps({"target": "x", "pid": "1", "arch": "x", "platform": "x",
                     "profile": "x"}).encode(), "pid"),
    ]:
        p = tmp_path / "meta.nvmrec"
        p.write_bytes(FILE_HEADER.pack(MAGIC, 1, 0, 0) + _frame(FRAME_META, payload))
        with pytest.raises(RecordingError) as ei:
            open_recording(p)
        check_error(ei.value, p, FILE_HEADER.size)
        assert needle in str(ei.value)


def test_first_frame_must_be_metadata(tmp_path):
    p = tmp_path / "nometa.nvmrec"
    p.write_bytes(FILE_HEADER.pack(MAGIC, 1, 0, 0) + _frame(FRAME_CONTROL, b"{}"))
    with pytest.raises(RecordingError) as ei:
        open_recording(p)
    assert "not the metadata" in str(ei.value)


def test_data_after_the_trailer(tmp_path, recorded, session):
    p = tmp_path / "tail.nvmrec"
    p.write_bytes(recorded.read_bytes() + b"\0")
    got, err = read_all(p)
    assert err is not None and "data after the trailer" in str(err)
    check_error(err, p, recorded.stat().st_size)
    assert len(got) == len(session[1]) - 1  # everything but the trailer's SessionEnd


def test_decode_chunk_rejects_counts_that_do_not_add_up():
    from nvse_monitor.stream.codec import encode_chunk

    recs = np.zeros(3, RECORD_DTYPE)
    payload = encode_chunk([BatchRow(0, AgentCounters(), 3)], recs)
    rows, back = decode_chunk(payload)
    assert rows[0].n_records == 3 and len(back) == 3
    with pytest.raises(ValueError):
        encode_chunk([BatchRow(0, AgentCounters(), 2)], recs)
    with pytest.raises(ValueError):
        encode_chunk([], np.zeros(MAX_CHUNK_RECORDS + 1, RECORD_DTYPE))


# --- info ----------------------------------------------------------------------------------------


def test_info_summarises_a_clean_recording(recorded, session):
    meta, msgs = session
    s = info(recorded)
    records = np.concatenate([m.records for m in msgs if isinstance(m, Batch)])
    assert s.clean and s.error is None and s.meta == meta
    assert s.records == len(records)
    assert s.kinds["ALLOC"] == int((records["kind"] == Kind.ALLOC).sum())
    assert s.kinds["FREE"] == int((records["kind"] == Kind.FREE).sum())
    assert s.messages["batch"] == sum(isinstance(m, Batch) for m in msgs)
    assert s.messages["module"] == 2 and s.messages["agent-error"] == 1
    assert s.counters == msgs[-1].counters and s.counters.dropped == 300
    assert s.first_ts_us == int(records["ts_us"].min())
    text = "\n".join(s.lines())
    assert "FalloutNV.exe base=0x400000" in text and "ended cleanly: yes" in text


def test_info_reports_damage_without_raising(tmp_path, recorded):
    p = tmp_path / "d.nvmrec"
    p.write_bytes(recorded.read_bytes()[: frame_offsets(recorded)[-2][0] + 20])
    s = info(p)
    assert not s.clean and s.error and str(p) in s.error and s.records > 0
    assert "ended cleanly: no" in "\n".join(s.lines())


# --- issue 13: the ring's counters (format version 2) and older recordings -----------------------

RING = AgentCounters(allocs=5, frees=4, reallocs=1, failures=0, bytes_allocated=99, dropped=7,
                     published=10, dropped_frees=3, stalls=11, stall_us=12_345,
                     stall_max_us=2**40, unknown_records=2)


def test_ring_counters_round_trip_in_batches_and_trailer(tmp_path):
    meta, _ = generate(0, seed=0)
    msgs: list[StreamMessage] = [
        Batch(10, AgentCounters(stalls=1, stall_us=5, stall_max_us=5), np.zeros(0, RECORD_DTYPE)),
        Batch(20, RING, np.zeros(0, RECORD_DTYPE)),
        SessionEnd(30, "target-exited", True, counters=RING),
    ]
    path = tmp_path / "r.nvmrec"
    write_recording(path, meta, msgs)
    rec = open_recording(path)
    assert rec.version == 2
    assert_same(list(rec), msgs)
    lines = info(path).lines()
    assert "ring counters: dropped frees 3, stalls 11 (12345 µs, longest 1099511627776 µs), " \
        "unknown records 2" in lines


def test_version_1_recordings_are_read_with_ring_counters_zero():
    # the live fixtures were recorded before issue 13 (format version 1, 7 counters)
    for name in ("live-x64.nvmrec", "live-ia32.nvmrec"):
        rec = open_recording(FIXTURES / name)
        assert rec.version == 1
        msgs = list(rec)
        assert rec.ended_cleanly
        batches = [m for m in msgs if isinstance(m, Batch)]
        assert batches and batches[-1].counters.published > 0
        for c in [b.counters for b in batches] + [rec.end.counters]:
            assert (c.dropped_frees, c.stalls, c.stall_us, c.stall_max_us,
                    c.unknown_records) == (0, 0, 0, 0, 0)
        assert not any(ln.startswith("ring counters") for ln in info(FIXTURES / name).lines())


def test_trailer_counters_of_any_version_are_accepted():
    from nvse_monitor.stream.messages import control_from_json

    old = {"type": "end", "ts_us": 5, "reason": "x", "expected": True, "crash": "",
           "counters": {"allocs": 1, "frees": 0, "reallocs": 0, "failures": 0,
                        "bytes_allocated": 8, "dropped": 2, "published": 1}}
    end = control_from_json(old)
    assert end.counters == AgentCounters(allocs=1, bytes_allocated=8, dropped=2, published=1)
    newer = dict(old, counters={**old["counters"], "stalls": 4, "from_the_future": 9})
    assert control_from_json(newer).counters.stalls == 4  # unknown keys ignored
    with pytest.raises(ValueError, match="counters is not an object"):
        control_from_json(dict(old, counters=[1, 2]))


def test_trailer_with_a_non_integer_ring_counter_is_damage(tmp_path):
    meta, _ = generate(0, seed=0)
    path = tmp_path / "t.nvmrec"
    write_recording(path, meta, [SessionEnd(1, "x", True, counters=RING)])
    data = path.read_bytes()
    bad = json.dumps({"type": "end", "ts_us": 1, "reason": "x", "expected": True, "crash": "",
                      "counters": {"stalls": "many"}}, separators=(",", ":")).encode()
    end = data.rindex(struct.pack("<B", FRAME_END) + b"\0\0\0")
    path.write_bytes(data[:end] + _frame(FRAME_END, bad))
    with pytest.raises(RecordingError, match="bad trailer message .counters.stalls is not an "
                       "integer") as ei:
        list(open_recording(path))
    check_error(ei.value, path, end)
