"""Fuzzing the recording reader (issue 5, "Bad input — Recordings").

Every mutated file must end in a RecordingError (one line, naming the file and a byte offset)
or a clean read; with mutations the CRCs can see, what was read must be an intact prefix of
the original messages. Never another exception, a hang or unbounded memory.

Three levels of mutation, so the decoders behind the CRC are fuzzed too:
  raw     truncation, flipped bytes, absurd u32 lengths/counts, inserted/deleted bytes
  frame   a frame's payload mutated and its CRC recomputed (JSON and chunk parsers)
  body    a chunk's decompressed body or header mutated, recompressed and re-checksummed
          (column transforms, widths, dictionaries, counts, sizes)

CI runs NVSE_FUZZ_CASES (default 2000) cases with a fixed seed in ~10-20 s. A longer run:
    NVSE_FUZZ_CASES=200000 python -m pytest tests/test_fuzz_recording.py -q -s
"""

from __future__ import annotations

import functools
import os
import resource
import signal
import struct
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nvse_monitor.stream.codec import CHUNK_HEADER
from nvse_monitor.stream.messages import AgentError, Batch, HookEvent, Module, ModuleEvent
from nvse_monitor.stream.recording import (
    FILE_HEADER,
    FRAME_CHUNK,
    FRAME_HEADER,
    RecordingError,
    open_recording,
    write_recording,
)
from nvse_monitor.stream.synthetic import generate

N_CASES = int(os.environ.get("NVSE_FUZZ_CASES", "2000"))
CASE_TIMEOUT_S = 10
ABSURD_U32 = [0, 1, 11, 12, 13, 55, 56, 57, 255, 65535, 2**20, 2**20 + 1, 2**26, 2**26 + 1,
              2**27, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]


@functools.cache
def base() -> tuple[bytes, list, list[tuple[int, int, int]]]:
    """A small recording with every frame type, its messages, and its frames' (off, type, len)."""
    plugin = Module("plugin.dll", 0x70000000, 0x10000, "C:\\plugin.dll")
    meta, msgs = generate(
        3000, seed=11, batch_records=150, drops=[(1000, 40)], failed_hooks=["calloc"],
        controls=[(700, ModuleEvent(0, "add", plugin)), (700, HookEvent(0, -1, "x", False, "no")),
                  (2500, AgentError(0, "boom"))],
    )
    msgs = list(msgs)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "base.nvmrec"
        write_recording(p, meta, msgs, chunk_records=700)
        data = p.read_bytes()
    frames, pos = [], FILE_HEADER.size
    while pos < len(data):
        ftype, _, _, length, _ = FRAME_HEADER.unpack_from(data, pos)
        frames.append((pos, ftype, length))
        pos += FRAME_HEADER.size + length
    return data, msgs, frames


def reframe(ftype: int, payload: bytes) -> bytes:
    head = struct.pack("<BBHI", ftype, 0, 0, len(payload))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)) & 0xFFFFFFFF) + payload


# --- mutations ---------------------------------------------------------------------------------


def position(draw, n: int) -> int:
    """A position in [0, n): hypothesis favours small integers, so pick one of 32 equal
    slices uniformly first, then a place inside it."""
    if n <= 1:
        return 0
    k = draw(st.sampled_from(range(32)))
    lo, hi = k * n // 32, max(k * n // 32, (k + 1) * n // 32 - 1)
    return draw(st.integers(lo, hi))


@st.composite
def bytes_mutation(draw, data: bytes) -> bytes:
    """One mutation of a byte string (any position, any kind)."""
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "u32", "insert", "delete", "extend"]))
    if kind == "truncate" or n == 0:
        return data[: position(draw, n)]
    pos = position(draw, n)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[position(draw, n)] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "u32":
        value = draw(st.sampled_from(ABSURD_U32) | st.integers(0, 2**32 - 1))
        return data[:pos] + struct.pack("<I", value) + data[pos + 4 :]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=64)) + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + draw(st.integers(1, 64)) :]
    return data + draw(st.binary(min_size=1, max_size=64))


@st.composite
def raw_case(draw) -> tuple[str, bytes]:
    data, _, _ = base()
    return "raw", draw(bytes_mutation(data))


@st.composite
def frame_case(draw) -> tuple[str, bytes]:
    data, _, frames = base()
    off, ftype, length = draw(st.sampled_from(frames))
    payload = data[off + FRAME_HEADER.size : off + FRAME_HEADER.size + length]
    new_type = draw(st.sampled_from([ftype, ftype, ftype, 1, 2, 3, 4]))
    new = reframe(new_type, draw(bytes_mutation(payload)))
    return "frame", data[:off] + new + data[off + FRAME_HEADER.size + length :]


@st.composite
def body_case(draw) -> tuple[str, bytes]:
    data, _, frames = base()
    chunks = [f for f in frames if f[1] == FRAME_CHUNK]
    off, _, length = draw(st.sampled_from(chunks))
    payload = data[off + FRAME_HEADER.size : off + FRAME_HEADER.size + length]
    n_batches, n_records, raw_size, codec = CHUNK_HEADER.unpack_from(payload)
    body = zlib.decompress(payload[CHUNK_HEADER.size :])
    target = draw(st.sampled_from(["body", "body", "body", "header"]))
    if target == "body":
        body = draw(bytes_mutation(body))
        if draw(st.booleans()):
            raw_size = len(body)  # keep the stated size consistent, so the columns get parsed
    else:
        field = draw(st.integers(0, 3))
        values = [n_batches, n_records, raw_size, codec]
        values[field] = draw(st.sampled_from(ABSURD_U32) | st.integers(0, 2**32 - 1))
        if field == 3:
            values[3] %= 256
        n_batches, n_records, raw_size, codec = values
    new_payload = CHUNK_HEADER.pack(n_batches, n_records, raw_size, codec) + zlib.compress(body, 1)
    new = reframe(FRAME_CHUNK, new_payload)
    return "body", data[:off] + new + data[off + FRAME_HEADER.size + length :]


# --- the check ---------------------------------------------------------------------------------


def same(a, b) -> bool:
    if isinstance(a, Batch) and isinstance(b, Batch):
        return (a.now_us == b.now_us and a.counters == b.counters
                and np.array_equal(a.records, b.records))
    return a == b


def check_one(path: Path, level: str, data: bytes) -> str:
    """Reads a mutated file; returns the outcome ('error-open', 'error-read', 'clean')."""
    _, msgs, _ = base()
    path.write_bytes(data)
    got = []
    outcome = "clean"
    try:
        rec = open_recording(path)
        try:
            for m in rec:
                got.append(m)
        except RecordingError as e:
            outcome = "error-read"
            check_line(e, path)
    except RecordingError as e:
        outcome = "error-open"
        check_line(e, path)
    if level == "raw":
        # CRCs guard every frame: what was read is an intact prefix of the original
        assert len(got) <= len(msgs)
        for i, (g, w) in enumerate(zip(got, msgs, strict=False)):
            assert same(g, w), f"message {i} was altered yet read"
    return outcome


def check_line(e: RecordingError, path: Path) -> None:
    s = str(e)
    assert "\n" not in s and "\r" not in s, s
    assert s.startswith(f"{path}: "), s
    if e.offset is not None:
        assert s.endswith(f" at byte {e.offset}"), s
    else:
        assert "cannot open" in s, s


def _timeout(signum, frame):  # pragma: no cover - only on a hang
    raise TimeoutError(f"a fuzz case took more than {CASE_TIMEOUT_S} s")


def test_fuzz_reader(tmp_path, record_property):
    base()
    path = tmp_path / "fuzz.nvmrec"
    outcomes: Counter[str] = Counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, _timeout)

    @settings(max_examples=N_CASES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(raw_case(), frame_case(), body_case()))
    def run(case):
        level, data = case
        signal.alarm(CASE_TIMEOUT_S)
        try:
            outcome = check_one(path, level, data)
        finally:
            signal.alarm(0)
        outcomes[level] += 1
        outcomes[f"{level}:{outcome}"] += 1

    try:
        run()
    finally:
        signal.signal(signal.SIGALRM, old)
    ran = sum(outcomes[k] for k in ("raw", "frame", "body"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"\nfuzz: {ran} cases ({summary}); max RSS grew {grown_mb:.0f} MB")
    record_property("fuzz_cases", ran)
    assert ran == N_CASES
    # every level ran, and the decoders behind the CRC did see input they had to reject
    assert all(outcomes[k] > N_CASES // 10 for k in ("raw", "frame", "body"))
    assert outcomes["body:error-read"] > 0 and outcomes["frame:error-read"] > 0
    assert grown_mb < 512, "reading damaged files must not allocate without bound"


@pytest.mark.parametrize("value", [2**32 - 1, 2**31, 2**26 + 1])
def test_absurd_lengths_fail_fast(tmp_path, value):
    """Every length/count field set to an absurd value: an error, quickly, no big allocation."""
    data, _, frames = base()
    path = tmp_path / "absurd.nvmrec"
    for off, ftype, _ in frames:
        bad = bytearray(data)
        bad[off + 4 : off + 8] = struct.pack("<I", value)
        assert check_one(path, "raw", bytes(bad)) != "clean"
        if ftype == FRAME_CHUNK:
            payload = bytearray(data[off + FRAME_HEADER.size : off + FRAME_HEADER.size + _len(
                data, off)])
            for field in range(3):
                p2 = bytearray(payload)
                p2[4 * field : 4 * field + 4] = struct.pack("<I", value)
                mutated = data[:off] + reframe(ftype, bytes(p2)) + data[off + FRAME_HEADER.size
                                                                         + len(payload):]
                assert check_one(path, "frame", mutated) == "error-read"


def _len(data: bytes, off: int) -> int:
    return FRAME_HEADER.unpack_from(data, off)[3]
