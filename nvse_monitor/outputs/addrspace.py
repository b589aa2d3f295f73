"""`<prefix>_addrspace.csv`: the address-space time series of 32-bit targets (docs/files.md).

`timestamp,mapped_bytes,committed_bytes,reserved_bytes,free_bytes,largest_free_bytes,
limit_bytes,regions`: Unix epoch µs, then bytes (empty where not counted). The file is created
with its header when the first row is written, so a session without samples (64-bit targets,
replays of recordings without them) has none; a new session removes the previous session's.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .fileio import AppendFile
from .rows import AddressSpaceRow

HEADER = ("timestamp,mapped_bytes,committed_bytes,reserved_bytes,free_bytes,"
          "largest_free_bytes,limit_bytes,regions\n")
FLUSH_ROWS = 4096


class AddrSpaceWriter:
    def __init__(self, path: Path, wall_clock_zero_us: int, *, max_bytes: int = 0,
                 backups: int = 3) -> None:
        self.file = AppendFile(path, max_bytes=max_bytes, backups=backups, header=HEADER)
        self.wall_clock_zero_us = wall_clock_zero_us
        self.created = False  # the file of this session exists (header written)

    @property
    def path(self) -> Path:
        return self.file.path

    def start(self) -> None:
        """A new session: remove the previous session's file and its rotated copies (this
        session creates its own at its first row). Raises OSError."""
        n = 0
        while n <= self.file.backups or self.file.rotated(n).exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file.rotated(n) if n else self.path)
            n += 1
            if n > 1000:
                break
        self.created = False

    def format(self, row: AddressSpaceRow) -> str:
        vals = (self.wall_clock_zero_us + int(row.ts_us), row.mapped, row.committed,
                row.reserved, row.free, row.largest_free, row.limit, row.regions)
        return ",".join("" if v is None else str(int(v)) for v in vals) + "\n"

    def add(self, row: AddressSpaceRow) -> bool:
        """Buffer one row; True when the caller should flush now (full buffer)."""
        self.file.lines.append(self.format(row))
        return len(self.file.lines) >= FLUSH_ROWS

    def flush(self) -> None:
        """Append buffered rows (creating the file with its header first); raises OSError
        (rows kept for the next flush)."""
        if not self.file.pending:
            return
        if not self.created:
            self.file.truncate(HEADER)
            self.created = True
        self.file.flush()
