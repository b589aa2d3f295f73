"""A live session's inputs and results: SessionOptions (what the CLI or an embedder asks for),
SessionResult (what the session hands back), SessionError (one line, printed by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..outputs.files import DEFAULT_PREFIX, FileLimits
from ..stream.messages import AgentCounters, SessionEnd, SessionMeta
from . import addrspace
from .agent_host import DEFAULT_MAX_WAIT_MS


class SessionError(Exception):
    """The session could not start or run (one line, printed by the CLI)."""


@dataclass
class SessionOptions:
    profile: str | None = None  # name or path; None = hookprofile.select_profile
    # None: the game's Data/NVSE/Plugins when the target is FalloutNV.exe, else DEFAULT_OUT_DIR
    # under the working directory (fnv.default_out_dir, decided once the target is known)
    out_dir: Path | None = None
    prefix: str = DEFAULT_PREFIX
    record: Path | None = None
    duration: float | None = None  # seconds, then stop like Ctrl-C
    ring_slots: int | None = None  # None: agent_host.default_ring_slots(target arch)
    on_full: str = "wait"  # a full ring: producers wait (bounded by max_wait_ms) or drop
    max_wait_ms: int = DEFAULT_MAX_WAIT_MS
    sample_bytes: int = 0  # mean bytes between sampled stacks (CLI default: agent_host's)
    transport: str = "shm"  # "messages": the agent drains and sends (tests, benchmarks)
    large_alloc_bytes: int = 1 << 20
    drain_interval_ms: int = 10
    # Agent batch size: measured on 2 cores under load, 64 KiB batches sustain 5 M events/s
    # where 1 MiB batches stall the drain (bench/bench_e2e.py, docs/sessions.md).
    max_batch_bytes: int = 64 << 10
    merge_records: int = 1 << 17  # feed queued batches in runs of up to this many records
    # A run of fewer records than merge_min_records waits up to merge_wait_s for the batches
    # behind it (consumer.py): at moderate rates the engine's cost is mostly per pass.
    merge_min_records: int = 1 << 14
    merge_wait_s: float = 0.02
    force: bool = False  # use --profile even if it names other executables / another version
    # spawn: start the program in this directory / with these extra environment variables
    # (None: ours; FalloutNV.exe and nvse_loader.exe get fnv.spawn_env's Steam variables).
    spawn_cwd: Path | None = None
    spawn_env: dict[str, str] | None = None
    # spawn: monitor the child the program starts (nvse_loader's way) instead of the program:
    # the first child that execs (Linux) / is created (Windows), or the one named child_name.
    # A spawned nvse_loader.exe is followed to its FalloutNV.exe without asking.
    follow_child: bool = False
    child_name: str | None = None
    # Address-space headroom (addrspace.py): sampled about once a second in ia32 targets; the
    # engine warns and degrades when the largest free block falls under this many bytes
    # (EngineConfig.addrspace_warn_bytes); 0 = do not sample.
    addrspace_warn_bytes: int = addrspace.DEFAULT_WARN_BYTES
    addrspace_interval_ms: int = addrspace.DEFAULT_INTERVAL_MS
    status_line: bool | None = None  # None: when stderr is a terminal
    queue_max: int = 8192  # messages (a batch is <= max_batch_bytes: 512 MiB at most)
    engine_config: Any = None
    # Views (docs/views.md): /metrics on metrics_address:metrics_port, the `top` dashboard.
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    top: bool = False
    limits: FileLimits | None = None  # log/CSV size caps (None: writers' defaults)
    # Function names of the call sites shown (issue 11, capture/symbolizer.py): asked of the
    # agent every symbols_interval_s seconds and once at stop; 0 = never.
    symbols_interval_s: float = 2.0


@dataclass
class SessionResult:
    exit_code: int
    end: SessionEnd
    meta: SessionMeta
    out_paths: Any = None  # outputs.files.FilePaths
    messages: int = 0
    records: int = 0
    final_counters: AgentCounters | None = None
    notes: list[str] = field(default_factory=list)
