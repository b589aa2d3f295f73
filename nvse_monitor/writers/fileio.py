"""File primitives for the writers: atomic whole-file replace, and an append buffer that keeps
what it could not write (bounded) so a failed write is retried instead of lost."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
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

    def __init__(self, path: Path, max_pending: int = 16 << 20) -> None:
        self.path = path
        self.max_pending = max_pending
        self.lines: list[str] = []  # each ends with "\n"
        self._carry = b""  # unwritten bytes of earlier flushes (may start mid-line)
        self.lost_lines = 0

    def truncate(self, text: str = "") -> None:
        """Start the file afresh with `text` (a new session). Raises OSError."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, text.encode("utf-8"))
        finally:
            os.close(fd)

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
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError:
            self._keep(data)
            raise
        try:
            _write_all(fd, data)
        except OSError as e:
            self._keep(data[getattr(e, "written", 0) :])
            raise
        finally:
            os.close(fd)

    def _keep(self, data: bytes) -> None:
        excess = len(data) - self.max_pending
        if excess > 0:
            cut = data.find(b"\n", excess - 1) + 1  # drop whole lines only
            if cut == 0:
                cut = len(data)
            self.lost_lines += data.count(b"\n", 0, cut)
            data = data[cut:]
        self._carry = data
