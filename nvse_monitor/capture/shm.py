"""The mapping the agent's ring lives in, made by the host and opened by the agent.

Linux: a file in /dev/shm, created exclusively with mode 0600 under a random name (owned by the
target's user when root monitors someone else's process), unlinked as soon as the agent has
mapped it: nothing is left behind on either side once both have unmapped it.
Windows: a named file mapping in the session's `Local\\` namespace under an unguessable name,
with the default DACL (the creating user); it goes when the last view closes.

One monitor per target: `TargetLock` is held for the whole session (an abstract Unix socket on
Linux, a named mutex on Windows; both vanish with the process that holds them).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import socket
import sys
from typing import Any

from .ringlayout import Layout, init_header

SHM_DIR = "/dev/shm"  # NVSE_MONITOR_SHM_DIR overrides it (another tmpfs; tests)


class MappingError(OSError):
    """The shared mapping could not be made (the session falls back to Frida messages)."""


class SharedRing:
    """The host's side of the mapping. `agent_spec` is what the agent needs to open it."""

    def __init__(self, layout: Layout, on_full: str, max_wait_ms: float,
                 target_pid: int | None = None) -> None:
        self.layout = layout
        self.path: str | None = None
        self.name: str | None = None
        token = secrets.token_hex(16)
        size = layout.bytes
        if sys.platform == "win32":
            self.name = f"Local\\nvse-monitor-{token}"
            try:
                self.buf = mmap.mmap(-1, size, tagname=self.name)
            except OSError as exc:
                raise MappingError(f"cannot create {self.name}: {exc}") from None
        else:
            where = os.environ.get("NVSE_MONITOR_SHM_DIR") or SHM_DIR
            if not os.path.isdir(where):
                raise MappingError(f"{where} does not exist")
            self.path = os.path.join(where, f"nvse-monitor-{os.getpid()}-{token}")
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) \
                | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                raise MappingError(f"cannot create {self.path}: {exc.strerror}") from None
            try:
                os.ftruncate(fd, size)
                _give_to_target_user(fd, target_pid)
                self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                os.close(fd)
                self.unlink()
                raise MappingError(f"cannot map {self.path}: {exc.strerror or exc}") from None
            os.close(fd)
        init_header(memoryview(self.buf), layout, on_full, max_wait_ms)

    def agent_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"bytes": self.layout.bytes, "slots": self.layout.slots}
        if self.name is not None:
            spec["name"] = self.name
        else:
            spec["path"] = self.path
        return spec

    def unlink(self) -> None:
        """Linux: remove the name once the agent has the mapping (or could not take it)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        self.unlink()
        with contextlib.suppress(BufferError, ValueError):
            self.buf.close()  # BufferError while numpy views are alive: they go with the object


def _give_to_target_user(fd: int, pid: int | None) -> None:
    """Root monitoring another user's process: the file becomes that user's (still 0600)."""
    if pid is None or os.geteuid() != 0:
        return
    try:
        st = os.stat(f"/proc/{pid}")
    except OSError:
        return
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


class TargetLock:
    """Held while a session monitors `pid`; a second monitor of the same process is refused
    (two agents would hook each other's hooks and count every call twice)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._sock: socket.socket | None = None
        self._handle: Any = None
        name = f"nvse-monitor-target-{pid}"
        if sys.platform == "win32":
            import ctypes

            k32 = ctypes.WinDLL("kernel32", use_last_error=True)
            k32.CreateMutexW.restype = ctypes.c_void_p
            h = k32.CreateMutexW(None, False, f"Local\\{name}")
            if h and ctypes.get_last_error() == 183:  # ERROR_ALREADY_EXISTS
                k32.CloseHandle(ctypes.c_void_p(h))
                raise TargetBusy(pid)
            self._handle = h
        elif sys.platform.startswith("linux"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind("\0" + name)
            except OSError:
                s.close()
                raise TargetBusy(pid) from None
            self._sock = s

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._handle:
            import ctypes

            ctypes.WinDLL("kernel32").CloseHandle(ctypes.c_void_p(self._handle))
            self._handle = None


class TargetBusy(RuntimeError):
    def __init__(self, pid: int) -> None:
        super().__init__(
            f"PID {pid} is already monitored by another nvse-monitor: one monitor per process "
            "(two agents would hook each other and count every call twice)")
        self.pid = pid
