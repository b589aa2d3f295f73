"""The output files of one session together (the four monitoring files, and the address-space
CSV of 32-bit targets): routes engine outputs to their writer and turns write errors into one
stderr line plus a WriteFailure the pipeline reports to the engine."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..stream.messages import SessionMeta
from .addrspace import AddrSpaceWriter
from .csv import CsvWriter
from .json import JsonWriter
from .log import LogWriter
from .rows import AddressSpaceRow, CsvRow, LogLine, Output, Snapshot
from .status import StatusWriter

DEFAULT_PREFIX = "MemoryPoolNVSE"


@dataclass(frozen=True)
class FilePaths:
    log: Path
    json: Path
    csv: Path
    status: Path
    addrspace: Path  # only when the target's address space was sampled (32-bit targets)

    @classmethod
    def of(cls, out_dir: Path | str, prefix: str = DEFAULT_PREFIX) -> FilePaths:
        d = Path(out_dir)
        return cls(
            log=d / f"{prefix}_rpmalloc.log",
            json=d / f"{prefix}_stats.json",
            csv=d / f"{prefix}_performance.csv",
            status=d / f"{prefix}_status.txt",
            addrspace=d / f"{prefix}_addrspace.csv",
        )

    def all(self) -> tuple[Path, Path, Path, Path]:
        """The four files every session writes."""
        return (self.log, self.json, self.csv, self.status)


@dataclass(frozen=True)
class WriteFailure:
    path: Path
    error: str  # e.g. "No space left on device"


class OutputDirError(Exception):
    """The output directory cannot be created or written, or the prefix is not a plain file
    name (raised at start only)."""


MIB = 1 << 20


@dataclass(frozen=True)
class FileLimits:
    """Size caps of the two growing files (0: no cap); past a cap the file is rotated to
    `<name>.1` ... `<name>.<backups>` (docs/reliability.md)."""

    log_max_bytes: int = 64 * MIB
    csv_max_bytes: int = 0
    backups: int = 3


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot name files inside the output directory (None: it can). A prefix is a
    plain name: no directory part, so nothing is ever written outside the output directory."""
    if not prefix:
        return "must not be empty"
    if "/" in prefix or "\\" in prefix or "\0" in prefix:
        return "must be a plain name (no '/', '\\' or NUL)"
    if prefix in (".", ".."):
        return "must be a plain name, not '.' or '..'"
    return None


def check_writable_dir(path: Path) -> None:
    """Raise OSError (EROFS or EACCES) when files cannot be created in directory `path`."""
    if not os.access(path, os.W_OK | os.X_OK):
        if hasattr(os, "statvfs") and os.statvfs(path).f_flag & os.ST_RDONLY:
            raise OSError(30, "Read-only file system")
        raise PermissionError(13, "Permission denied")


def make_out_dir(path: Path) -> None:
    """Create directory `path` (and parents) and check files can be made in it. Raises OSError:
    ENOTDIR for an existing file (mkdir alone would say "File exists")."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    path.mkdir(parents=True, exist_ok=True)
    check_writable_dir(path)


def check_prefix(prefix: str) -> None:
    if (why := prefix_problem(prefix)) is not None:
        raise OutputDirError(f"bad file prefix {prefix!r}: {why}")


def describe(e: OSError) -> str:
    return e.strerror or str(e)


class OutputFiles:
    """Owns the writers. A file that fails is reported once (stderr + WriteFailure) until
    a write to it succeeds again; its data is retried at every later update."""

    def __init__(self, meta: SessionMeta, out_dir: Path | str, prefix: str = DEFAULT_PREFIX,
                 err: TextIO | None = None, limits: FileLimits | None = None) -> None:
        check_prefix(prefix)
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.paths = FilePaths.of(self.out_dir, prefix)
        self.limits = limits = limits if limits is not None else FileLimits()
        zero = meta.wall_clock_zero_us
        self.log = LogWriter(self.paths.log, zero, meta.utc_offset_s, meta.pid,
                             max_bytes=limits.log_max_bytes, backups=limits.backups)
        self.csv = CsvWriter(self.paths.csv, zero, max_bytes=limits.csv_max_bytes,
                             backups=limits.backups)
        self.json = JsonWriter(self.paths.json, zero)
        self.status = StatusWriter(self.paths.status, zero, prefix)
        self.addrspace = AddrSpaceWriter(self.paths.addrspace, zero,
                                         max_bytes=limits.csv_max_bytes, backups=limits.backups)
        self.failing: set[Path] = set()
        self._err = err
        self._last_ts = 0

    def open(self) -> None:
        """Create the directory and start the log and CSV afresh. Raises OutputDirError."""
        try:
            make_out_dir(self.out_dir)
            self.log.start()
            self.csv.start()
            self.addrspace.start()
        except OSError as e:
            where = "" if e.filename in (None, str(self.out_dir)) else f" ({e.filename})"
            raise OutputDirError(
                f"cannot write to output directory {self.out_dir}{where}: {describe(e)}"
            ) from None

    def write(self, out: Output) -> list[WriteFailure]:
        if isinstance(out, LogLine):
            self._last_ts = out.ts_us
            if self.log.add(out):
                return self._try(self.log.path, lambda: self.log.flush(out.ts_us))
            return []
        if isinstance(out, CsvRow):
            self._last_ts = out.ts_us
            if self.csv.add(out):
                return self._try(self.csv.path, self.csv.flush)
            return []
        if isinstance(out, AddressSpaceRow):
            self._last_ts = out.ts_us
            if self.addrspace.add(out):
                return self._try(self.addrspace.path, self.addrspace.flush)
            return []
        if isinstance(out, Snapshot):
            self._last_ts = out.ts_us
            return self.update(out)
        raise TypeError(f"not an engine output: {out!r}")

    def update(self, snap: Snapshot) -> list[WriteFailure]:
        """Every file brought up to date: buffered log and CSV lines, JSON and status."""
        failures = self.flush()
        failures += self._try(self.json.path, lambda: self.json.write(snap))
        failures += self._try(self.status.path, lambda: self.status.write(snap))
        return failures

    def flush(self) -> list[WriteFailure]:
        ts = self._last_ts
        return (self._try(self.log.path, lambda: self.log.flush(ts))
                + self._try(self.csv.path, self.csv.flush)
                + self._try(self.addrspace.path, self.addrspace.flush))

    def _try(self, path: Path, write: Callable[[], None]) -> list[WriteFailure]:
        try:
            write()
        except OSError as e:
            if path in self.failing:
                return []  # already reported; retried at the next update
            self.failing.add(path)
            self._say(f"nvse-monitor: cannot write {path}: {describe(e)} (will retry)")
            return [WriteFailure(path, describe(e))]
        if path in self.failing:
            self.failing.discard(path)
            self._say(f"nvse-monitor: writing {path} works again")
        return []

    def _say(self, line: str) -> None:
        print(line, file=self._err or sys.stderr, flush=True)
