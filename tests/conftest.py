"""Shared fixtures: C test targets compiled with gcc for x86_64 and -m32 (live tests)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nvse_monitor.stream.events import Kind, realloc_halves

TARGETS_DIR = Path(__file__).parent / "targets"
ARCHES = ("x64", "ia32")
_ARCH_FLAGS = {"x64": ["-m64"], "ia32": ["-m32"]}


@dataclass
class TargetBuilder:
    """Compiles tests/targets/*.c on demand, once per session and arch."""

    build_dir: Path
    _cache: dict[tuple[str, str, bool, tuple[str, ...]], Path]
    _m32_error: str | None = None

    def m32_problem(self) -> str | None:
        """Why -m32 programs cannot be built here (None: they can)."""
        if self._m32_error is None:
            probe = self.build_dir / "m32-probe.c"
            probe.write_text("#include <pthread.h>\nint main(void){return 0;}\n")
            r = subprocess.run(
                ["gcc", "-m32", "-pthread", str(probe), "-o", str(self.build_dir / "m32-probe")],
                capture_output=True,
                text=True,
            )
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            self._m32_error = "" if r.returncode == 0 else last
        return self._m32_error or None

    def build(self, name: str, arch: str = "x64", shared: bool = False,
              flags: tuple[str, ...] = ()) -> Path:
        """Path of the compiled target `name` (tests/targets/<name>.c), `flags` added to gcc's
        (e.g. -rdynamic for functions hooked by export); skips the test if a 32-bit toolchain
        is missing."""
        key = (name, arch, shared, flags)
        if key in self._cache:
            return self._cache[key]
        if shutil.which("gcc") is None:
            pytest.skip("gcc is not installed")
        if arch == "ia32" and (why := self.m32_problem()):
            pytest.skip(f"gcc -m32 cannot link here (install gcc-multilib): {why}")
        src = TARGETS_DIR / f"{name}.c"
        sub = arch + "".join(flags).replace("/", "_")  # one build per set of flags
        out = self.build_dir / sub / (f"lib{name}.so" if shared else name)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["gcc", *_ARCH_FLAGS[arch], "-O2", "-g", "-Wall", "-pthread", *flags, str(src)]
        cmd += ["-o", str(out)]
        if shared:
            cmd[1:1] = ["-shared", "-fPIC"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building {src.name} for {arch} failed:\n{r.stderr}")
        self._cache[key] = out
        return out


@pytest.fixture(scope="session")
def targets(tmp_path_factory: pytest.TempPathFactory) -> TargetBuilder:
    return TargetBuilder(tmp_path_factory.mktemp("build"), {})


# ---- live-session helpers: a C target and the CLI as real subprocesses -------------------------

REPO = Path(__file__).resolve().parent.parent


class Target:
    """A test target speaking the READY / DONE / AFTER line protocol on stdin/stdout."""

    def __init__(self, argv: list[str | Path]) -> None:
        self.proc = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid

    def expect(self, tag: str, timeout: float = 60.0) -> str:
        """The rest of the next stdout line starting with `tag`."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"target exited (rc {self.proc.poll()}) before {tag}")
            if line.startswith(tag):
                return line[len(tag):].strip()
        raise AssertionError(f"no {tag} line from the target in {timeout}s")

    def wait_ready(self) -> None:
        assert int(self.expect("READY")) == self.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def done(self, timeout: float = 60.0) -> dict:
        return json.loads(self.expect("DONE", timeout))

    def finish(self, timeout: float = 30.0) -> dict | None:
        """Let a --wait target end; returns its AFTER report when it prints one."""
        try:
            rest, _ = self.proc.communicate(input="\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"target did not end within {timeout}s") from None
        assert self.proc.returncode == 0, f"target exit status {self.proc.returncode}"
        after = [line[5:] for line in rest.splitlines() if line.startswith("AFTER")]
        return json.loads(after[-1]) if after else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Monitor:
    """`nvse-monitor ARGS` as a subprocess, its stderr collected by a thread."""

    def __init__(self, args: list[str | Path], stdout: int | None = subprocess.DEVNULL,
                 env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvse_monitor", *[str(a) for a in args]],
            stderr=subprocess.PIPE, stdout=stdout, text=True, cwd=REPO, env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(x for x in self.lines if x != "<eof>")

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if "<eof>" in self.lines:
                    raise AssertionError(f"monitor exited before {text!r}:\n{self.stderr}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {text!r} from the monitor in {timeout}s:\n{self.stderr}")
                self._cond.wait(left)

    def wait_monitoring(self, timeout: float = 60.0) -> str:
        return self.wait_for("nvse-monitor: monitoring ", timeout)

    def signal(self, sig: int = signal.SIGINT) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"monitor did not end in {timeout}s:\n{self.stderr}") from None
        self.wait_for("<eof>", 10)  # all of stderr read
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class LiveProcs(list):
    """Targets and monitors of one test, killed at its end if still running."""

    def start(self, argv: list[str | Path]) -> Target:
        """A target started and READY."""
        target = Target(argv)
        self.append(target)
        target.wait_ready()
        return target

    def attach(self, target: Target, *args: str | Path) -> Monitor:
        """`nvse-monitor attach` to the target, once it says it is monitoring."""
        mon = Monitor(["attach", target.pid, *args])
        self.append(mon)
        mon.wait_monitoring()
        return mon


@pytest.fixture
def live_procs():
    """Collects Target/Monitor objects and kills whatever a failing test left running."""
    procs = LiveProcs()
    yield procs
    for p in reversed(procs):
        p.kill()


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` (created) for the block; the test is skipped where mounting is
    not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def unmonitored_truth(exe: Path, work: list[str]) -> dict:
    """The workload's DONE report with no monitor at all: what a monitored run must match."""
    out = subprocess.run([str(exe), *work], capture_output=True, text=True, check=True).stdout
    return json.loads(out.split("DONE", 1)[1])


def wait_frida_gone(pid: int, timeout: float = 30.0) -> None:
    """Until Frida's agent library has left the target. Threads that exit while Frida is still
    unloading it can crash the target in Frida's own code (docs/agent.md "Known problems";
    seen with both transports, not ours to fix): the workers exit only after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/maps") as f:
            if "frida-agent" not in f.read():
                return
        time.sleep(0.05)


def calls_of(recs: np.ndarray) -> np.ndarray:
    """The records that stand for one successful allocator call each, as the fake programs count
    their calls: not FAILED, not a sampled stack's STACK chunk, not the FREE half of a realloc
    that moved its block (its REALLOC record is the call)."""
    k = recs["kind"]
    return recs[(k != Kind.FAILED) & (k != Kind.STACK) & ~realloc_halves(recs)]


def read_outputs(out_dir: Path, prefix: str = "MemoryPoolNVSE") -> dict[str, Path]:
    names = {
        "log": f"{prefix}_rpmalloc.log",
        "json": f"{prefix}_stats.json",
        "csv": f"{prefix}_performance.csv",
        "status": f"{prefix}_status.txt",
    }
    return {k: out_dir / v for k, v in names.items()}


@pytest.fixture(params=["native", "numpy"])
def kernels(request, monkeypatch):
    """Runs a test on the compiled per-record loops and on their numpy twins
    (nvse_monitor/native). An install without the compiled ones fails the native runs (CI
    builds them) unless NVSE_MONITOR_NATIVE=0 asks for numpy only."""
    from nvse_monitor import native

    if request.param == "numpy":
        monkeypatch.setattr(native, "KERNELS", None)
    elif native.KERNELS is None:
        if os.environ.get("NVSE_MONITOR_NATIVE") == "0":
            pytest.skip("NVSE_MONITOR_NATIVE=0")
        pytest.fail(f"no compiled kernels: {native.STATUS}")
    return request.param
