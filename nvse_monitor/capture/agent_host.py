"""Host side of the Frida agent: load it into a session, turn its messages into stream messages.

    handle = load_agent(session, profile, AgentConfig(), on_message=queue.put)
    meta = handle.session_meta(target="foo", mode="attach")
    ...
    final = handle.stop()      # hooks reverted, ring drained: the exact final counters
    handle.unload()

`on_message` is called with Batch, ModuleEvent, HookEvent and AgentError, in the agent's order:
control messages on Frida's thread, records from the shared ring on the reader's thread (a
module event is delivered at its marker's place among the records); the HookEvents of the first
installation arrive before load_agent returns.
Protocol: docs/protocol.md; design: docs/agent.md.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from ..stream.events import RECORD_DTYPE, decode_records
from ..stream.messages import (
    AgentCounters,
    AgentError,
    Batch,
    HookEvent,
    Module,
    ModuleEvent,
    SessionMeta,
    StreamMessage,
)
from .hookprofile import Profile
from .reader import RingReader
from .ringlayout import Layout
from .shm import MappingError, SharedRing, TargetBusy, TargetLock

DEFAULT_RING_SLOTS = 1 << 17  # 8 MiB ring: ~25 ms of a 5 M events/s burst, ~1 s of a busy game
# 64-bit targets have address space to spare: a 32 MiB ring rides out ~0.5 s of host stall at
# 1 M events/s (bench/soak.py dropped bursts with 128K slots on a busy machine).
DEFAULT_RING_SLOTS_64 = 1 << 19
ON_FULL = ("wait", "drop")
# A producer waits at most this long for a slot per call, then drops (counted), and later calls
# drop at once until the host takes records again. Long enough to ride out a host that a loaded
# machine deschedules for a second; a host that stops its heartbeat altogether is noticed after
# 3 s (hotpath.c NV_HOST_STALL_US); a host that dies unloads the agent, which lets waiters go.
DEFAULT_MAX_WAIT_MS = 5000
# --sample-bytes: mean bytes between sampled stacks (docs/agent.md "Sampled stacks": measured
# cost and why this rate); 0 = no sampling code in the target at all.
DEFAULT_SAMPLE_BYTES = 256 << 10
MAX_SAMPLE_BYTES = 1 << 28  # the countdown is a pointer-sized word (ia32: 32 bits)
# Records handed on but not yet fed to the engine, at most (live sessions: ~56 MiB).
MAX_INFLIGHT_RECORDS = 1 << 20


def default_ring_slots(arch: str) -> int:
    """Ring slots when the user gives none: 32-bit targets (FNV) keep their address space."""
    return DEFAULT_RING_SLOTS_64 if arch in ("x64", "arm64") else DEFAULT_RING_SLOTS
_EMPTY = np.empty(0, dtype=RECORD_DTYPE)


class AgentLoadError(RuntimeError):
    """The agent could not be loaded or initialised in the target."""


@dataclass(frozen=True)
class AgentConfig:
    ring_slots: int = DEFAULT_RING_SLOTS  # power of two; 64 bytes each in the target
    large_alloc_bytes: int = 1 << 20  # calls above this get a duration
    drain_interval_ms: int = 10
    max_batch_bytes: int = 64 << 10  # message transport: 1 MiB batches stalled the drain
    ignore_tids: tuple[int, ...] = ()  # threads never recorded (Frida's own never are)
    defines: tuple[str, ...] = ()  # bench/tests only: NV_BENCH_* variants of the hot path
    on_full: str = "wait"  # a producer finding the ring full: "wait" (bounded) or "drop"
    max_wait_ms: int = DEFAULT_MAX_WAIT_MS
    # "shm": the host reads the ring from a shared mapping; "messages": the agent drains it
    # and sends batches (also the fallback when no mapping can be made)
    transport: str = "shm"
    max_inflight_records: int | None = None  # flow control (the consumer calls ack())
    # mean bytes between sampled allocating calls (their stacks are recorded); 0 = off. The
    # live CLI's default is DEFAULT_SAMPLE_BYTES; here 0, so library users opt in.
    sample_bytes: int = 0

    def __post_init__(self) -> None:
        s = self.ring_slots
        if s < 2 or s & (s - 1) or s > 1 << 26:
            raise ValueError(f"ring size {s} must be a power of two between 2 and 2^26")
        if self.max_batch_bytes < 56:
            raise ValueError(f"max_batch_bytes {self.max_batch_bytes} is less than one record")
        if self.on_full not in ON_FULL:
            raise ValueError(f"--on-full {self.on_full!r} must be 'wait' or 'drop'")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"--max-wait-ms {self.max_wait_ms} must be between 0 and 60000")
        if self.transport not in ("shm", "messages"):
            raise ValueError(f"transport {self.transport!r} must be 'shm' or 'messages'")
        if not 0 <= self.sample_bytes <= MAX_SAMPLE_BYTES:
            raise ValueError(f"--sample-bytes {self.sample_bytes} must be between 0 (off) and "
                             f"{MAX_SAMPLE_BYTES}")
        if self.drain_interval_ms < 1:
            raise ValueError(f"drain_interval_ms {self.drain_interval_ms} must be >= 1")

    def to_json(self, profile: Profile) -> dict[str, Any]:
        return {
            "profile": profile.to_agent_json(),
            "ring_slots": self.ring_slots,
            "large_alloc_bytes": self.large_alloc_bytes,
            "drain_interval_ms": self.drain_interval_ms,
            "max_batch_bytes": self.max_batch_bytes,
            "on_full": self.on_full,
            "max_wait_ms": self.max_wait_ms,
            "ignore_tids": list(self.ignore_tids),
            "defines": list(self.defines),
            "sample_bytes": self.sample_bytes,
        }


def agent_source() -> str:
    """The script text: agent.js with the C hot path prepended as a string constant."""
    pkg = resources.files("nvse_monitor.agent")
    c_text = pkg.joinpath("hotpath.c").read_text(encoding="utf-8")
    js = pkg.joinpath("agent.js").read_text(encoding="utf-8")
    return f"const HOTPATH_C = {json.dumps(c_text)};\n{js}"


def _counters(d: dict[str, Any]) -> AgentCounters:
    return AgentCounters.from_dict(d)


def _host_clock_us() -> int:
    """The clock GLib's g_get_monotonic_time() reads: CLOCK_MONOTONIC on Linux, the
    performance counter on Windows."""
    if sys.platform == "win32":
        return time.perf_counter_ns() // 1000
    return time.monotonic_ns() // 1000


def _module(d: dict[str, Any]) -> Module:
    return Module(name=d["name"], base=int(d["base"]), size=int(d["size"]), path=d.get("path", ""))


class AgentHandle:
    """A loaded agent. Thread-safe enough for one controlling thread plus Frida's callbacks."""

    def __init__(self, script: Any, profile: Profile,
                 on_message: Callable[[StreamMessage], None] | None) -> None:
        self.script = script
        self.profile = profile
        self.init_result: dict[str, Any] = {}
        self.last_now_us = 0  # agent time of the latest message, for host-side errors
        self.final_counters: AgentCounters | None = None
        # hooks stop() left in place because another party patched their entry point after us
        self.left_hooked: list[str] = []
        self.late_frida_tids: list[int] = []  # Frida threads found after init (records dropped)
        self._on_message = on_message
        self._lock = threading.Lock()
        self._stopped = False
        self._unloaded = False
        self.ring: SharedRing | None = None  # the shared mapping (until the agent has it)
        self.reader: RingReader | None = None  # None: the message transport
        self.target_lock: TargetLock | None = None
        self.transport_note = ""  # why the message transport is used, if it is
        self._clock_base = 0  # host clock µs at agent time zero

    # ------------------------------------------------------------ messages

    def _emit(self, msg: StreamMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg)

    def _handle(self, message: dict[str, Any], data: bytes | None) -> None:
        try:
            if message.get("type") == "error":  # Frida's own: an exception in the script
                text = message.get("stack") or message.get("description") or str(message)
                self._emit(AgentError(ts_us=self.last_now_us, message=f"script error: {text}"))
                return
            payload = message.get("payload")
            if message.get("type") != "send" or not isinstance(payload, dict):
                self._emit(AgentError(ts_us=self.last_now_us,
                                      message=f"unexpected agent message: {message!r:.200}"))
                return
            kind = payload.get("type")
            if kind == "batch":
                records = decode_records(data) if data else _EMPTY
                self.last_now_us = int(payload["now_us"])
                self._emit(Batch(now_us=self.last_now_us, counters=_counters(payload["counters"]),
                                 records=records))
            elif kind == "hook":
                self._emit(HookEvent(ts_us=int(payload["ts_us"]), hook=int(payload["hook"]),
                                     name=payload["name"], ok=bool(payload["ok"]),
                                     detail=payload.get("detail", ""),
                                     pending=bool(payload.get("pending", False))))
            elif kind == "module":
                msg = ModuleEvent(ts_us=int(payload["ts_us"]), action=payload["action"],
                                  module=_module(payload["module"]))
                mark = payload.get("mark")
                if mark is not None and self.reader is not None:
                    self.reader.control(int(mark), msg)  # delivered at its marker's place
                else:
                    self._emit(msg)
            elif kind == "agent-error":
                self._emit(AgentError(ts_us=int(payload["ts_us"]), message=payload["message"]))
            else:
                self._emit(AgentError(ts_us=self.last_now_us,
                                      message=f"unknown agent message type {kind!r}"))
        except Exception as e:  # a bad message must not kill Frida's thread silently
            self._emit(AgentError(ts_us=self.last_now_us,
                                  message=f"host could not decode agent message: {e!r}"))

    # ------------------------------------------------------------ control

    def session_meta(self, target: str = "", mode: str = "attach", **extra: Any) -> SessionMeta:
        r = self.init_result
        return SessionMeta(
            target=target or r.get("main_module", ""),
            pid=int(r["pid"]),
            arch=r["arch"],
            platform=r["platform"],
            profile=self.profile.name,
            hooks=self.profile.hook_infos(),
            modules=[_module(m) for m in r.get("modules", [])],
            wall_clock_zero_us=int(r["wall_clock_zero_us"]),
            mode=mode,
            sample_bytes=int(r.get("sample_bytes", 0)),
            extra={
                "hook_status": r.get("hooks", []),
                "ring_bytes": r.get("ring_bytes", 0),
                "agent_bytes": r.get("agent_bytes", 0),
                "transport": self.transport_text(),
                "thread_state": r.get("thread_state", ""),
                "main_path": r.get("main_path", ""),
                **extra,
            },
        )

    def transport_text(self) -> str:
        if self.reader is not None:
            return "shared memory"
        return f"Frida messages ({self.transport_note})" if self.transport_note \
            else "Frida messages"

    def agent_now_us(self) -> int:
        """Agent time (µs since its time zero) now, from the host's clock."""
        return max(0, _host_clock_us() - self._clock_base)

    def final_read(self) -> AgentCounters | None:
        """The session ends without stop() (the target exited, crashed or was killed): read
        what the target published into the shared ring before it went. Idempotent."""
        if self.reader is None:
            return None
        with self._lock:
            if self.final_counters is not None:
                return self.final_counters
            self.final_counters = self.reader.final()
            return self.final_counters

    def ack(self, records: int) -> None:
        """Flow control: the consumer has fed this many records."""
        if self.reader is not None:
            self.reader.ack(records)

    def _setup_clock(self, r: dict[str, Any], host_at_reply: int) -> None:
        """Map the host's clock onto agent time: the same OS clock when the agent's time zero
        and now agree with ours (they do on Linux and Windows), else the reply's moment."""
        mono0 = int(r.get("monotonic_zero_us", 0))
        agent_now = int(r.get("now_us", 0))
        if mono0 and abs(host_at_reply - (mono0 + agent_now)) < 200_000:
            self._clock_base = mono0
        else:
            self._clock_base = host_at_reply - agent_now

    def flush(self) -> AgentCounters:
        """Drain the ring now; returns the counters after the drain."""
        result = self.script.exports_sync.flush()  # message transport: drains; shm: classifies
        if self.reader is not None:
            return self.reader.drain(0.05)
        return _counters(result["counters"])

    def stop(self) -> AgentCounters:
        """Revert every hook, then drain everything: the exact final counters. Idempotent."""
        with self._lock:
            if self._stopped:
                assert self.final_counters is not None
                return self.final_counters
            self._stopped = True
        result = self.script.exports_sync.stop()
        self.left_hooked = list(result.get("left_hooked", []))
        self.late_frida_tids = list(result.get("late_frida_tids", []))
        if self.reader is not None:  # hooks are off: read what is left, then the exact counts
            self.final_counters = self.reader.final(2.0)
        else:
            self.final_counters = _counters(result["counters"])
        return self.final_counters

    def unload(self) -> None:
        """Unload the script (Frida reverts anything still hooked). Safe on a dead session.
        If stop() left hooks whose entry point another party patched after us (a heap replacer),
        the script is eternalized instead: unloading would make Gum write the original prologue
        back over that party's patch. It stays in the target, idle (no timer), ~ring size."""
        with self._lock:
            if self._unloaded:
                return
            self._unloaded = True
        if self.reader is not None:
            self.reader.stop()
        with contextlib.suppress(Exception):  # the session may be gone (target exited)
            if self.left_hooked:
                self.script.eternalize()
            else:
                self.script.unload()
        self.release()

    def release(self) -> None:
        """The host's side of the mapping and the target lock (the agent unmaps its side)."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.target_lock is not None:
            self.target_lock.release()
            self.target_lock = None


def load_agent(session: Any, profile: Profile, config: AgentConfig | None = None,
               on_message: Callable[[StreamMessage], None] | None = None,
               lock: bool = True) -> AgentHandle:
    """Create the agent script in a frida Session, initialise it, and return its handle.
    `handle.init_result` is the agent's init answer (pid, arch, modules, hook results...).
    `lock`: take the one-monitor-per-process lock here (False: the caller holds it, taken
    before it attached, so that a refused second monitor never touches the target)."""
    config = config or AgentConfig()
    pid = getattr(getattr(session, "_impl", None), "pid", None)
    lock_held = None
    if pid is not None and lock:
        try:
            lock_held = TargetLock(int(pid))
        except TargetBusy as exc:
            raise AgentLoadError(str(exc)) from None
    script = session.create_script(agent_source(), name="nvse-monitor")
    handle = AgentHandle(script, profile, on_message)
    handle.target_lock = lock_held
    script.on("message", handle._handle)
    try:
        script.load()
        where = script.exports_sync.where()
        # hooks for another architecture are left out (the records and SessionMeta.hooks
        # index this list)
        profile = profile.for_arch(str(where["arch"]))
        handle.profile = profile
        cfg = config.to_json(profile)
        if config.transport == "shm":
            try:
                handle.ring = SharedRing(Layout(int(where["pointer_size"]), config.ring_slots),
                                         config.on_full, config.max_wait_ms, pid)
                cfg["transport"] = handle.ring.agent_spec()
            except MappingError as exc:
                handle.transport_note = f"shared memory unavailable: {exc}"
        else:
            handle.transport_note = "asked for"
        handle.init_result = script.exports_sync.init(cfg)
    except Exception as e:
        handle.unload()
        raise AgentLoadError(f"agent init failed: {e}") from e
    handle._setup_clock(handle.init_result, _host_clock_us())
    t = handle.init_result.get("transport") or {}
    if handle.ring is not None:
        handle.ring.unlink()  # mapped on both sides now (or never will be): no name left
        if t.get("kind") == "shm":
            handle.reader = RingReader(
                handle.ring.buf, handle.ring.layout, len(profile.hooks), handle._emit,
                handle.agent_now_us, config.max_inflight_records).start()
        else:
            handle.transport_note = f"shared memory unavailable: {t.get('detail')}"
            handle.ring.close()
            handle.ring = None
    return handle
