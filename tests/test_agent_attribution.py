"""Issue 11, agent side: wrapper-aware callers and sampled stacks, at the record level (no
engine). A real agent in a C target (tests/agent_targets/wrapped.c, x86_64 and -m32) whose named
functions allocate directly, through a wrapper and through nested wrappers; the records' callers
and stack frames are checked against the target's symbols (nm)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from agent_harness import TARGETS, Monitored, m32_problem

from nvse_monitor.capture.agent_host import AgentConfig
from nvse_monitor.capture.hookprofile import Profile, parse_profile
from nvse_monitor.stream.events import FLAG_SAMPLED, FLAG_VIA_WRAPPER, Kind

pytestmark = pytest.mark.frida

ARCHES = ["x64", pytest.param("ia32", marks=pytest.mark.m32)]
WRAPPERS = ("my_wrapper", "my_wrapper_calloc", "my_wrapper_free", "outer_wrapper")
LIBC = Path(__file__).resolve().parents[1] / "nvse_monitor" / "profiles" / "linux-libc.toml"


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("attribution-bin")


def target(bin_dir: Path, arch: str) -> Path:
    out = bin_dir / f"wrapped-{arch}"
    if not out.exists():
        if arch == "ia32" and (why := m32_problem()):
            pytest.skip(why)
        cmd = ["gcc", "-O0", "-g", "-fno-omit-frame-pointer", "-rdynamic",
               str(TARGETS / "wrapped.c"), "-o", str(out)]
        if arch == "ia32":
            cmd.insert(1, "-m32")
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def wrapper_profile(exe: Path) -> Profile:
    """linux-libc plus the target's wrapper functions (role "wrapper", by export)."""
    text = LIBC.read_text()
    for name in WRAPPERS:
        text += (f'\n[[hook]]\nname = "{name}"\nheap = "libc"\nrole = "wrapper"\n'
                 f'module = "{exe.name}"\nexport = "{name}"\nnargs = 1\n')
    return parse_profile(text, "test-wrappers")


class Symbols:
    """Function ranges of the target at run time: nm's values plus the load bias (the target
    prints the address of main)."""

    def __init__(self, exe: Path, main_at: int) -> None:
        out = subprocess.run(["nm", "-S", str(exe)], check=True, capture_output=True,
                             text=True).stdout
        self.ranges: dict[str, tuple[int, int]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in "Tt":
                self.ranges[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
        self.bias = main_at - self.ranges["main"][0]

    def name(self, addr: int) -> str:
        for name, (start, size) in self.ranges.items():
            if start + self.bias <= addr < start + self.bias + size:
                return name
        return "?"


def run(m: Monitored, *cmds: str) -> np.ndarray:
    for c in cmds:
        m.say(c)
        m.read_until()
    m.agent.flush()
    return m.records()


@pytest.mark.parametrize("arch", ARCHES)
def test_callers_through_wrappers(bin_dir: Path, arch: str) -> None:
    """A block allocated through a wrapper is attributed to the wrapper's caller, flagged
    VIA_WRAPPER; nested wrappers: the outermost's caller; direct calls unchanged, unflagged."""
    exe = target(bin_dir, arch)
    with Monitored([str(exe)], wrapper_profile(exe)) as m:
        syms = Symbols(exe, int(m.ready[1], 16))
        hooks = {e.name: e for e in m.hook_events() if e.name in WRAPPERS}
        assert all(e.ok for e in hooks.values()), hooks
        r = run(m, "direct 5", "wrapped 5", "outer 5", "wcalloc 5", "release")
    allocs = r[(r["kind"] == Kind.ALLOC) & (r["size"] == 100)]
    got = [(syms.name(int(x["caller"])), bool(x["flags"] & FLAG_VIA_WRAPPER)) for x in allocs]
    assert got == ([("direct_alloc", False)] * 5 + [("via_wrapper", True)] * 5
                   + [("via_outer", True)] * 5 + [("via_wrapper_calloc", True)] * 5)
    frees = r[r["kind"] == Kind.FREE]
    ours = [syms.name(int(c)) for c in frees["caller"]]
    assert ours.count("release_all") == 20  # through my_wrapper_free
    assert not (frees["flags"]).any()  # FREE records carry no flags


@pytest.mark.parametrize("arch", ARCHES)
def test_without_wrappers_or_sampling_records_are_plain(bin_dir: Path, arch: str) -> None:
    """The plain profile, sampling off: the caller is inside the wrapper, no flags, no stacks
    (what a profile without wrappers always gave)."""
    exe = target(bin_dir, arch)
    with Monitored([str(exe)], "linux-libc", AgentConfig(sample_bytes=0)) as m:
        syms = Symbols(exe, int(m.ready[1], 16))
        r = run(m, "wrapped 5", "bytes 2000 5000")
    allocs = r[(r["kind"] == Kind.ALLOC) & (r["size"] == 100)]
    assert [syms.name(int(c)) for c in allocs["caller"]] == ["my_wrapper"] * 5
    assert not (r["kind"] == Kind.STACK).any()
    assert not r["flags"].any()


def cxx_target(bin_dir: Path, arch: str) -> Path:
    out = bin_dir / f"cxx_new-{arch}"
    if not out.exists():
        cmd = ["g++", "-O0", "-g", "-fno-omit-frame-pointer", str(TARGETS / "cxx_new.cc"),
               "-o", str(out)]
        if arch == "ia32":
            cmd.insert(1, "-m32")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"g++ not usable: {e}")
        if r.returncode != 0:
            pytest.skip(f"g++ {'-m32 ' if arch == 'ia32' else ''}cannot build (install g++"
                        f"{'-multilib' if arch == 'ia32' else ''}): {r.stderr[-200:]}")
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_operator_new_is_a_wrapper_and_exceptions_pass(bin_dir: Path, arch: str) -> None:
    """linux-libc as shipped: libstdc++'s operator new is a wrapper, so new char[100] in
    new_blocks is attributed to new_blocks (through new[] -> new -> malloc); a bad_alloc thrown
    by operator new unwinds through our wrapper's frame and is caught (without the unwind info
    the agent registers, the program ends in std::terminate)."""
    exe = cxx_target(bin_dir, arch)
    with Monitored([str(exe)], "linux-libc") as m:
        syms = Symbols(exe, int(m.ready[1], 16))
        assert m.agent.init_result["unwind_info"] == "registered"
        size_t = "unsigned long" if arch == "x64" else "unsigned int"
        news = [e for e in m.hook_events() if e.name == f"operator new({size_t})"]
        assert news and news[-1].ok, news
        m.say("throw")
        assert m.readline() == "caught 1"
        m.read_until()
        r = run(m, "new 5", "throw")
        assert m.proc.poll() is None
    allocs = r[(r["kind"] == Kind.ALLOC) & (r["size"] == 100)]
    got = [(syms.name(int(x["caller"])), int(x["flags"])) for x in allocs]
    # the exception object (ia32: about 100 bytes too) is allocated inside operator new:
    # attributed to the code that called it
    assert [g for g in got if g[0] != "_Z15throw_bad_allocv"] \
        == [("new_blocks", FLAG_VIA_WRAPPER)] * 5


def stacks(r: np.ndarray) -> list[tuple[np.void, list[int]]]:
    """(sampled record, its frames): each FLAG_SAMPLED call with the STACK chunks its thread
    published just before it (contract in nvse_monitor/stream/events.py)."""
    out = []
    pending: dict[int, list[np.void]] = {}
    for x in r:
        tid = int(x["tid"])
        if x["kind"] == Kind.STACK:
            pending.setdefault(tid, []).append(x)
            continue
        chunks = pending.pop(tid, [])
        if x["flags"] & FLAG_SAMPLED:
            assert chunks, "a sampled call without its stack"
            n = int(chunks[0]["flags"])
            assert [int(c["hook"]) for c in chunks] == list(range(len(chunks)))
            assert len(chunks) == math.ceil(n / 4) and all(int(c["flags"]) == n for c in chunks)
            frames = [int(c[f]) for c in chunks for f in ("ptr", "old_ptr", "size", "caller")]
            out.append((x, frames[:n]))
        else:
            assert not chunks, "stack chunks followed by an unsampled record"
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_sampled_stack_of_a_call_chain(bin_dir: Path, arch: str) -> None:
    """chain -> f1 -> f2 -> f3 -> malloc (frame pointers kept): a sampled call's stack is
    f3, f2, f1, chain, main in that order; frame 0 is the call's own return address."""
    exe = target(bin_dir, arch)
    with Monitored([str(exe)], "linux-libc", AgentConfig(sample_bytes=4096)) as m:
        syms = Symbols(exe, int(m.ready[1], 16))
        r = run(m, "chain 300 4096")
    sampled = [(x, f) for x, f in stacks(r) if x["kind"] == Kind.ALLOC and x["size"] == 4096]
    # P(sampled) = 1 - e^-1 per call: 190 of 300 expected
    assert 120 <= len(sampled) <= 260, len(sampled)
    for x, frames in sampled:
        assert frames[0] == int(x["caller"])
        assert [syms.name(a) for a in frames[:5]] == ["f3", "f2", "f1", "chain", "main"]
        assert 5 <= len(frames) <= 16


@pytest.mark.parametrize("arch", ARCHES)
def test_sampled_calls_follow_the_byte_rate(bin_dir: Path, arch: str) -> None:
    """Poisson sampling by bytes: on 200 MB of 1000-byte calls with a mean of 64 KiB between
    samples, the number of sampled calls is total / (mean + 500) (the re-armed countdown starts
    at the next call: half a call's bytes on average), within 5 standard deviations (sqrt of
    the count, ~1.8 %)."""
    exe = target(bin_dir, arch)
    mean, n, size = 64 << 10, 200_000, 1000
    with Monitored([str(exe)], "linux-libc", AgentConfig(sample_bytes=mean)) as m:
        r = run(m, f"bytes {n} {size}")
    calls = r[(r["kind"] == Kind.ALLOC) & (r["size"] == size)]
    assert len(calls) == n
    got = int(np.count_nonzero(calls["flags"] & FLAG_SAMPLED))
    want = n * size / (mean + size / 2)
    assert abs(got - want) <= 5 * math.sqrt(want), (got, want)
    assert len(stacks(r)) >= got


@pytest.mark.parametrize("arch", ARCHES)
def test_sampling_and_wrapper_code_references_stay_in_module(bin_dir: Path, arch: str) -> None:
    """The code compiled in with wrappers and sampling (the random source's 64-bit constants,
    the stack walk) refers to nothing outside the CModule and our allocations (see
    test_agent.py::test_code_references_stay_in_module)."""
    exe = target(bin_dir, arch)
    with Monitored([str(exe)], wrapper_profile(exe), AgentConfig(sample_bytes=4096)) as m:
        refs = m.agent.script.exports_sync.foreign_code_refs()
        run(m, "chain 50 4096")
    assert refs["instructions"] > 1000
    assert refs["foreign"] == []
