"""Live sessions: attach to or spawn a process, load the agent, feed the pipeline until the end.

Threads: Frida calls our message and detach callbacks on its own thread; they only put items on
a bounded queue. The main thread is the single consumer: it feeds the Pipeline (and the
RecordingWriter) in arrival order, keeps the live status line and watches for stop requests.
Blocking RPCs into the agent (init, stop) run on a short-lived worker thread so the consumer
keeps draining the queue meanwhile: Frida delivers an RPC's reply on the same thread as the
batches sent before it, so a full queue with a blocked consumer would deadlock.

LiveSession is here (start and finish); its parts: consumer.py (the run loop and stopping),
children.py (--follow-child), ending.py (how the session ended), banner.py (the start lines),
options.py (SessionOptions, SessionResult, SessionError), queue_items.py (the queue's notices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import frida

from .. import __version__, native
from ..outputs.files import OutputDirError, check_prefix, make_out_dir
from ..outputs.pipeline import Pipeline
from ..stream.messages import AgentCounters, SessionMeta, StreamMessage
from ..views.live_status import StatusLine
from . import addrspace, fnv
from .agent_host import MAX_INFLIGHT_RECORDS, default_ring_slots
from .banner import agent_footprint, fnv_banner, monitoring_line
from .children import ChildFollowing
from .consumer import Consumer
from .ending import SessionEnding
from .options import SessionError, SessionOptions, SessionResult
from .queue_items import _AddrSpaceError, _Detached
from .targets import (
    EXIT_WATCH_JS,
    ExitNotice,
    ExitStatus,
    TargetError,
    exe_path,
    frida_error_message,
    probe,
    resolve_target,
    unlisted_reason,
)

__all__ = ["LiveSession", "SessionError", "SessionOptions", "SessionResult"]


class LiveSession(Consumer, ChildFollowing, SessionEnding):
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
        banner = fnv_banner(self.meta, info.path)
        footprint = agent_footprint(init_result)
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
        line = monitoring_line(self.meta, self.pid, self.agent.profile.hooks, init_result,
                               self.out_dir, attach=self.mode == "attach")
        self.err.write(f"nvse-monitor: {line}\n")
        for line in banner:
            self.err.write(f"nvse-monitor: {line}\n")
        if native.KERNELS is None:  # the slower host path: worth knowing under load
            self.err.write(f"nvse-monitor: host kernels: {native.STATUS}; the host needs about "
                           "1.5x more CPU per event (docs/native.md)\n")
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

    # ---- the end ------------------------------------------------------------------------------
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
        self._reap_launcher()
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


def _utc_offset_s() -> int:
    """The host's local-time offset now (the log shows local time, like the original plugin)."""
    off = time.localtime().tm_gmtoff
    return int(off or 0)


