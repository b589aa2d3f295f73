"""Columnar compression of record chunks (the payload of a recording's chunk frame).

A chunk holds consecutive Batches: a batch table (now_us, the AgentCounters of the file's
format version: 7 in version 1, 12 in version 2; the number of records) and the records of
all of them. Every column is encoded on its own: optionally zigzag delta (signed difference
to the previous value), narrowed to the smallest of 1/2/4/8 bytes that holds every value, and
byte-shuffled (all low bytes, then all next bytes...) so that zlib sees long runs of similar
bytes. Record fields other than ts_us, seq and kind are stored grouped by kind (stable), so
that e.g. FREE records' zero sizes sit together. Layout: see docs/format.md. Everything is
vectorised with numpy; nothing loops per record.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np

from .events import RECORD_DTYPE, RECORD_SIZE
from .messages import AgentCounters

try:  # ISA-L inflates the same zlib streams ~2.4x faster: decompression leads replay's decoding
    from isal import isal_zlib as _inflate_lib

    _INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, _inflate_lib.error)
except ImportError:  # not installed (e.g. Windows: `pip install nvse-monitor[fast]`)
    _inflate_lib = zlib  # type: ignore[assignment]
    _INFLATE_ERRORS = (zlib.error,)

COUNTER_FIELDS = tuple(f.name for f in dataclasses.fields(AgentCounters))
BATCH_COLUMNS = ("now_us", *COUNTER_FIELDS, "n_records")
# The counters a chunk's batch table holds, per recording format version (docs/format.md):
# version 1 predates the shared-memory ring's counters (read as 0).
COUNTERS_BY_VERSION = {1: COUNTER_FIELDS[:7], 2: COUNTER_FIELDS}
RECORD_FIELDS = tuple(RECORD_DTYPE.names or ())
# fields kept in stream order; the others are stored grouped by kind
UNGROUPED = ("ts_us", "seq", "kind")

RAW, ZIGZAG_DELTA, DICT = 0, 1, 2
DICT_COUNT = struct.Struct("<I")
WIDTHS = (1, 2, 4, 8)
CODEC_ZLIB = 1
CHUNK_HEADER = struct.Struct("<IIIB3x")  # n_batches, n_records, raw body size, codec
COLUMN_HEADER = struct.Struct("<BB")  # transform, width

MAX_RAW_BYTES = 128 << 20  # decompressed body cap (the writer stays far below it)
MAX_CHUNK_RECORDS = 1 << 20
MAX_CHUNK_BATCHES = 1 << 16


class ChunkError(ValueError):
    """A chunk payload that does not decode; the message says what is wrong (one line)."""


@dataclasses.dataclass
class BatchRow:
    now_us: int
    counters: AgentCounters
    n_records: int


def _zigzag_delta(v: np.ndarray) -> np.ndarray:
    d = np.diff(v, prepend=np.uint64(0))  # wraps modulo 2**64
    s = d.view(np.int64)
    return (s.view(np.uint64) << np.uint64(1)) ^ (s >> np.int64(63)).view(np.uint64)


def _undo_zigzag_delta(z: np.ndarray) -> np.ndarray:
    """Inverse of _zigzag_delta, in place (z: a u64 array of the caller's own)."""
    sign = z & np.uint64(1)
    np.negative(sign, out=sign)  # 0 or all ones
    z >>= np.uint64(1)
    z ^= sign
    return np.cumsum(z, out=z)


def _cost(v: np.ndarray) -> float:
    """Rough bits per value: mean bit length of a sample (picks the transform)."""
    sample = v[:: max(1, len(v) // 4096)]
    return float(np.log2(sample.astype(np.float64) + 1.0).sum())


def _few_distinct(v: np.ndarray) -> bool:
    """Whether a sample suggests a dictionary pays (cheap test before a full np.unique)."""
    sample = v[:: max(1, len(v) // 1024)]
    return len(np.unique(sample)) * 4 <= len(sample) * 3  # rules out nearly-all-distinct


def _encode_column(v: np.ndarray, allow_delta: bool) -> list[bytes | memoryview]:
    if len(v) >= 64 and v.dtype.itemsize > 1 and _few_distinct(v):
        # few distinct values (call sites, thread ids): a sorted dictionary plus small indices
        uniq = np.unique(v)  # hash-based, then a binary search: faster than return_inverse
        if len(uniq) * 8 <= len(v) and len(uniq) <= 65536:
            idx = np.searchsorted(uniq, v)
            width = 1 if len(uniq) <= 256 else 2
            planes = idx.astype(f"<u{width}").view(np.uint8).reshape(len(v), width).T
            return [
                COLUMN_HEADER.pack(DICT, width),
                DICT_COUNT.pack(len(uniq)),
                *_encode_column(uniq, allow_delta=True),
                np.ascontiguousarray(planes).data,
            ]
    v = v.astype(np.uint64, copy=False)
    transform = RAW
    if allow_delta and len(v) > 1:
        z = _zigzag_delta(v)
        if _cost(z) < _cost(v):
            v, transform = z, ZIGZAG_DELTA
    top = int(v.max()) if len(v) else 0
    width = next(w for w in WIDTHS if top < (1 << (8 * w)))
    narrow = v.astype(f"<u{width}")
    planes = narrow.view(np.uint8).reshape(len(v), width).T  # byte shuffle
    return [COLUMN_HEADER.pack(transform, width), np.ascontiguousarray(planes).data]


def encode_chunk(rows: list[BatchRow], records: np.ndarray, level: int = 3) -> bytes:
    """The chunk payload for these batches; records are all of theirs, concatenated."""
    if len(rows) > MAX_CHUNK_BATCHES or len(records) > MAX_CHUNK_RECORDS:
        raise ValueError("chunk too large")
    if sum(r.n_records for r in rows) != len(records):
        raise ValueError("batch record counts do not add up to the chunk's records")
    parts: list[bytes | memoryview] = []
    table = {
        "now_us": [r.now_us for r in rows],
        **{f: [getattr(r.counters, f) for r in rows] for f in COUNTER_FIELDS},
        "n_records": [r.n_records for r in rows],
    }
    for name in BATCH_COLUMNS:
        col = np.array(table[name], dtype=np.uint64) if rows else np.zeros(0, np.uint64)
        parts += _encode_column(col, allow_delta=name != "n_records")
    order = np.argsort(records["kind"], kind="stable")
    grouped = records[order]
    for name in RECORD_FIELDS:
        col = records[name] if name in UNGROUPED else grouped[name]
        parts += _encode_column(col, allow_delta=name in ("ts_us", "seq", "ptr", "caller"))
    body = b"".join(parts)
    return CHUNK_HEADER.pack(len(rows), len(records), len(body), CODEC_ZLIB) + zlib.compress(
        body, level
    )


class _Body:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def column(self, n: int, name: str, nested: bool = False) -> np.ndarray:
        """The column's values, as unsigned integers of its stored width or wider (u64 after a
        delta); callers cast them (modulo 2**bits, like the encoder's input) to their field."""
        if self.pos + COLUMN_HEADER.size > len(self.buf):
            raise ChunkError(f"column {name} header past the end of the chunk body")
        transform, width = COLUMN_HEADER.unpack_from(self.buf, self.pos)
        self.pos += COLUMN_HEADER.size
        if width not in WIDTHS or transform not in (RAW, ZIGZAG_DELTA, DICT):
            raise ChunkError(f"column {name}: bad encoding (transform {transform}, width {width})")
        uniq = None
        if transform == DICT:
            if nested or width > 2 or self.pos + DICT_COUNT.size > len(self.buf):
                raise ChunkError(f"column {name}: bad dictionary")
            (n_uniq,) = DICT_COUNT.unpack_from(self.buf, self.pos)
            self.pos += DICT_COUNT.size
            if not 0 < n_uniq <= min(n, 65536):
                raise ChunkError(f"column {name}: bad dictionary size {n_uniq}")
            uniq = self.column(n_uniq, name, nested=True)
        size = n * width
        if self.pos + size > len(self.buf):
            raise ChunkError(f"column {name}: {size} bytes needed, {len(self.buf) - self.pos} left")
        planes = np.frombuffer(self.buf, np.uint8, size, self.pos).reshape(width, n)
        self.pos += size
        v = _unshuffle(planes, width)
        if uniq is not None:
            if n and int(v.max()) >= len(uniq):
                raise ChunkError(f"column {name}: dictionary index out of range")
            return uniq.take(v)
        return _undo_zigzag_delta(v.astype(np.uint64)) if transform == ZIGZAG_DELTA else v


def _unshuffle(planes: np.ndarray, width: int) -> np.ndarray:
    """Values of `width` bytes from their byte planes (inverse of the encoder's byte shuffle).
    Shifts and ors of whole planes: several times faster than numpy's byte transpose."""
    if width == 1:
        return planes[0]
    if width == 8:
        lo = _unshuffle(planes[:4], 4).astype(np.uint64)
        lo |= _unshuffle(planes[4:], 4).astype(np.uint64) << np.uint64(32)
        return lo
    dt = np.dtype(f"<u{width}")
    v = planes[width - 1].astype(dt)
    for i in range(width - 2, -1, -1):
        v <<= 8
        v |= planes[i]
    return v


# Records are assembled as 7 little-endian 64-bit words each (RECORD_DTYPE has no padding):
# ts_us, ptr, old_ptr, size, caller, then tid | dur_us << 32, then kind | hook << 8 |
# flags << 16 | seq << 32; one transposing copy writes them all (field-by-field stores into
# 56-byte strides cost ~5x more).
_WORDS = np.dtype("<u8")
_WORD_FIELDS = ("ts_us", "ptr", "old_ptr", "size", "caller")
_PACKED = (("tid", 5, 0), ("dur_us", 5, 32), ("kind", 6, 0), ("hook", 6, 8), ("flags", 6, 16),
           ("seq", 6, 32))
assert RECORD_DTYPE.itemsize == 7 * 8 and all(
    RECORD_DTYPE.fields[f][1] == 8 * i for i, f in enumerate(_WORD_FIELDS))  # type: ignore[index]
assert all(RECORD_DTYPE.fields[f][1] == 8 * w + s // 8 for f, w, s in _PACKED)  # type: ignore[index]


def _assemble(cols: dict[str, np.ndarray], n: int) -> np.ndarray:
    """RECORD_DTYPE records from their columns in stream order (each cast to its field)."""
    words = np.zeros((7, n), _WORDS)
    for i, f in enumerate(_WORD_FIELDS):
        np.copyto(words[i], cols[f], casting="unsafe")
    tmp = np.empty(n, _WORDS)
    for f, w, shift in _PACKED:
        np.copyto(tmp, cols[f].astype(RECORD_DTYPE[f], copy=False), casting="unsafe")
        if shift:
            tmp <<= np.uint64(shift)
        words[w] |= tmp
    records = np.empty(n, RECORD_DTYPE)
    records.view(_WORDS).reshape(n, 7)[...] = words.T
    return records


def decode_chunk(payload: bytes, version: int = 2) -> tuple[list[BatchRow], np.ndarray]:
    """Inverse of encode_chunk (`version`: the recording's format version, which says which
    counters the batch table holds). Raises ChunkError (bounded work and memory on any input)."""
    counter_fields = COUNTERS_BY_VERSION[version]
    batch_columns = ("now_us", *counter_fields, "n_records")
    if len(payload) < CHUNK_HEADER.size:
        raise ChunkError(f"chunk payload of {len(payload)} bytes is shorter than its header")
    n_batches, n_records, raw_size, codec = CHUNK_HEADER.unpack_from(payload)
    if codec != CODEC_ZLIB:
        raise ChunkError(f"unknown chunk codec {codec}")
    if n_records > MAX_CHUNK_RECORDS or n_batches > MAX_CHUNK_BATCHES:
        raise ChunkError(f"absurd chunk counts ({n_batches} batches, {n_records} records)")
    most = COLUMN_HEADER.size * (len(batch_columns) + len(RECORD_FIELDS)) + (
        n_batches * len(batch_columns) * 8 + n_records * RECORD_SIZE
    )
    if raw_size > min(most, MAX_RAW_BYTES):
        raise ChunkError(f"absurd decompressed size {raw_size} for {n_records} records")
    d = _inflate_lib.decompressobj()
    try:
        body = d.decompress(memoryview(payload)[CHUNK_HEADER.size :], raw_size)
    except _INFLATE_ERRORS as e:
        raise ChunkError(f"compressed data is corrupt ({e})") from None
    if len(body) != raw_size or not d.eof or d.unconsumed_tail or d.unused_data:
        raise ChunkError(f"body does not decompress to the stated {raw_size} bytes")
    b = _Body(body)
    table = {name: b.column(n_batches, name) for name in batch_columns}
    counts = table["n_records"]
    if int(counts.sum(dtype=np.uint64)) != n_records or (counts > n_records).any():
        raise ChunkError(f"batch record counts do not add up to {n_records}")
    fields = {name: b.column(n_records, name) for name in RECORD_FIELDS}
    if b.pos != raw_size:
        raise ChunkError(f"{raw_size - b.pos} unexpected bytes after the last column")
    kind = fields["kind"].astype(RECORD_DTYPE["kind"], copy=False)
    # grouped columns are in stable kind order: record i is at inv[i] among them
    order = np.argsort(kind, kind="stable")
    inv = np.empty(n_records, np.intp)
    inv[order] = np.arange(n_records, dtype=np.intp)
    for name in RECORD_FIELDS:
        if name not in UNGROUPED:
            fields[name] = fields[name].take(inv)
    records = _assemble(fields, n_records)
    cols = {k: v.tolist() for k, v in table.items()}
    rows = [
        BatchRow(
            now_us=cols["now_us"][i],
            counters=AgentCounters(**{f: cols[f][i] for f in counter_fields}),
            n_records=cols["n_records"][i],
        )
        for i in range(n_batches)
    ]
    return rows, records
