"""--follow-child: monitor the child a launcher starts (nvse_loader.exe's way) instead of the
launcher. Frida's child gating holds the child we want suspended until the hooks are in; the
launcher (and, on Linux, the fork that execs) is released once they are, and the PIDs we
started or held are killed if the start fails. Also the FNV spawn plan that turns following on
for nvse_loader.exe. A mixin of LiveSession (session.py)."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import PureWindowsPath
from typing import Any

import frida

from . import fnv
from .options import SessionError
from .queue_items import _ChildAdded, _ParentGone
from .targets import TargetError, frida_error_message

CHILD_TIMEOUT_S = 30.0  # --follow-child: the spawned program must start its child by then
# --follow-child: how long a released launcher may take to end by itself before we detach from
# it. nvse_loader.exe ends about a second after it resumes the game; a detach racing its exit
# left it hung in ExitProcess (Wine, 1 launch in 6), holding the console.
LAUNCHER_GRACE_S = 8.0
# ... cut to this when the session ends first (a short-lived child of a launcher that lives on:
# the monitor's exit should not wait out the whole grace)
END_GRACE_S = 1.0


class ChildFollowing:
    """Launcher following for LiveSession; its state is set in LiveSession.__init__."""

    opts: Any  # SessionOptions
    q: queue.Queue[Any]
    device: frida.core.Device | None
    session: frida.core.Session | None
    pid: int
    _parents: list[tuple[Any, threading.Event]]
    _release_by = 0.0  # monotonic time at which a launcher still running is detached from
    _spawned: list[int]
    _launcher_pid: int
    _release_thread: threading.Thread | None
    _attach: Callable[[int, str], frida.core.Session]  # LiveSession's

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

    def _on_child_added(self, child: Any) -> None:
        self.q.put(_ChildAdded(child))

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

        self._release_by = time.monotonic() + LAUNCHER_GRACE_S

        def release() -> None:
            for parent, _ in parents:
                with contextlib.suppress(Exception):
                    parent.disable_child_gating()
            for parent, gone in parents:
                while not gone.wait(0.05):  # until it ends by itself, or _release_by
                    if time.monotonic() >= self._release_by:
                        with contextlib.suppress(Exception):
                            parent.detach()
                        break

        self._release_thread = threading.Thread(target=release, name="nvse-monitor-release",
                                                daemon=True)
        self._release_thread.start()

    def _join_release(self, timeout_s: float = 10.0) -> None:
        """At the session's end: a launcher still running gets END_GRACE_S more to end by
        itself, then we detach from it."""
        t = self._release_thread
        if t is not None:
            self._release_by = min(self._release_by, time.monotonic() + END_GRACE_S)
            t.join(END_GRACE_S + timeout_s)

    def _kill_spawned(self) -> None:
        if self.device is None:
            return
        for pid in dict.fromkeys([self.pid, *reversed(self._spawned)]):
            if pid:
                with contextlib.suppress(Exception):
                    self.device.kill(pid)


    def _reap_launcher(self) -> None:
        if self._launcher_pid and os.name == "posix":  # --follow-child: reap the launcher
            with contextlib.suppress(OSError):
                os.waitpid(self._launcher_pid, os.WNOHANG)
