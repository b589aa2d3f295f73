"""What the session's queue carries besides stream messages (and targets.ExitNotice): the
notices Frida's callbacks and our worker threads put there for the consumer (session.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Detached:
    reason: str
    crash: Any


@dataclass(frozen=True)
class _ChildAdded:
    child: Any  # frida Child


@dataclass(frozen=True)
class _ParentGone:
    pid: int
    reason: str


@dataclass(frozen=True)
class _AddrSpaceError:
    message: str


@dataclass(frozen=True)
class _WorkerDone:
    name: str
    result: Any = None
    error: BaseException | None = None
