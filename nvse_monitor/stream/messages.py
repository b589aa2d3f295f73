"""Messages that flow from a source (live agent or recording) into the engine.

The same messages are what a recording stores, in order, so a replay feeds the engine exactly
what the live session fed it. Every message carries its own time (agent µs since time zero):
the engine never reads a clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class HookInfo:
    """One entry of the profile as installed: records' `hook` field indexes this list."""

    name: str  # e.g. "malloc" or "MemoryManager::Allocate"
    heap: str  # e.g. "libc", "game", "scrap", "crt"
    role: str  # alloc, free, realloc, calloc, aligned_alloc, aligned_free, size, memalign...
    module: str = ""  # module the hook lives in, "" for absolute addresses


@dataclass(frozen=True)
class Module:
    name: str
    base: int
    size: int
    path: str = ""


@dataclass
class SessionMeta:
    """What a session knows at its start; the recording's JSON metadata."""

    target: str
    pid: int
    arch: str  # "x64", "ia32", "arm64"...
    platform: str  # "linux", "windows", "darwin"
    profile: str
    hooks: list[HookInfo] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)
    wall_clock_zero_us: int = 0  # Unix epoch µs at agent time zero
    utc_offset_s: int = 0  # local-time offset of the recording machine, for log timestamps
    monitor_version: str = ""
    mode: str = "attach"  # attach, spawn, synthetic
    sample_bytes: int = 0  # mean bytes between sampled stacks (Poisson); 0 = no stacks
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SessionMeta:
        d = dict(d)
        d["hooks"] = [HookInfo(**h) for h in d.get("hooks", [])]
        d["modules"] = [Module(**m) for m in d.get("modules", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class AgentCounters:
    """The agent's exact counters, updated on every hooked call, never dropped (cumulative)."""

    allocs: int = 0
    frees: int = 0
    reallocs: int = 0
    failures: int = 0
    bytes_allocated: int = 0
    dropped: int = 0  # records the ring had no room for
    published: int = 0  # records written to the ring
    # Issue 13 (shared-memory ring, --on-full wait|drop). Older recordings lack these: 0.
    dropped_frees: int = 0  # FREE and REALLOC records among `dropped` (blocks' fates unknown)
    stalls: int = 0  # hooked calls that waited for a free ring slot (policy wait)
    stall_us: int = 0  # total µs those calls waited
    stall_max_us: int = 0  # the longest single wait, µs (a max, not a sum)
    unknown_records: int = 0  # records read from the shared mapping that failed validation

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentCounters:
        """From a JSON dict of any version: missing keys are 0 (older recordings and agents),
        keys this version does not know are ignored (newer ones)."""
        return cls(**{k: v for k, v in d.items() if k in _COUNTER_NAMES})


_COUNTER_NAMES = frozenset(f.name for f in dataclasses.fields(AgentCounters))


@dataclass
class Batch:
    """A drained piece of the ring: records in publication order, and the agent's state then."""

    now_us: int  # agent time when the batch was drained (advances time while the target is quiet)
    counters: AgentCounters
    records: np.ndarray  # RECORD_DTYPE


@dataclass(frozen=True)
class ModuleEvent:
    ts_us: int
    action: str  # "add" or "remove"
    module: Module


@dataclass(frozen=True)
class HookEvent:
    ts_us: int
    hook: int  # index into SessionMeta.hooks, -1 when not in the list (e.g. a whole module)
    name: str
    ok: bool  # installed, or failed/skipped
    detail: str = ""  # why it failed, or where it went (e.g. "followed JMP into nvhr.dll")
    # Its module is not loaded (yet): neither installed nor failed; a later event says which.
    pending: bool = False


@dataclass(frozen=True)
class AgentError:
    ts_us: int
    message: str  # an agent script error (fatal for the session's data)


@dataclass(frozen=True)
class SessionEnd:
    ts_us: int
    # "target-exited", "process-terminated", "interrupted", "duration", "end-of-recording", ...
    reason: str
    expected: bool  # False: the target was lost unexpectedly (crash, kill) -> ERROR before SHUTDOWN
    crash: str = ""  # crash report summary, if any
    counters: AgentCounters | None = None  # final exact counters (the recording's trailer)


@dataclass(frozen=True)
class AddressSpace:
    """One sample of the target's address space (docs/fnv.md), taken about once a second off
    the allocation path. Bytes; None where not counted (64-bit targets: no free-space limit)."""

    ts_us: int
    mapped: int  # committed + reserved
    committed: int
    reserved: int
    free: int | None  # free bytes below `limit`
    largest_free: int | None  # the largest free block below `limit`
    limit: int | None  # top of the user address space counted (2/4 GiB)
    regions: int


@dataclass(frozen=True)
class SymbolNames:
    """Function names of code addresses (issue 11, docs/symbols.md), resolved in the target by
    the host's symbolizer for the call sites it shows. In the stream (and so in recordings) at
    the place the host learnt them: a replay has the same names at the same moment. Addresses
    without a known function are left out."""

    ts_us: int  # stream time when they were resolved (informational: the engine keeps its time)
    names: dict[int, str]  # code address -> "function+0xoff" (or "function": offset unknown)
    # Resolution failed (agent gone, RPC error, timeout): why, and how many addresses it left
    # unnamed. The engine logs it; the offset form stays for them.
    error: str = ""
    unresolved: int = 0


StreamMessage = (Batch | ModuleEvent | HookEvent | AgentError | SessionEnd | AddressSpace
                 | SymbolNames)
ControlMessage = ModuleEvent | HookEvent | AgentError | SessionEnd | AddressSpace | SymbolNames

CONTROL_TYPES: dict[str, type] = {
    "module": ModuleEvent,
    "hook": HookEvent,
    "agent-error": AgentError,
    "end": SessionEnd,
    "addrspace": AddressSpace,
    "symbols": SymbolNames,
}


def control_to_json(msg: ControlMessage) -> dict[str, Any]:
    if isinstance(msg, SymbolNames):  # JSON keys are strings: addresses in hex
        d = {"type": "symbols", "ts_us": msg.ts_us,
             "names": {f"0x{a:x}": n for a, n in sorted(msg.names.items())}}
        if msg.error:
            d.update(error=msg.error, unresolved=msg.unresolved)
        return d
    for name, cls in CONTROL_TYPES.items():
        if isinstance(msg, cls):
            return {"type": name, **dataclasses.asdict(msg)}
    raise TypeError(f"not a control message: {msg!r}")


def control_from_json(d: dict[str, Any]) -> ControlMessage:
    d = dict(d)
    kind = d.pop("type", None)
    cls = CONTROL_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown control message type {kind!r}")
    if cls is ModuleEvent:
        d["module"] = Module(**d["module"])
    if cls is SymbolNames:
        names = d.get("names")
        if not isinstance(names, dict):
            raise ValueError("names is not an object")
        d["names"] = {int(a, 16): n for a, n in names.items()}
    if cls is SessionEnd and d.get("counters") is not None:
        if not isinstance(d["counters"], dict):
            raise ValueError("counters is not an object")
        d["counters"] = AgentCounters.from_dict(d["counters"])
    return cls(**d)
