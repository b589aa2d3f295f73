"""Finding the target process, learning what it is before the agent loads, and watching it exit.

Everything here turns Frida's exceptions into one-line `TargetError`s the CLI prints as is.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import frida


class TargetError(Exception):
    """A user-facing, one-line problem with the target (unknown, ambiguous, not attachable)."""


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    name: str


@dataclass(frozen=True)
class TargetInfo:
    """What the probe script saw in the target (Frida's own view, so ia32 under x64 is right)."""

    platform: str  # Process.platform: linux, windows, darwin...
    arch: str  # Process.arch: x64, ia32, arm64...
    main_module: str  # the executable's module name, e.g. "FalloutNV.exe"
    path: str  # the executable's path


def frida_error_message(exc: BaseException, what: str) -> str:
    """One line for a Frida failure while doing `what` (e.g. "attach to PID 42")."""
    hints = {
        frida.PermissionDeniedError: "permission denied (run as the target's user or as root; "
        "on Linux check /proc/sys/kernel/yama/ptrace_scope)",
        frida.ProcessNotFoundError: "no such process (did it exit?)",
        frida.ProcessNotRespondingError: "the process is not responding",
        frida.ExecutableNotFoundError: "executable not found",
        frida.ExecutableNotSupportedError: "not an executable Frida can start",
        frida.NotSupportedError: "not supported for this process",
        frida.TimedOutError: "timed out",
        frida.TransportError: "lost the connection to the process",
    }
    for cls, hint in hints.items():
        if isinstance(exc, cls):
            detail = str(exc).strip()
            return f"cannot {what}: {hint}" + (f" ({detail})" if detail else "")
    return f"cannot {what}: {type(exc).__name__}: {str(exc).strip()}"


PF_KTHREAD = 0x00200000  # linux/sched.h: the task is a kernel thread


def unlisted_reason(pid: int) -> str:
    """Why process `pid`, which exists, is not in Frida's list (which holds only what it may
    inspect). Linux: from /proc; elsewhere the usual cause."""
    state, flags = "", 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        state, flags = fields[0], int(fields[6])
    if flags & PF_KTHREAD:
        return "it is a kernel thread: there is no program in it to monitor"
    if state == "Z":
        return "it has exited (a zombie its parent has not reaped)"
    if os.name != "posix" or os.geteuid() != 0:
        return "permission denied (run as the target's user or as root)"
    if not _has_cap_sys_ptrace():
        return ("permission denied: the monitor runs as root but without CAP_SYS_PTRACE "
                "(dropped here, e.g. by a container)")
    return ("permission denied although the monitor runs as root with CAP_SYS_PTRACE: the "
            "process is protected (/proc/sys/kernel/yama/ptrace_scope 3, or a security module)")


CAP_SYS_PTRACE = 19


def _has_cap_sys_ptrace() -> bool:
    """Whether this process's effective capabilities hold CAP_SYS_PTRACE (Linux; True when
    /proc cannot tell)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _exe_name(p: Any) -> str:
    path = str((getattr(p, "parameters", None) or {}).get("path") or "")
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _by_executable(device: frida.core.Device, wanted: str) -> list[ProcessRef]:
    """Processes whose executable file is named `wanted` (or `wanted`.exe), named by that file
    as the monitor will show them."""
    try:
        procs = device.enumerate_processes(scope="metadata")
    except frida.InvalidOperationError:  # pragma: no cover - device gone
        return []
    out = []
    for p in procs:
        exe = _exe_name(p)
        if exe and exe.lower() in (wanted, wanted + ".exe"):
            out.append(ProcessRef(p.pid, exe))
    return out


def resolve_target(device: frida.core.Device, spec: str) -> ProcessRef:
    """A PID (all digits), a process name or the file name of its executable (the name the
    monitor shows; case-insensitive, ".exe" optional, must be unique)."""
    spec = spec.strip()
    try:
        procs = device.enumerate_processes()
    except frida.InvalidOperationError as exc:  # pragma: no cover - device gone
        raise TargetError(frida_error_message(exc, "list processes")) from None
    if spec.isdigit():
        pid = int(spec)
        for p in procs:
            if p.pid == pid:
                return ProcessRef(p.pid, p.name)
        raise TargetError(f"no process with PID {pid}")
    wanted = spec.lower()
    found = [p for p in procs if p.name.lower() == wanted]
    if not found and os.sep not in wanted:
        # Windows users type "FalloutNV" for "FalloutNV.exe".
        found = [p for p in procs if p.name.lower() == wanted + ".exe"]
    if not found:
        # The name the monitor shows is the executable's (python3 runs python3.11; Linux
        # process names are cut to 15 characters): accept that one too.
        found = _by_executable(device, wanted)
    if not found:
        raise TargetError(f"no process named {spec!r} (give its PID, its name or its "
                          "executable's file name)")
    if len({p.pid for p in found}) > 1:
        listing = ", ".join(f"{p.name} (PID {p.pid})" for p in sorted(found, key=lambda p: p.pid))
        raise TargetError(f"{len(found)} processes are named {spec!r}: {listing}; give a PID")
    return ProcessRef(found[0].pid, found[0].name)


_PROBE_JS = """
const m = Process.mainModule;
send({platform: Process.platform, arch: Process.arch, main: m.name, path: m.path});
"""


def probe(session: frida.core.Session, timeout_s: float = 10.0) -> TargetInfo:
    """Run a throw-away script to learn the target's platform, arch and executable."""
    got: dict[str, Any] = {}
    done = threading.Event()

    def on_message(message: dict[str, Any], _data: Any) -> None:
        if message.get("type") == "send":
            got.update(message["payload"])
        else:
            got["error"] = message.get("description", str(message))
        done.set()

    script = session.create_script(_PROBE_JS, name="nvse-monitor-probe")
    script.on("message", on_message)
    script.load()
    if not done.wait(timeout_s):
        raise TargetError("the target did not answer the probe script")
    with contextlib.suppress(frida.InvalidOperationError):
        script.unload()
    if "error" in got:
        raise TargetError(f"probe script failed in the target: {got['error']}")
    return TargetInfo(got["platform"], got["arch"], got["main"], got.get("path", ""))


# Tells the host how the target ends, so a normal exit can be told from a kill or a crash (all
# three detach with "process-terminated"). Frida calls rpc.exports.dispose when the process
# exits normally (exit(), return from main, ExitProcess) and after abort(), never on a kill; the
# exception handler describes a crash and lets it proceed (never handles it). Measured here: a
# hook on exit() itself does not run reliably (Frida's own exit handling comes first), and a
# message sent from the crashing thread is lost unless that thread waits a moment for the
# transport to flush it. Nothing here runs on the allocation path.
EXIT_WATCH_JS = """
let reported = false;
Process.setExceptionHandler(d => {
  if (!reported) {
    reported = true;
    const where = (p) => {
      const m = p === null ? null : Process.findModuleByAddress(p);
      return m === null ? String(p) : `${m.name}+0x${p.sub(m.base).toString(16)}`;
    };
    let text = `${d.type} at ${where(d.address)}`;
    if (d.memory) text += ` (${d.memory.operation} of ${d.memory.address})`;
    send({type: 'exit-watch', how: d.type === 'abort' ? 'abort' : 'crash', what: text,
          tid: Process.getCurrentThreadId()});
    Thread.sleep(0.1); // the process dies when we return: let the message leave first
  }
  return false; // not handled: the target crashes exactly as it would have without us
});
rpc.exports.dispose = function () {
  if (!reported)
    send({type: 'exit-watch', how: 'exit', what: 'exit', tid: Process.getCurrentThreadId()});
};
"""


class ExitStatus:
    """The wait status of a program we spawned, however it ended. Frida reaps its spawned
    children itself, so a waitpid() of ours lost that race (seen 4 times in 20 with a blocking
    waitid(WNOWAIT) even); a pidfd opened while the program lives keeps its exit status after
    whoever reaped it (Linux >= 6.13: PIDFD_GET_INFO with PIDFD_INFO_EXIT). Elsewhere status()
    says None and the caller falls back to waitpid()."""

    GET_INFO = 0xC040FF0B  # _IOWR(0xFF, 11, struct pidfd_info), its 64-byte first version
    INFO_EXIT = 1 << 3
    EXIT_CODE_AT = 60  # struct pidfd_info: u64 mask, u64 cgroupid, 11 x u32, s32 exit_code

    def __init__(self, pid: int) -> None:
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or an old kernel
            self.fd = os.pidfd_open(pid)

    def status(self, timeout_s: float = 1.0) -> int | None:
        """The wait status (os.WIFEXITED...), waiting up to `timeout_s` for the exit to be
        recorded; None when it cannot be learnt this way."""
        if self.fd is None:
            return None
        import fcntl
        import struct

        deadline = time.monotonic() + timeout_s
        while True:
            buf = bytearray(struct.pack("<Q", self.INFO_EXIT) + bytes(56))
            try:
                fcntl.ioctl(self.fd, self.GET_INFO, buf)
            except OSError:  # ENOTTY/EINVAL: a kernel without PIDFD_GET_INFO
                return None
            if struct.unpack_from("<Q", buf)[0] & self.INFO_EXIT:
                return struct.unpack_from("<i", buf, self.EXIT_CODE_AT)[0]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def exe_path(pid: int) -> str | None:
    """The file process `pid` runs (Linux /proc; None elsewhere or when it is gone)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def describe_wait_status(status: int) -> str:
    """`exited with status 3`, `was killed by SIGKILL`."""
    import signal

    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        num = os.WTERMSIG(status)
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = f"signal {num}"
        return f"was killed by {name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
    return f"wait status {status:#x}"


@dataclass(frozen=True)
class ExitNotice:
    """How the target is ending: "exit" (exit() or return from main; also sent when the host
    unloads the watcher itself), "abort" or "crash" (`what` describes the exception)."""

    how: str
    what: str
    tid: int
