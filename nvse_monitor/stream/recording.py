"""Recording files (.nvmrec): a session's stream messages, in order, compressed.

Layout (byte by byte in docs/format.md): a 16-byte header (magic, format version), then
self-checking frames (type, length, CRC32): one META frame (SessionMeta JSON), then CHUNK
frames (consecutive Batches, columnar + zlib, see codec.py) and CONTROL frames (module, hook,
agent-error, addrspace messages) in stream order, and an END frame (the SessionEnd, with the
final agent counters) as the trailer. Reading back gives exactly the messages written: the same
Batches (now_us, counters, records) and control messages in the same order.

Damage: iterating a Recording yields every message of the intact frames, then raises
RecordingError (one line: file, byte offset, what is wrong). A file without a trailer (a writer
that was killed) is damage too, reported after its last complete frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from .codec import (
    MAX_CHUNK_BATCHES,
    MAX_CHUNK_RECORDS,
    BatchRow,
    ChunkError,
    decode_chunk,
    encode_chunk,
)
from .events import RECORD_DTYPE, Kind
from .messages import (
    AddressSpace,
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    ModuleEvent,
    SessionEnd,
    SessionMeta,
    StreamMessage,
    SymbolNames,
    control_from_json,
    control_to_json,
)

MAGIC = b"\x89NVMREC\n"  # non-ASCII first byte and a newline: catches text-mode mangling
FORMAT_VERSION = 2  # what the writer writes
# What the reader reads: version 1 chunks lack the counters of the shared-memory ring (issue 13).
READ_VERSIONS = (1, 2)
FILE_HEADER = struct.Struct("<8sHHI")  # magic, version, flags (0), reserved (0)
FRAME_HEADER = struct.Struct("<BBHII")  # type, flags (0), reserved (0), payload length, CRC32

FRAME_META, FRAME_CHUNK, FRAME_CONTROL, FRAME_END = 1, 2, 3, 4
FRAME_NAMES = {FRAME_META: "meta", FRAME_CHUNK: "chunk", FRAME_CONTROL: "control", FRAME_END: "end"}
MAX_FRAME_BYTES = 64 << 20  # a larger length field is corruption, never an allocation
MAX_JSON_BYTES = 16 << 20

DEFAULT_CHUNK_RECORDS = 65536
DEFAULT_CHUNK_US = 1_000_000


class RecordingError(Exception):
    """A recording that cannot be read (further). str() is one line naming file and offset."""

    def __init__(self, path: str, offset: int | None, problem: str) -> None:
        self.path, self.offset, self.problem = path, offset, " ".join(problem.split())
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}: {self.problem}{where}")


def _crc(header_head: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(header_head)) & 0xFFFFFFFF


def _frame(ftype: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    head = struct.pack("<BBHI", ftype, 0, 0, len(payload))
    return head + struct.pack("<I", _crc(head, payload)) + payload


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# writing


class RecordingWriter:
    """Appends a session's messages to a recording as they come (usable live).

    Batches are buffered and written as one chunk frame when `chunk_records` records or
    `chunk_us` of agent time have accumulated, before any control message (order is kept),
    on flush() and on close(). Every frame is written whole and flushed to the OS, so a writer
    killed at any point leaves a file readable up to its last complete frame. `level` is the
    zlib level: 3 keeps encoding at ~1.5-3 M events/s (bench/bench_format.py); 6 saves ~5-10 %
    more space at half the speed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: SessionMeta,
        *,
        chunk_records: int = DEFAULT_CHUNK_RECORDS,
        chunk_us: int = DEFAULT_CHUNK_US,
        level: int = 3,
    ) -> None:
        self.path = os.fspath(path)
        self.chunk_records = max(1, min(chunk_records, MAX_CHUNK_RECORDS))
        self.chunk_us = chunk_us
        self.level = level
        self._rows: list[BatchRow] = []
        self._recs: list[np.ndarray] = []
        self._pending = 0
        self._first_now: int | None = None
        self._ended = False
        self.messages = 0
        self.records = 0
        meta_payload = _json_bytes(meta.to_json())
        if len(meta_payload) > MAX_JSON_BYTES:
            raise ValueError("session metadata is too large")
        self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._f.write(FILE_HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0))
        self._f.write(_frame(FRAME_META, meta_payload))
        self._f.flush()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_written(self) -> int:
        return self._f.tell() if self._f is not None else os.path.getsize(self.path)

    def write(self, msg: StreamMessage) -> None:
        if self._f is None:
            raise ValueError("recording writer is closed")
        if self._ended:
            raise ValueError("message after the session end")
        self.messages += 1
        if isinstance(msg, Batch):
            self._add_batch(msg)
            return
        self._write_chunk()
        if isinstance(msg, SessionEnd):
            self._write_frame(FRAME_END, _json_bytes(control_to_json(msg)))
            self._ended = True
        elif isinstance(msg, ModuleEvent | HookEvent | AgentError | AddressSpace | SymbolNames):
            self._write_frame(FRAME_CONTROL, _json_bytes(control_to_json(msg)))
        else:
            raise TypeError(f"not a stream message: {type(msg).__name__}")

    def flush(self) -> None:
        """Write buffered batches now (e.g. on a timer while the target is quiet)."""
        if self._f is not None:
            self._write_chunk()

    def close(self) -> None:
        """Writes what is buffered and closes. Without a SessionEnd written the file has no
        trailer and readers report it as cut short after its last frame."""
        if self._f is None:
            return
        try:
            self._write_chunk()
        finally:
            self._f.close()
            self._f = None

    def _add_batch(self, b: Batch) -> None:
        recs = b.records
        if recs.dtype != RECORD_DTYPE:
            raise TypeError(f"batch records must be RECORD_DTYPE, not {recs.dtype}")
        if self._pending + len(recs) > MAX_CHUNK_RECORDS or len(self._rows) >= MAX_CHUNK_BATCHES:
            self._write_chunk()
        self._rows.append(BatchRow(b.now_us, b.counters, len(recs)))
        if len(recs):
            self._recs.append(recs)
        self._pending += len(recs)
        self.records += len(recs)
        if self._first_now is None:
            self._first_now = b.now_us
        if self._pending >= self.chunk_records or b.now_us - self._first_now >= self.chunk_us:
            self._write_chunk()

    def _write_chunk(self) -> None:
        if not self._rows:
            return
        recs = (
            np.concatenate(self._recs) if len(self._recs) > 1
            else self._recs[0] if self._recs
            else np.zeros(0, RECORD_DTYPE)
        )
        payload = encode_chunk(self._rows, recs, self.level)
        self._rows, self._recs, self._pending, self._first_now = [], [], 0, None
        self._write_frame(FRAME_CHUNK, payload)

    def _write_frame(self, ftype: int, payload: bytes) -> None:
        assert self._f is not None
        self._f.write(_frame(ftype, payload))
        self._f.flush()


def write_recording(
    path: str | os.PathLike[str], meta: SessionMeta, messages: Iterator[StreamMessage] | list,
    **kwargs: Any,
) -> RecordingWriter:
    """Writes every message (the last one normally a SessionEnd) and closes the file."""
    with RecordingWriter(path, meta, **kwargs) as w:
        for m in messages:
            w.write(m)
    return w


# ---------------------------------------------------------------------------------------------
# reading


class Recording:
    """An open recording: `.meta`, and iteration over its messages (a stream, read lazily).

    Iteration yields the messages of every intact frame and then, on damage, raises
    RecordingError (also kept in `.error`). After a full iteration `.ended_cleanly` says
    whether the trailer was there; `.end` is the trailer's SessionEnd. `.offset` is the byte
    offset just after the last frame read (progress). Iterate once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.error: RecordingError | None = None
        self.end: SessionEnd | None = None
        self.ended_cleanly: bool | None = None  # None until iteration has finished
        self.frames: Counter[str] = Counter()
        try:
            self._f: BinaryIO | None = open(self.path, "rb")  # noqa: SIM115 (closed by close())
            self.size = os.fstat(self._f.fileno()).st_size
        except OSError as e:
            raise RecordingError(self.path, None, f"cannot open recording ({e.strerror})") from None
        try:
            self.version = self._read_header()
            self.offset = FILE_HEADER.size
            ftype, payload, start = self._read_frame()
            if ftype != FRAME_META:
                raise self._err(start, f"first frame is {self._type_name(ftype)}, not the metadata")
            self.meta = self._meta(payload, start)
        except BaseException:
            self.close()
            raise
        self._started = False

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _err(self, offset: int | None, problem: str) -> RecordingError:
        return RecordingError(self.path, offset, problem)

    @staticmethod
    def _type_name(ftype: int) -> str:
        return f"a {FRAME_NAMES[ftype]} frame" if ftype in FRAME_NAMES else f"unknown type {ftype}"

    def _read(self, n: int) -> bytes:
        assert self._f is not None
        return self._f.read(n)

    def _read_header(self) -> int:
        head = self._read(FILE_HEADER.size)
        if len(head) < len(MAGIC) or not head.startswith(MAGIC):
            if MAGIC.startswith(head):
                raise self._err(
                    0, f"truncated header (file is {len(head)} bytes, need {FILE_HEADER.size})"
                )
            raise self._err(0, "not an nvse-monitor recording (bad magic)")
        if len(head) < FILE_HEADER.size:
            raise self._err(
                len(head), f"truncated header (file is {len(head)} bytes, need {FILE_HEADER.size})"
            )
        _, version, _flags, _ = FILE_HEADER.unpack(head)
        if version not in READ_VERSIONS:
            known = ", ".join(str(v) for v in READ_VERSIONS)
            raise self._err(
                len(MAGIC), f"unsupported format version {version} (this reader knows "
                f"{known}; a newer nvse-monitor may read it)"
            )
        return version

    def _read_frame(self) -> tuple[int, bytes, int]:
        """(type, payload, frame start) of the next frame; type 0 at a clean end of file."""
        start = self.offset
        head = self._read(FRAME_HEADER.size)
        if not head:
            return 0, b"", start
        if len(head) < FRAME_HEADER.size:
            raise self._err(
                start, f"truncated frame header (expected {FRAME_HEADER.size} bytes, "
                f"found {len(head)})"
            )
        ftype, flags, reserved, length, crc = FRAME_HEADER.unpack(head)
        if ftype not in FRAME_NAMES or flags or reserved:
            raise self._err(start, f"corrupt frame header (type {ftype}, flags {flags})")
        if length > MAX_FRAME_BYTES:
            raise self._err(
                start, f"corrupt frame length {length} (limit {MAX_FRAME_BYTES})"
            )
        payload = self._read(length)
        if len(payload) < length:
            raise self._err(
                start, f"truncated frame (expected {length} bytes, found {len(payload)})"
            )
        if _crc(head[:8], payload) != crc:
            raise self._err(start, f"corrupt {FRAME_NAMES[ftype]} frame (CRC mismatch)")
        self.offset = start + FRAME_HEADER.size + length
        self.frames[FRAME_NAMES[ftype]] += 1
        return ftype, payload, start

    def _json(self, payload: bytes, start: int, what: str) -> dict[str, Any]:
        if len(payload) > MAX_JSON_BYTES:
            raise self._err(start, f"{what} frame too large ({len(payload)} bytes)")
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._err(start, f"bad {what} JSON ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise self._err(start, f"bad {what} JSON (not an object)")
        return obj

    def _meta(self, payload: bytes, start: int) -> SessionMeta:
        d = self._json(payload, start, "metadata")
        try:
            meta = SessionMeta.from_json(d)
            _check_meta(meta)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise self._err(start, f"bad metadata ({_one_line(e)})") from None
        return meta

    def _control(self, payload: bytes, start: int, what: str) -> StreamMessage:
        d = self._json(payload, start, what)
        try:
            msg = control_from_json(d)
            _check_control(msg)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise self._err(start, f"bad {what} message ({_one_line(e)})") from None
        return msg

    def __iter__(self) -> Iterator[StreamMessage]:
        if self._started:
            raise RuntimeError("a Recording can be iterated only once; open it again")
        self._started = True
        try:
            yield from self._messages()
        except RecordingError as e:
            self.error = e
            self.ended_cleanly = False
            raise
        finally:
            self.close()

    def _messages(self) -> Iterator[StreamMessage]:
        if self._f is None:
            raise self._err(self.offset, "recording is closed")
        while True:
            ftype, payload, start = self._read_frame()
            if ftype == 0:
                raise self._err(start, "recording cut short: no trailer after the last frame")
            if ftype == FRAME_CHUNK:
                try:
                    rows, records = decode_chunk(payload, self.version)
                except ChunkError as e:
                    raise self._err(start, f"bad chunk ({e})") from None
                pos = 0
                for row in rows:
                    recs = records[pos : pos + row.n_records]
                    pos += row.n_records
                    yield Batch(now_us=row.now_us, counters=row.counters, records=recs)
            elif ftype == FRAME_CONTROL:
                msg = self._control(payload, start, "control")
                if isinstance(msg, SessionEnd):
                    raise self._err(start, "session end in a control frame")
                yield msg
            elif ftype == FRAME_END:
                end = self._control(payload, start, "trailer")
                if not isinstance(end, SessionEnd):
                    raise self._err(start, "trailer is not a session end")
                after = self.offset
                if self._read(1):
                    raise self._err(after, "data after the trailer")
                self.end = end
                self.ended_cleanly = True
                yield end
                return
            else:
                raise self._err(start, f"unexpected {FRAME_NAMES[ftype]} frame")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _check_int(name: str, v: Any, lo: int = 0, hi: int = (1 << 64) - 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} is not an integer in [{lo}, {hi}]: {v!r}")


def _check_str(name: str, v: Any) -> None:
    if not isinstance(v, str):
        raise ValueError(f"{name} is not a string: {v!r}"[:120])


def _check_meta(m: SessionMeta) -> None:
    for name in ("target", "arch", "platform", "profile", "monitor_version", "mode"):
        _check_str(name, getattr(m, name))
    _check_int("pid", m.pid, -(1 << 63), (1 << 63) - 1)
    _check_int("wall_clock_zero_us", m.wall_clock_zero_us, -(1 << 63), (1 << 63) - 1)
    _check_int("utc_offset_s", m.utc_offset_s, -(1 << 31), 1 << 31)
    for i, h in enumerate(m.hooks):
        for name in ("name", "heap", "role", "module"):
            _check_str(f"hooks[{i}].{name}", getattr(h, name))
    for i, mod in enumerate(m.modules):
        _check_module(f"modules[{i}]", mod)
    if not isinstance(m.extra, dict):
        raise ValueError("extra is not an object")


def _check_module(where: str, mod: Any) -> None:
    _check_str(f"{where}.name", mod.name)
    _check_str(f"{where}.path", mod.path)
    _check_int(f"{where}.base", mod.base)
    _check_int(f"{where}.size", mod.size)


def _check_control(msg: Any) -> None:
    _check_int("ts_us", msg.ts_us)
    if isinstance(msg, ModuleEvent):
        if msg.action not in ("add", "remove"):
            raise ValueError(f"module action {msg.action!r}"[:120])
        _check_module("module", msg.module)
    elif isinstance(msg, HookEvent):
        _check_int("hook", msg.hook, -1, 1 << 31)
        _check_str("name", msg.name)
        _check_str("detail", msg.detail)
        if not isinstance(msg.ok, bool):
            raise ValueError("ok is not a boolean")
    elif isinstance(msg, AgentError):
        _check_str("message", msg.message)
    elif isinstance(msg, AddressSpace):
        for name in ("mapped", "committed", "reserved", "regions"):
            _check_int(name, getattr(msg, name))
        for name in ("free", "largest_free", "limit"):
            if getattr(msg, name) is not None:
                _check_int(name, getattr(msg, name))
    elif isinstance(msg, SymbolNames):
        for a, n in msg.names.items():
            _check_int("symbol address", a)
            _check_str("symbol name", n)
        _check_str("error", msg.error)
        _check_int("unresolved", msg.unresolved)
    elif isinstance(msg, SessionEnd):
        _check_str("reason", msg.reason)
        _check_str("crash", msg.crash)
        if not isinstance(msg.expected, bool):
            raise ValueError("expected is not a boolean")
        if msg.counters is not None:
            for f in dataclasses.fields(AgentCounters):
                _check_int(f"counters.{f.name}", getattr(msg.counters, f.name))


def open_recording(path: str | os.PathLike[str]) -> Recording:
    """Opens a recording and reads its header and metadata. Raises RecordingError."""
    return Recording(path)


def read_recording(path: str | os.PathLike[str]) -> tuple[SessionMeta, list[StreamMessage]]:
    """Every message of an intact recording (raises RecordingError on any damage)."""
    rec = open_recording(path)
    return rec.meta, list(rec)


# ---------------------------------------------------------------------------------------------
# summary (nvse-monitor info)


@dataclass
class RecordingInfo:
    path: str
    size: int
    version: int | None = None
    meta: SessionMeta | None = None
    frames: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)  # per message type
    records: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    first_ts_us: int | None = None
    last_ts_us: int | None = None
    last_now_us: int | None = None
    counters: AgentCounters | None = None  # last known (trailer or last batch)
    end: SessionEnd | None = None
    clean: bool = False
    error: str | None = None

    @property
    def bytes_per_record(self) -> float | None:
        return self.size / self.records if self.records else None

    def lines(self) -> list[str]:
        out = [f"recording: {self.path} ({self.size} bytes, format version {self.version})"]
        m = self.meta
        if m is not None:
            out.append(
                f"target: {m.target} (pid {m.pid}, {m.platform}/{m.arch}), mode {m.mode}, "
                f"profile {m.profile}, monitor {m.monitor_version or '?'}"
            )
            out.append(f"wall clock at time zero: {m.wall_clock_zero_us} µs since the epoch "
                       f"(UTC offset {m.utc_offset_s} s)")
            out.append(f"hooks ({len(m.hooks)}):")
            out += [f"  [{i}] {h.name} heap={h.heap} role={h.role}"
                    + (f" module={h.module}" if h.module else "") for i, h in enumerate(m.hooks)]
            out.append(f"modules ({len(m.modules)}):")
            out += [f"  {mod.name} base=0x{mod.base:x} size=0x{mod.size:x}"
                    + (f" {mod.path}" if mod.path else "") for mod in m.modules]
        out.append("frames: " + (", ".join(f"{k} {v}" for k, v in self.frames.items()) or "none"))
        out.append("messages: " + (", ".join(f"{k} {v}" for k, v in self.messages.items())
                                   or "none"))
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.items())
        bpr = f", {self.bytes_per_record:.2f} bytes/record" if self.records else ""
        out.append(f"records: {self.records}" + (f" ({kinds})" if kinds else "") + bpr)
        if self.first_ts_us is not None and self.last_ts_us is not None:
            out.append(f"time span: {self.first_ts_us} .. {self.last_ts_us} µs "
                       f"({(self.last_ts_us - self.first_ts_us) / 1e6:.3f} s)")
        if self.counters is not None:
            c = self.counters
            out.append(f"agent counters: allocs {c.allocs}, frees {c.frees}, reallocs "
                       f"{c.reallocs}, failures {c.failures}, bytes {c.bytes_allocated}, "
                       f"dropped {c.dropped}, published {c.published}")
            if self.version != 1:  # version 1 has no ring counters
                out.append(f"ring counters: dropped frees {c.dropped_frees}, stalls {c.stalls} "
                           f"({c.stall_us} µs, longest {c.stall_max_us} µs), unknown records "
                           f"{c.unknown_records}")
        if self.end is not None:
            e = self.end
            out.append(f"end: {e.reason} at {e.ts_us} µs"
                       + ("" if e.expected else " (unexpected)")
                       + (f", crash: {e.crash}" if e.crash else ""))
        out.append("ended cleanly: yes" if self.clean else f"ended cleanly: no ({self.error})")
        return out


def info(path: str | os.PathLike[str]) -> RecordingInfo:
    """A summary of a recording, read through to the end or to the damage (never raises for
    damage after the header: `.error` holds it). Raises RecordingError if the header or the
    metadata is unreadable."""
    rec = open_recording(path)
    res = RecordingInfo(path=rec.path, size=rec.size, version=rec.version, meta=rec.meta)
    msgs: Counter[str] = Counter()
    kinds = np.zeros(256, dtype=np.int64)
    try:
        for m in rec:
            if isinstance(m, Batch):
                msgs["batch"] += 1
                n = len(m.records)
                res.records += n
                res.last_now_us = m.now_us
                res.counters = m.counters
                if n:
                    kinds += np.bincount(m.records["kind"], minlength=256)
                    ts = m.records["ts_us"]
                    lo, hi = int(ts.min()), int(ts.max())
                    res.first_ts_us = lo if res.first_ts_us is None else min(res.first_ts_us, lo)
                    res.last_ts_us = hi if res.last_ts_us is None else max(res.last_ts_us, hi)
            else:
                name = control_to_json(m)["type"]
                msgs[name] += 1
                if isinstance(m, SessionEnd):
                    res.end = m
                    if m.counters is not None:
                        res.counters = m.counters
    except RecordingError as e:
        res.error = str(e)
    res.clean = bool(rec.ended_cleanly)
    res.frames = dict(rec.frames)
    res.messages = dict(msgs)
    names = {int(k): k.name for k in Kind}
    res.kinds = {names.get(i, f"kind{i}"): int(c) for i, c in enumerate(kinds) if c}
    return res
