"""Live sessions: attach to or spawn a process, load the agent, feed the pipeline until the end.

Threads: Frida calls our message and detach callbacks on its own thread; they only put items on
a bounded queue. The main thread is the single consumer: it feeds the Pipeline (and the
RecordingWriter) in arrival order, keeps the live status line and watches for stop requests.
Blocking RPCs into the agent (init, stop) run on a short-lived worker thread so the consumer
keeps draining the queue meanwhile: Frida delivers an RPC's reply on the same thread as the
batches sent before it, so a full queue with a blocked consumer would deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, TextIO

import frida

from .. import __version__
from ..engine.engine import NOT_PRESENT
from ..outputs.files import DEFAULT_PREFIX, FileLimits, OutputDirError, check_prefix, make_out_dir
from ..outputs.pipeline import Pipeline
from ..stream.messages import (
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
)
from ..views.live_status import StatusLine
from . import addrspace, fnv
from .agent_host import DEFAULT_MAX_WAIT_MS, MAX_INFLIGHT_RECORDS, default_ring_slots
from .targets import (
    EXIT_WATCH_JS,
    ExitNotice,
    ExitStatus,
    TargetError,
    describe_wait_status,
    exe_path,
    frida_error_message,
    probe,
    resolve_target,
    unlisted_reason,
)

STREAM_TYPES = (Batch, ModuleEvent, HookEvent, AgentError, SessionEnd, AddressSpace,
                SymbolNames)
STOP_TIMEOUT_S = 15.0  # agent stop() + detach; then we detach without the final drain
CHILD_TIMEOUT_S = 30.0  # --follow-child: the spawned program must start its child by then
# --follow-child: how long a released launcher may take to end by itself before we detach from
# it. nvse_loader.exe ends about a second after it resumes the game; a detach racing its exit
# left it hung in ExitProcess (Wine, 1 launch in 6), holding the console.
LAUNCHER_GRACE_S = 8.0


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


class LiveSession:
    """One monitoring session; `run_attach(spec)` or `run_spawn(argv)` drives it to the end."""

    def __init__(self, opts: SessionOptions, err: TextIO | None = None) -> None:
        self.opts = opts
        self.err = err if err is not None else sys.stderr
        self.q: queue.Queue[Any] = queue.Queue(maxsize=opts.queue_max)
        self.device: frida.core.Device | None = None
        self.session: frida.core.Session | None = None
        self.agent: Any = None
        self.pid = 0
        self.mode = "attach"
        self.meta: SessionMeta | None = None
        self.pipeline: Pipeline | None = None
        self.recorder: Any = None
        self._exit_script: Any = None
        self._exit_notice: ExitNotice | None = None
        self._exit_status: ExitStatus | None = None  # spawn: the program's wait status
        # spawn: the program's file at start and when the session was detached (an exec)
        self._spawn_exe: str | None = None
        self._exe_at_detach: str | None = None
        self._stop_reason: str | None = None  # "interrupted" / "duration" once asked to stop
        self._stop_started = False
        self._stop_deadline = 0.0
        self._final_counters: AgentCounters | None = None
        self._last_counters: AgentCounters | None = None
        self._last_ts = 0
        self._agent_errors = 0
        self._messages = 0
        self._records = 0
        self._notes: list[str] = []
        self._pending_detach: _Detached | None = None
        self._duration_deadline: float | None = None
        self.out_dir: Path | None = opts.out_dir  # decided in _start when None
        # --follow-child: sessions on the launcher (and forks), each with its "it ended" event
        self._parents: list[tuple[Any, threading.Event]] = []
        self._spawned: list[int] = []  # every PID we started or held, killed on a failed start
        self._launcher_pid = 0
        self._release_thread: threading.Thread | None = None
        self._addrspace_watch: addrspace.Watch | None = None
        self.symbolizer: Any = None  # capture/symbolizer.Symbolizer
        self._stop_fed = threading.Event()  # the consumer has fed everything before stop()'s end
        self._target_lock: Any = None  # capture/shm.TargetLock while attached
        use_status = opts.status_line
        if use_status is None:
            use_status = bool(getattr(self.err, "isatty", lambda: False)()) and not opts.top
        self.metrics: Any = None  # metrics.MetricsServer
        self.dashboard: Any = None  # top.LiveDashboard
        self.status = StatusLine(self.err) if use_status else None

    # ---- Frida-thread callbacks: enqueue only -----------------------------------------------
    def _on_stream(self, msg: StreamMessage) -> None:
        self.q.put(msg)

    def _on_detached(self, reason: str, crash: Any) -> None:
        if self._spawn_exe is not None:  # one readlink: an exec'd program may not live long
            self._exe_at_detach = exe_path(self.pid)
        self.q.put(_Detached(str(reason), crash))

    def _on_child_added(self, child: Any) -> None:
        self.q.put(_ChildAdded(child))

    def _on_exit_watch(self, message: dict[str, Any], _data: Any) -> None:
        p = message.get("payload") if message.get("type") == "send" else None
        if isinstance(p, dict) and p.get("type") == "exit-watch":
            self.q.put(ExitNotice(str(p["how"]), str(p.get("what", "")), int(p.get("tid") or 0)))

    # ---- entry points ---------------------------------------------------------------------------
    def run_attach(self, spec: str) -> SessionResult:
        self.mode = "attach"
        self._preflight()
        self.device = _local_device()
        try:
            ref = resolve_target(self.device, spec)
        except TargetError:
            if _pid_exists(spec):  # Frida lists only processes it may inspect
                raise TargetError(
                    f"cannot attach to PID {spec.strip()}: the process exists but Frida cannot "
                    f"see it: {unlisted_reason(int(spec))}") from None
            raise
        self.pid = ref.pid
        self._lock_target(ref.pid)
        try:
            self.session = self._attach(ref.pid, f"attach to {ref.name} (PID {ref.pid})")
            return self._run()
        finally:
            self._target_lock.release()

    def run_spawn(self, argv: list[str]) -> SessionResult:
        if not argv:
            raise SessionError("spawn needs a program: nvse-monitor spawn [OPTS] -- PROGRAM [ARGS]")
        self.mode = "spawn"
        # Like a shell: a bare program name is looked up on PATH (Frida wants a path).
        if os.sep not in argv[0] and (found := shutil.which(argv[0])) is not None:
            argv = [found, *argv[1:]]
        self._plan_spawn(argv)
        self._preflight()
        self.device = _local_device()
        follow = self.opts.follow_child
        kwargs: dict[str, Any] = {}
        if self.opts.spawn_cwd is not None:
            kwargs["cwd"] = str(self.opts.spawn_cwd)
        if self.opts.spawn_env is not None:
            kwargs["env"] = self.opts.spawn_env  # Frida adds these to our environment
        if follow:
            self.device.on("child-added", self._on_child_added)
        try:
            try:
                pid = self.device.spawn(argv, stdio="inherit", **kwargs)
            except frida.InvalidArgumentError as exc:
                raise TargetError(f"cannot start {argv[0]!r}: {exc}") from None
            except (frida.ExecutableNotFoundError, frida.ExecutableNotSupportedError,
                    frida.PermissionDeniedError) as exc:
                raise TargetError(frida_error_message(exc, f"start {argv[0]!r}")) from None
            self._spawned.append(pid)
            if follow:
                self._launcher_pid = pid
                self._follow_child(pid, argv[0])
            else:
                self.pid = pid
                self._exit_status = ExitStatus(pid)
                self._spawn_exe = exe_path(pid)
                self.session = self._attach(pid, f"attach to the spawned {argv[0]!r}")
        except BaseException:
            self._release_parents()
            self._kill_spawned()
            raise
        return self._run()

    def _plan_spawn(self, argv: list[str]) -> None:
        """FNV defaults for a spawned FalloutNV.exe or nvse_loader.exe (docs/fnv.md): the Steam
        variables, the game directory as working directory, and for the loader: follow it to
        the FalloutNV.exe it starts."""
        name = PureWindowsPath(argv[0]).name.lower()
        if name not in (fnv.GAME_EXE.lower(), fnv.LOADER_EXE.lower()):
            return
        try:
            plan = fnv.plan_launch(argv[0], argv[1:])
        except ValueError as exc:
            if name == fnv.LOADER_EXE.lower():
                raise SessionError(str(exc)) from None
            return  # not a file here: Frida names the problem when it tries to start it
        if self.opts.spawn_env is None:
            self.opts.spawn_env = plan.env
        if self.opts.spawn_cwd is None:
            self.opts.spawn_cwd = plan.cwd
        if plan.gate_children and not self.opts.follow_child:
            self.opts.follow_child = True
            self.opts.child_name = self.opts.child_name or plan.child_name

    def _follow_child(self, launcher: int, program: str) -> None:
        """Child gating: attach to the launcher, let it run until it starts the child we monitor
        (held suspended by Frida), attach to that child; _start resumes it once the hooks are in
        and then lets the launcher go. On Linux the child is a fork that then execs: the fork is
        followed (gated too) to its exec."""
        assert self.device is not None
        want = self.opts.child_name
        what = want or "a child process"
        self._gate(launcher, f"attach to the spawned {program!r}")
        self.device.resume(launcher)
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        seen = 0
        while True:
            left = deadline - time.monotonic()
            try:
                item = self.q.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise TargetError(f"{program!r} did not start {what} within "
                                  f"{CHILD_TIMEOUT_S:.0f} s") from None
            if isinstance(item, _ParentGone):
                if item.pid == launcher and seen == 0:
                    raise TargetError(f"{program!r} ended ({item.reason}) without starting "
                                      f"{what}")
                continue
            if not isinstance(item, _ChildAdded):
                continue
            child = item.child
            seen += 1
            self._spawned.append(child.pid)
            name = PureWindowsPath(child.path or "").name
            if child.origin == "fork":  # the exec comes next, gated by this fork
                self._gate(child.pid, f"follow the fork {child.pid} of {program!r}")
                self.device.resume(child.pid)
            elif want is None or name.lower() == want.lower():
                self.pid = child.pid
                self.session = self._attach(child.pid, f"attach to {name} (PID {child.pid}), "
                                            f"started by {program!r}")
                return
            else:  # another child of the launcher: not ours to hold
                self.device.resume(child.pid)

    def _gate(self, pid: int, what: str) -> None:
        assert self.device is not None
        try:
            parent = self.device.attach(pid)
            gone = threading.Event()

            def on_detached(reason: str, _crash: Any) -> None:
                gone.set()
                self.q.put(_ParentGone(pid, reason))

            parent.on("detached", on_detached)
            parent.enable_child_gating()
        except (frida.ProcessNotFoundError, frida.PermissionDeniedError, frida.NotSupportedError,
                frida.ProcessNotRespondingError, frida.TransportError, frida.TimedOutError,
                frida.InvalidArgumentError, frida.InvalidOperationError) as exc:
            raise TargetError(frida_error_message(exc, what)) from None
        self._parents.append((parent, gone))

    def _release_parents(self) -> None:
        """Let the launcher go: child gating ends (later children run unmonitored), then we
        detach from it unless it ends by itself within LAUNCHER_GRACE_S. On its own thread: the
        first call waits until the launcher's agent answers. On Linux the launcher's Frida agent
        is still recovering from the fork (in the launcher's fork(), which has not returned yet)
        for a while after the child execs; detaching in the middle of that left the launcher
        blocked in fork() for good, about 1 follow in 60. Asking it to end gating first waits
        that out. A launcher that ends at once (nvse_loader.exe) ends with our agent in it, as
        any monitored program does: a detach racing its ExitProcess hung it under Wine."""
        parents, self._parents = self._parents, []
        if self.opts.follow_child and self.device is not None:
            with contextlib.suppress(Exception):
                self.device.off("child-added", self._on_child_added)
        if not parents:
            return

        def release() -> None:
            for parent, _ in parents:
                with contextlib.suppress(Exception):
                    parent.disable_child_gating()
            deadline = time.monotonic() + LAUNCHER_GRACE_S
            for parent, gone in parents:
                if gone.wait(max(deadline - time.monotonic(), 0.0)):
                    continue  # it ended by itself
                with contextlib.suppress(Exception):
                    parent.detach()

        self._release_thread = threading.Thread(target=release, name="nvse-monitor-release",
                                                daemon=True)
        self._release_thread.start()

    def _join_release(self, timeout_s: float = LAUNCHER_GRACE_S + 10.0) -> None:
        t = self._release_thread
        if t is not None:
            t.join(timeout_s)

    # ---- the session ----------------------------------------------------------------------------
    def _preflight(self) -> None:
        """What can be checked before touching the target: the output directory can be written,
        the prefix is a plain name, a --profile file parses. One-line SessionError otherwise."""
        from .hookprofile import load_profile

        try:
            check_prefix(self.opts.prefix)
        except OutputDirError as exc:
            raise SessionError(str(exc)) from None
        if self.opts.out_dir is not None:  # else checked once the target is known
            self._check_out_dir(Path(self.opts.out_dir))
        self._profile = None
        if self.opts.profile:
            try:
                self._profile = load_profile(self.opts.profile)
            except ValueError as exc:  # hookprofile.ProfileError
                raise SessionError(str(exc)) from None

    @staticmethod
    def _check_out_dir(out: Path) -> None:
        try:
            make_out_dir(out)
        except OutputDirError as exc:
            raise SessionError(str(exc)) from None
        except OSError as exc:
            raise SessionError(
                f"cannot write to output directory {out}: {exc.strerror or exc}") from None

    def _lock_target(self, pid: int) -> None:
        """One monitor per process, checked before we touch it (capture/shm.TargetLock)."""
        from .shm import TargetBusy, TargetLock

        try:
            self._target_lock = TargetLock(pid)
        except TargetBusy as exc:
            raise TargetError(str(exc)) from None

    def _attach(self, pid: int, what: str) -> frida.core.Session:
        assert self.device is not None
        try:
            session = self.device.attach(pid)
        except (frida.ProcessNotFoundError, frida.PermissionDeniedError, frida.NotSupportedError,
                frida.ProcessNotRespondingError, frida.TransportError, frida.TimedOutError,
                frida.InvalidArgumentError, frida.InvalidOperationError) as exc:
            raise TargetError(frida_error_message(exc, what)) from None
        session.on("detached", self._on_detached)
        return session

    def _run(self) -> SessionResult:
        try:
            self._start()
        except (frida.InvalidOperationError, frida.TransportError, frida.ProcessNotFoundError,
                frida.ProcessNotRespondingError, frida.TimedOutError) as exc:
            self._abandon_start()  # e.g. the process died during setup
            raise TargetError(frida_error_message(exc, f"set up monitoring of PID {self.pid}")) \
                from None
        except BaseException:
            self._abandon_start()
            raise
        try:
            end = self._consume()
        finally:
            self._restore_signals()
            if self.status is not None:
                self.status.close()
            if self.dashboard is not None:
                self.dashboard.stop()
        try:
            return self._finish(end)
        finally:
            if self.metrics is not None:
                self.metrics.stop()

    def _start(self) -> None:
        from .agent_host import AgentConfig, AgentLoadError, load_agent
        from .hookprofile import load_profile, select_profile

        assert self.session is not None
        if self.opts.metrics_port is not None:  # bind first: a busy port fails before any hook
            from ..views.metrics import MetricsServer

            try:
                self.metrics = MetricsServer(port=self.opts.metrics_port,
                                             address=self.opts.metrics_address).start()
            except OSError as exc:
                raise SessionError(f"cannot serve metrics on {self.opts.metrics_address}:"
                                   f"{self.opts.metrics_port}: {exc.strerror or exc}") from None
            self.err.write(f"nvse-monitor: metrics on {self.metrics.url}\n")
        try:
            info = probe(self.session)
        except frida.InvalidOperationError as exc:
            raise TargetError(frida_error_message(exc, f"inspect PID {self.pid}")) from None
        self.info = info
        try:
            if self.opts.profile:
                profile = getattr(self, "_profile", None) or load_profile(self.opts.profile)
                profile.check_target(info.main_module, info.platform, info.arch, self.opts.force)
            else:
                profile = select_profile(info.main_module, info.platform, info.arch)
        except ValueError as exc:  # hookprofile.ProfileError
            raise SessionError(str(exc)) from None
        self._check_version(profile, info.path)
        if self.out_dir is None:
            self.out_dir = fnv.default_out_dir(info.path or None, Path.cwd())
            self._check_out_dir(self.out_dir)

        self._exit_script = self.session.create_script(EXIT_WATCH_JS, name="nvse-monitor-exit")
        self._exit_script.on("message", self._on_exit_watch)
        self._exit_script.load()

        ring_slots = self.opts.ring_slots or default_ring_slots(info.arch)
        try:
            config = AgentConfig(
                ring_slots=ring_slots,
                large_alloc_bytes=self.opts.large_alloc_bytes,
                drain_interval_ms=self.opts.drain_interval_ms,
                max_batch_bytes=self.opts.max_batch_bytes,
                on_full=self.opts.on_full,
                max_wait_ms=self.opts.max_wait_ms,
                transport=self.opts.transport,
                max_inflight_records=MAX_INFLIGHT_RECORDS,
                sample_bytes=self.opts.sample_bytes,
            )
        except ValueError as exc:
            raise SessionError(str(exc)) from None
        # Messages can flow as soon as hooks are in: keep consuming while init runs.
        early: list[Any] = []
        try:
            self.agent = self._call_in_worker(
                "init", lambda: load_agent(self.session, profile, config, self._on_stream,
                                           lock=self._target_lock is None), early
            )
        except AgentLoadError as exc:
            raise SessionError(f"PID {self.pid}: {exc}") from None
        init_result = self.agent.init_result
        self.meta = self.agent.session_meta(
            target=info.main_module, mode=self.mode, ring_slots=ring_slots,
            on_full=self.opts.on_full, max_wait_ms=self.opts.max_wait_ms,
        )
        self.meta.utc_offset_s = _utc_offset_s()
        self.meta.monitor_version = __version__
        banner = _fnv_banner(self.meta, info.path)
        footprint = _footprint(init_result)
        if footprint is not None:
            self.meta.extra["agent_footprint"] = footprint[0]
            banner = [*banner, footprint[1]]
        if banner:
            # The engine logs its banner from SessionMeta; these lines ride along in the meta
            # (and so in recordings) until the engine logs meta.extra["banner"] itself.
            self.meta.extra["banner"] = banner

        if self.opts.addrspace_warn_bytes > 0 and info.arch == "ia32":
            # the threshold rides in the metadata (and so in recordings): replays judge alike
            self.meta.extra["addrspace_warn_bytes"] = self.opts.addrspace_warn_bytes
        try:
            # A burst makes snapshots faster than anyone reads the JSON and status files (the
            # spec's "every 10,000 allocations" is every few seconds in a game): at most 4
            # rewrites a second, and the final one (docs/files.md).
            self.pipeline = Pipeline(
                self.meta, self.out_dir, self.opts.prefix, self._engine_config(),
                limits=self.opts.limits, snapshot_files_every_s=0.25,
            )
            self.pipeline.start()
        except OutputDirError as exc:
            raise SessionError(str(exc)) from None
        if self.metrics is not None:
            self.metrics.attach(self.pipeline)
        if self.opts.top:
            from ..views.top import LiveDashboard

            self.dashboard = LiveDashboard(self.pipeline, on_quit=self.request_stop).start()
        if self.opts.record is not None:
            from ..stream.recording import RecordingWriter

            try:
                self.recorder = RecordingWriter(self.opts.record, self.meta)
            except OSError as exc:
                raise SessionError(f"{self.opts.record}: cannot write: {exc.strerror}") from None
        self._start_addrspace(info)
        self._start_symbolizer()
        self._install_signals()
        for item in early:
            detached = self._handle(item)
            if detached is not None and self._pending_detach is None:
                self._pending_detach = detached  # the target went away during init
        if self.mode == "spawn":
            assert self.device is not None
            self.device.resume(self.pid)
            self._release_parents()  # --follow-child: now the launcher may go on
        # wrappers (issue 11) record nothing: counted apart, installed or waiting for a module
        is_wrapper = [h.role == "wrapper" for h in self.agent.profile.hooks]
        all_hooks = init_result.get("hooks", [])
        hooks = [h for h in all_hooks if not is_wrapper[int(h.get("index", 0))]]
        wrappers = [h for h in all_hooks if is_wrapper[int(h.get("index", 0))]]
        hooks_ok = sum(1 for h in hooks if h.get("ok"))
        absent = sum(1 for h in all_hooks if not h.get("ok")
                     and str(h.get("detail", "")).startswith(NOT_PRESENT))
        wrap_note = (f", {sum(1 for h in wrappers if h.get('ok'))}/{len(wrappers)} wrappers"
                     if wrappers else "")
        agent_bytes = init_result.get("agent_bytes") or init_result.get("ring_bytes") or 0
        agent_mib = int(agent_bytes) / 2**20
        self.err.write(
            f"nvse-monitor: monitoring {self.meta.target} (PID {self.pid}, {self.meta.arch}, "
            f"{self.meta.platform}) with profile {self.meta.profile}: {hooks_ok}/"
            f"{len(hooks)} hooks{wrap_note}"
            f"{f' ({absent} optional not present)' if absent else ''}, "
            f"agent memory {agent_mib:.1f} MiB; "
            f"files in {self.out_dir}{'; Ctrl-C to stop' if self.mode == 'attach' else ''}\n"
        )
        for line in banner:
            self.err.write(f"nvse-monitor: {line}\n")
        self.err.flush()
        if self.opts.duration is not None:
            self._duration_deadline = time.monotonic() + self.opts.duration

    def _engine_config(self) -> Any:
        """opts.engine_config with the address-space threshold of the options."""
        from ..engine.engine import EngineConfig

        cfg = self.opts.engine_config or EngineConfig()
        if self.opts.addrspace_warn_bytes > 0 and isinstance(cfg, EngineConfig):
            cfg = dataclasses.replace(cfg, addrspace_warn_bytes=self.opts.addrspace_warn_bytes)
        return cfg

    def _start_addrspace(self, info: Any) -> None:
        """The headroom sampler next to the agent (ia32 targets): its samples are stream
        messages (engine, files, recording). A failure to load it is a note, never the end of
        the session."""
        if self.opts.addrspace_warn_bytes <= 0 or info.arch != "ia32":
            return
        assert self.session is not None and self.meta is not None
        try:
            self._addrspace_watch = addrspace.Watch(
                self.session, addrspace.default_limit(info.arch, info.platform),
                self.meta.wall_clock_zero_us, self.q.put,
                lambda m: self.q.put(_AddrSpaceError(m)), self.opts.addrspace_interval_ms)
        except (frida.InvalidOperationError, frida.TransportError) as exc:
            self._notes.append(f"address-space sampling off: {exc}")

    def _start_symbolizer(self) -> None:
        """Names for the call sites shown, asked of the agent off the consumer's thread; the
        answers come back through the queue as SymbolNames, fed (and recorded) in order."""
        if self.opts.symbols_interval_s <= 0 or self.agent is None or self.pipeline is None:
            return
        from .symbolizer import Symbolizer, agent_resolver

        self.symbolizer = Symbolizer(agent_resolver(self.agent.script),
                                     self.pipeline.symbol_wants, self.q.put,
                                     lambda: self._last_ts,
                                     interval_s=self.opts.symbols_interval_s).start()

    def _check_version(self, profile: Any, exe_path: str) -> None:
        """A profile made for one PE version (absolute addresses) refuses any other build,
        naming both versions, unless --force (which also lets it run on a non-PE test build)."""
        if profile.pe_version is None:
            return
        from .pe import PeError, check_profile_version

        try:
            note = check_profile_version(profile, exe_path, self.opts.force)
        except PeError as exc:
            raise SessionError(str(exc)) from None
        if note:
            self._notes.append(note)
            self.err.write(f"nvse-monitor: warning: {note}\n")

    def _call_in_worker(self, name: str, fn: Callable[[], Any], sink: list[Any]) -> Any:
        """Run a blocking agent call on a worker thread while queued items go to `sink`."""
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
                box["error"] = exc
            self.q.put(_WorkerDone(name))

        threading.Thread(target=work, name=f"nvse-monitor-{name}", daemon=True).start()
        while True:
            item = self.q.get()
            if isinstance(item, _WorkerDone) and item.name == name:
                break
            if isinstance(item, _Detached):
                sink.append(item)
                continue
            sink.append(item)
        if "error" in box:
            exc = box["error"]
            if any(isinstance(i, _Detached) for i in sink):
                raise TargetError(f"the target went away while the agent was loading ({exc})")
            if isinstance(exc, (TargetError, SessionError)):
                raise exc
            if isinstance(exc, frida.core.RPCException | frida.InvalidOperationError):
                raise SessionError(f"the agent failed to start in PID {self.pid}: {exc}") from None
            raise exc
        return box["result"]

    # ---- consumer loop --------------------------------------------------------------------------
    def _consume(self) -> _Detached:
        if self._pending_detach is not None:
            return self._pending_detach
        last_status = last_leaks = 0.0
        while True:
            try:
                item = self.q.get(timeout=0.1)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, Batch):
                    item = self._feed_batches(item)  # may hand back the next non-batch item
                    continue
                detached = self._handle(item)
                if detached is not None:
                    return detached
                item = None
            now = time.monotonic()
            deadline = self._duration_deadline
            if self._stop_reason is None and deadline is not None and now >= deadline:
                self._stop_reason = "duration"
            if self._stop_reason is not None and not self._stop_started:
                self._begin_stop()
            if self._stop_started and now > self._stop_deadline:
                self._notes.append("agent stop() timed out: detached without the final drain")
                self._stop_deadline = float("inf")
                threading.Thread(target=self._detach_quietly, daemon=True).start()
            if self.status is not None and now - last_status >= 0.5:
                last_status = now
                self.status.update(self.pipeline, self._last_counters, self._records, now)
            if self.pipeline is not None and now - last_leaks >= 0.5:
                last_leaks = now  # `top DIR` in another process may ask for the leaks now
                self.pipeline.answer_leak_request()

    def _handle(self, item: Any) -> _Detached | None:
        if isinstance(item, STREAM_TYPES):
            self._feed(item)
        elif isinstance(item, ExitNotice):
            # abort() and crashes outrank "exit": on abort() Frida runs the watcher's dispose
            # (which says "exit") before its exception handler reports the SIGABRT
            first = self._exit_notice
            if first is None or (first.how == "exit" and item.how != "exit"):
                self._exit_notice = item
        elif isinstance(item, _WorkerDone):
            if item.name == "stop":
                self._stop_fed.set()  # what the stop drained is fed: the last names may come
            if item.name == "stop" and item.error is None and item.result is not None:
                self._final_counters = _counters(item.result)
            elif item.error is not None:
                self._notes.append(f"agent {item.name}() failed: {item.error}")
        elif isinstance(item, _Detached):
            return item
        elif isinstance(item, _AddrSpaceError):
            self._notes.append(f"address-space sampling stopped: {item.message}")
        elif isinstance(item, _ChildAdded) and self.device is not None:
            with contextlib.suppress(Exception):  # a later child of a launcher: not monitored
                self.device.resume(item.child.pid)
        return None

    def _feed_batches(self, first: Batch) -> Any:
        """Feed `first` and the batches queued right behind it in one engine pass
        (Pipeline.feed_many: each batch keeps its own time and counters, the files are the same
        as feeding them one by one, minus superseded intermediate snapshots); returns the first
        queued item that is not a batch, or None. The recording gets every agent batch as is."""
        batches = [first]
        n = len(first.records)
        nxt = None
        while n < self.opts.merge_records:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, Batch):
                nxt = item
                break
            batches.append(item)
            n += len(item.records)
        for b in batches:
            self._account(b)
        assert self.pipeline is not None
        self.pipeline.feed_many(batches)
        return nxt

    def _feed(self, msg: StreamMessage) -> None:
        assert self.pipeline is not None
        self._account(msg)
        self.pipeline.feed(msg)

    def _account(self, msg: StreamMessage) -> None:
        """Counts, time and the recording for one message about to be fed."""
        self._messages += 1
        if isinstance(msg, Batch):
            self._records += len(msg.records)
            if self.agent is not None:
                self.agent.ack(len(msg.records))  # flow control: the reader may hand on more
            self._last_counters = msg.counters
            self._last_ts = max(self._last_ts, msg.now_us)
        else:
            self._last_ts = max(self._last_ts, int(getattr(msg, "ts_us", 0)))
            if isinstance(msg, AgentError):
                self._agent_errors += 1
        if self.recorder is not None:
            try:
                self.recorder.write(msg)
            except OSError as exc:  # disk full...: keep monitoring, the recording ends here
                self._notes.append(f"recording stopped: {self.opts.record}: {exc.strerror or exc}")
                with contextlib.suppress(OSError):
                    self.recorder.close()
                self.recorder = None

    # ---- stopping -------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stop_started = True
        self._stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        if self.status is not None:
            self.status.note(f"stopping ({self._stop_reason}): removing hooks, final drain...")

        def work() -> None:
            result, error = None, None
            try:
                result = self.agent.stop()  # reverts hooks, drains everything, final counters
            except Exception as exc:  # noqa: BLE001 - the target may be gone already
                error = exc
            self.q.put(_WorkerDone("stop", result, error))
            if self.symbolizer is not None:
                # The last names while the agent is still loaded (the hooks are off): for the
                # blocks the final drain brought too, once the consumer has fed them.
                self._stop_fed.wait(5.0)
                if error is None:
                    self.symbolizer.final_pass()
                else:
                    self.symbolizer.stop()
            self._detach_quietly()

        threading.Thread(target=work, name="nvse-monitor-stop", daemon=True).start()

    def _detach_quietly(self) -> None:
        if self.symbolizer is not None:
            self.symbolizer.stop()
        if self._addrspace_watch is not None:
            self._addrspace_watch.unload()
        with contextlib.suppress(Exception):
            self.agent.unload()
        with contextlib.suppress(Exception):
            if self._exit_script is not None:
                self._exit_script.unload()
        with contextlib.suppress(Exception):
            assert self.session is not None
            self.session.detach()

    def _end_message(self, detached: _Detached) -> SessionEnd:
        counters = self._final_counters or self._last_counters
        crash = _crash_summary(detached.crash)
        if detached.reason == "application-requested" and self._stop_reason is not None:
            return SessionEnd(self._last_ts, self._stop_reason, True, "", counters)
        notice = self._exit_notice
        new = self._exe_at_detach
        if detached.reason == "process-terminated" and new and new != self._spawn_exe:
            # Not an end: the program exec'd and the agent went with the old image (Frida
            # reports it as process-terminated).
            self._notes.append(
                f"the program replaced itself with {new} (exec): the hooks were in the program "
                f"it replaced, so {new} runs on (PID {self.pid}) unmonitored; to monitor it, "
                f"start it directly (nvse-monitor spawn -- {new} ARGS...) or attach to it "
                f"while it runs (nvse-monitor attach {self.pid})")
            return SessionEnd(self._last_ts, "target-exec", True, "", counters)
        if detached.reason == "process-terminated" and self.mode == "spawn":
            # Our own child: its wait status says exactly how it ended.
            status = self._wait_status()
            if status is not None:
                self._notes.append(f"the program {describe_wait_status(status)}")
            if status is not None and os.WIFEXITED(status):
                return SessionEnd(self._last_ts, "target-exited", True, "", counters)
            if status is not None and os.WIFSIGNALED(status):
                sig = _signal_name(os.WTERMSIG(status))
                what = f"crashed: {notice.what}; " if notice and notice.how == "crash" else ""
                return SessionEnd(self._last_ts, detached.reason, False,
                                  crash or f"{what}killed by {sig}", counters)
        if detached.reason == "process-terminated" and notice is not None and notice.how == "exit":
            return SessionEnd(self._last_ts, "target-exited", True, "", counters)
        if notice is not None and notice.how == "abort":
            crash = crash or f"the target called abort() (thread {notice.tid})"
        elif notice is not None and notice.how == "crash":
            crash = crash or f"crashed: {notice.what} (thread {notice.tid})"
        elif detached.reason == "process-terminated" and not crash:
            crash = "no exit() call seen: killed by a signal or crashed"
        return SessionEnd(self._last_ts, detached.reason, False, crash, counters)

    def _wait_status(self) -> int | None:
        """The spawned program's wait status: from its pidfd (exact, also when Frida reaped
        it first), else our own waitpid()."""
        status = self._exit_status.status() if self._exit_status is not None else None
        return status if status is not None else self._reap_spawned()

    def _reap_spawned(self, timeout_s: float = 2.0) -> int | None:
        """The wait status of the spawned program (Frida's spawn makes it our child), or None
        when it is not ours to reap (another platform, or already reaped)."""
        if os.name != "posix" or not self.pid:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except OSError:  # ECHILD: not our child, or Frida reaped it first
                return None
            if pid == self.pid:
                return status
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def _finish(self, detached: _Detached) -> SessionResult:
        assert self.pipeline is not None and self.meta is not None
        if self.symbolizer is not None:
            self.symbolizer.stop()  # the target is gone: no more names
        if self.agent is not None and self._final_counters is None:
            # the target went first: its last records are still in our view of the ring
            with contextlib.suppress(Exception):
                self._final_counters = self.agent.final_read()
        # Items queued after the detach notice (a late stop() result) still count.
        while True:
            try:
                self._handle(self.q.get_nowait())
            except queue.Empty:
                break
        end = self._end_message(detached)
        self._join_release()
        if self._launcher_pid and os.name == "posix":  # --follow-child: reap the launcher
            with contextlib.suppress(OSError):
                os.waitpid(self._launcher_pid, os.WNOHANG)
        self._feed(end)
        if self.recorder is not None:
            try:
                self.recorder.close()
            except OSError as exc:
                self._notes.append(f"recording incomplete: {self.opts.record}: {exc.strerror}")
        self.pipeline.finish(end.ts_us)
        low = getattr(self.pipeline.engine, "min_largest_free", None)
        if low is not None:
            self._notes.append(
                f"address space: smallest largest-free block {low / 2**20:.1f} MiB over "
                f"{self.pipeline.engine.addrspace_samples} samples "
                f"({self.pipeline.paths.addrspace})")
        code = 1 if self._agent_errors else 0
        return SessionResult(
            code, end, self.meta, self.pipeline.paths, self._messages, self._records,
            end.counters, self._notes,
        )

    def _abandon_start(self) -> None:
        """A failed start: leave the target as we found it (a spawned one is killed)."""
        for view in (self.dashboard, self.metrics):
            if view is not None:
                view.stop()
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self.agent.stop()
        self._detach_quietly()
        self._release_parents()
        if self.mode == "spawn":
            self._kill_spawned()

    def _kill_spawned(self) -> None:
        if self.device is None:
            return
        for pid in dict.fromkeys([self.pid, *reversed(self._spawned)]):
            if pid:
                with contextlib.suppress(Exception):
                    self.device.kill(pid)

    # ---- signals --------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            if self._stop_reason is None:
                self._stop_reason = "interrupted"
                self._notes.append(f"stopped by {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)

    def request_stop(self, reason: str = "interrupted") -> None:
        """Ask a running session to stop (thread-safe; used by tests and embedders)."""
        if self._stop_reason is None:
            self._stop_reason = reason


def _local_device() -> frida.core.Device:
    try:
        return frida.get_local_device()
    except frida.InvalidOperationError as exc:  # pragma: no cover
        raise SessionError(f"cannot use Frida's local device: {exc}") from None


def _pid_exists(spec: str) -> bool:
    spec = spec.strip()
    if not spec.isdigit() or os.name != "posix":
        return False
    try:
        os.kill(int(spec), 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def _counters(d: Any) -> AgentCounters | None:
    if isinstance(d, AgentCounters):
        return d
    if isinstance(d, dict):
        known = AgentCounters.__dataclass_fields__
        return AgentCounters(**{k: int(v) for k, v in d.items() if k in known})
    return None


def _crash_summary(crash: Any) -> str:
    if crash is None:
        return ""
    summary = getattr(crash, "summary", None) or str(crash)
    return " ".join(str(summary).split())[:500]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _utc_offset_s() -> int:
    """The host's local-time offset now (the log shows local time, like the original plugin)."""
    off = time.localtime().tm_gmtoff
    return int(off or 0)


def _footprint(init_result: dict[str, Any]) -> tuple[dict[str, int], str] | None:
    """The agent's own share of the target's memory (measured in the target at the end of init:
    the regions Frida cloaks) for the metadata and a banner line; None when not measured."""
    fp = init_result.get("footprint")
    if not isinstance(fp, dict) or "committed" not in fp:
        return None
    d = {"committed_bytes": int(fp["committed"]), "reserved_bytes": int(fp.get("reserved", 0)),
         "ring_bytes": int(init_result.get("ring_bytes") or 0)}
    mib = 1 << 20
    line = (f"Monitor footprint in the target: {d['committed_bytes'] / mib:.1f} MiB committed, "
            f"{d['reserved_bytes'] / mib:.1f} MiB reserved (Frida agent, ring "
            f"{d['ring_bytes'] / mib:.1f} MiB, hooks)")
    return d, line


def _fnv_banner(meta: SessionMeta, exe_path: str) -> list[str]:
    """The FNV banner lines (game and NVSE versions, plugins, heap replacers) for the game or
    the editor; [] for other targets."""
    name = PureWindowsPath(meta.target).name
    if name.lower() not in (fnv.GAME_EXE.lower(), fnv.EDITOR_EXE.lower()):
        return []
    from .pe import PeError, is_pe, read_pe_version

    def version(path: str) -> str | None:
        if not path or not is_pe(path):
            return None
        try:
            return read_pe_version(path).file_version
        except PeError:
            return None

    nvse = next((m for m in meta.modules if m.name.lower() in fnv.NVSE_MODULES), None)
    nvse_path = next((m.path for m in meta.modules if m.name.lower() == fnv.NVSE_MODULES[0]),
                     nvse.path if nvse is not None else "")
    return fnv.banner(meta.modules, name, version(exe_path), version(nvse_path)).lines()
