"""File primitives for the writers: atomic whole-file replace, and an append buffer that keeps
what it could not write (bounded) so a failed write is retried instead of lost."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

# One line ending on every platform: the files are written as bytes with '\n' (docs/files.md).
# On Windows os.open defaults to text mode, which would turn each '\n' into '\r\n'.
_BINARY = getattr(os, "O_BINARY", 0)

_tmp_counter = 0
_tmp_lock = threading.Lock()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees either the old or the new file, never a part.

    The temp file is in the same directory (os.replace is atomic only within one filesystem).
    No fsync: readers need atomicity, not crash durability, and fsync per update is slow.
    Raises OSError; the temp file is removed on failure.
    """
    global _tmp_counter
    with _tmp_lock:
        _tmp_counter += 1
        n = _tmp_counter
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{n}.tmp")
    data = text.encode("utf-8")
    try:
        # 0o666 minus umask, like any ordinary file (mkstemp would force 0600).
        fd = os.open(tmp, _BINARY | os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_all(fd: int, data: bytes | memoryview) -> int:
    """Write everything; on an error, the exception carries how much got written (`.written`)."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(view):
            done += os.write(fd, view[done:])
    except OSError as e:
        e.written = done  # type: ignore[attr-defined]
        raise
    return done


class AppendFile:
    """Lines appended to one file: buffered in memory, written on flush().

    The file is reopened for each flush (cheap at our flush rate) so a deleted or replaced
    directory shows up as an error rather than writes into an unlinked inode. Bytes a failed
    flush could not write are kept and written first at the next flush; past `max_pending`
    bytes the oldest whole lines are dropped and counted in `lost_lines`.
    """

    def __init__(self, path: Path, max_pending: int = 16 << 20, *, max_bytes: int = 0,
                 backups: int = 3, header: str = "") -> None:
        self.path = path
        self.max_pending = max_pending
        # Size cap with rotation (0: none): a file never grows past max_bytes (unless one line
        # alone is longer); then path -> path.1 -> ... -> path.<backups> and a fresh file
        # starting with `header`. Cuts fall between whole lines and depend only on the bytes
        # written, not on when flushes happen: a live session and its replay rotate alike.
        self.max_bytes = max_bytes
        self.backups = backups
        self.header = header.encode("utf-8")
        self.lines: list[str] = []  # each ends with "\n"
        self._carry = b""  # unwritten bytes of earlier flushes (may start mid-line)
        self.lost_lines = 0
        self.rotations = 0

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def truncate(self, text: str = "") -> None:
        """Start the file afresh with `text` (a new session); rotated files of an earlier
        session are removed (a new session starts its files afresh). Raises OSError."""
        fd = os.open(self.path, _BINARY | os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        n = 1
        while n <= self.backups or self.rotated(n).exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.rotated(n))
            n += 1
            if n > 1000:
                break

    def prepend(self, line: str) -> None:
        """Put a line before everything pending (e.g. a note about lost lines, which were the
        oldest: _keep drops at line starts)."""
        self._carry = line.encode("utf-8") + self._carry

    @property
    def pending(self) -> bool:
        return bool(self.lines or self._carry)

    def flush(self) -> None:
        """Write buffered lines. Raises OSError after keeping what was not written."""
        if not self.pending:
            return
        data = self._carry + "".join(self.lines).encode("utf-8")
        self.lines.clear()
        self._carry = b""
        try:
            fd = os.open(self.path, _BINARY | os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError:
            self._keep(data)
            raise
        if self.max_bytes > 0:
            self._flush_capped(fd, data)
            return
        try:
            _write_all(fd, data)
        except OSError as e:
            self._keep(data[getattr(e, "written", 0) :])
            raise
        finally:
            os.close(fd)

    def _flush_capped(self, fd: int, data: bytes) -> None:
        """Write `data` (consumes fd), rotating at line ends to keep each file <= max_bytes."""
        pos = 0  # data[:pos] is written
        try:
            while pos < len(data):
                size = os.fstat(fd).st_size
                room = max(0, self.max_bytes - size)
                if len(data) - pos <= room:
                    cut = len(data)
                else:
                    cut = data.rfind(b"\n", pos, pos + room) + 1
                    if cut == 0 and size <= len(self.header):
                        # one line longer than the cap alone in a fresh file: write it whole
                        cut = data.find(b"\n", pos) + 1 or len(data)
                if cut > pos:
                    try:
                        pos += _write_all(fd, memoryview(data)[pos:cut])
                    except OSError as e:
                        pos += getattr(e, "written", 0)
                        raise
                if pos < len(data):
                    os.close(fd)
                    fd = -1
                    self._rotate()
                    fd = os.open(self.path, _BINARY | os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError:
            self._keep(data[pos:])
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.<backups> (the oldest dropped); a new file with the
        header. Raises OSError."""
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.rotated(n), self.rotated(n + 1))
            os.replace(self.path, self.rotated(1))
        fd = os.open(self.path, _BINARY | os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, self.header)
        finally:
            os.close(fd)
        self.rotations += 1

    def _keep(self, data: bytes) -> None:
        excess = len(data) - self.max_pending
        if excess > 0:
            cut = data.find(b"\n", excess - 1) + 1  # drop whole lines only
            if cut == 0:
                cut = len(data)
            self.lost_lines += data.count(b"\n", 0, cut)
            data = data[cut:]
        self._carry = data
