"""The FNV profile on a fake game: real Frida sessions against a -m32 Linux FalloutNV.exe whose
allocator entry points sit at the real game's addresses (thiscall, absolute-address hooks), with
plugins that allocate through fake CRT DLLs loaded after attach (tests/fnv/, docs/fnv.md).

The monitor's records, JSON and per-module figures must equal the fake game's own ground truth
exactly. A test that needs an agent feature not there yet is xfail(strict=False) with the
feature named in the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_harness import Monitored, m32_problem
from conftest import calls_of
from fnv.build import FakeInstall, GroundTruth, build_fake_install, parse_truth

from nvse_monitor.capture import fnv
from nvse_monitor.capture.agent_host import AgentConfig, load_agent
from nvse_monitor.capture.hookprofile import Profile, load_profile
from nvse_monitor.outputs.pipeline import Pipeline
from nvse_monitor.stream.events import FLAG_VIA_WRAPPER, Kind
from nvse_monitor.stream.messages import Batch, HookEvent, ModuleEvent, SessionMeta

pytestmark = [pytest.mark.frida, pytest.mark.m32]

FAKE_PROFILE = Path(__file__).parent / "profiles" / "fake-fnv.toml"

@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> FakeInstall:
    if why := m32_problem():
        pytest.skip(why)
    return build_fake_install(tmp_path_factory.mktemp("fnv-install"))


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(FAKE_PROFILE)


@dataclass
class Run:
    gt: GroundTruth
    records: np.ndarray
    messages: list[Any]
    meta: SessionMeta
    rc: int | None
    out_lines: list[list[str]]

    def per_hook(self, profile: Profile) -> dict[str, tuple[int, int]]:
        """hook name -> (calls, bytes) as the agent saw them (FAILED records excluded)."""
        names = [h.name for h in profile.hooks]
        out: dict[str, tuple[int, int]] = {}
        for r in calls_of(self.records):
            n = names[r["hook"]]
            c, b = out.get(n, (0, 0))
            out[n] = (c + 1, b + int(r["size"]))
        return out

    def hook_details(self) -> dict[str, list[str]]:
        d: dict[str, list[str]] = {}
        for m in self.messages:
            if isinstance(m, HookEvent):
                d.setdefault(m.name, []).append(m.detail)
        return d


def _env(**kw: str) -> dict[str, str]:
    env = dict(os.environ, FAKE_GAME_THREADS="4", FAKE_GAME_ITERS="300")
    env.update(kw)
    return env


def attach_run(install: FakeInstall, profile: Profile, **env: str) -> Run:
    old = dict(os.environ)
    os.environ.update(_env(**env))  # Monitored starts the target with our environment
    try:
        mon = Monitored(install.game_argv(), profile)
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        meta = mon.agent.session_meta(target=str(install.game), mode="attach")
        mon.say("go")
        lines = mon.read_until("done")
        mon.stop()
        rc = mon.close()
        with mon._lock:
            msgs = list(mon.messages)
        return Run(parse_truth(lines), mon.records(), msgs, meta, rc, lines)
    finally:
        if mon.proc.poll() is None:
            mon.proc.kill()
            mon.proc.wait()


@pytest.fixture(scope="module")
def run(install: FakeInstall, profile: Profile) -> Run:
    return attach_run(install, profile)


def _fixed(profile: Profile, table: dict[str, Any]) -> dict[str, Any]:
    """Only the hooks at absolute addresses (game heap, scrap heap, static CRT)."""
    fixed = {h.name for h in profile.hooks if h.address is not None}
    return {k: v for k, v in table.items() if k in fixed}


def _dll(profile: Profile, table: dict[str, Any]) -> dict[str, Any]:
    """Only the CRT DLL hooks (modules loaded after attach, one of them by a glob)."""
    dll = {h.name for h in profile.hooks if h.address is None}
    return {k: v for k, v in table.items() if k in dll}


# ---------------------------------------------------------------- attach: exact records


def test_entry_points_at_fnv_addresses_hooked(run: Run, profile: Profile) -> None:
    ok = {m.name for m in run.messages if isinstance(m, HookEvent) and m.ok}
    for h in profile.hooks:
        if h.address is not None and h.role != "size":
            assert h.name in ok, f"{h.name} at {h.address:#x} not hooked: {run.hook_details()}"


def test_records_equal_ground_truth(run: Run, profile: Profile) -> None:
    """Game heap (thiscall), scrap heap (thiscall, 2 arguments), static CRT (cdecl), called from
    four threads and from a plugin by absolute address: every call recorded once, with its size.
    The fake game aborts on a wrong `this` or a bad result, so it also checks the stack."""
    want = _fixed(profile, run.gt.hooks)
    assert want["MemoryManager::Allocate"][0] > 1000  # the workload ran
    assert want["crt!_recalloc"][0] > 0 and want["crt!_recalloc2"][0] > 0  # (ptr, count, size)
    assert _fixed(profile, run.per_hook(profile)) == want
    assert run.out_lines[-1][:2] == ["gt", "game_calls"]


def test_nested_call_recorded_once(run: Run, profile: Profile) -> None:
    """MemoryManager::Reallocate2 calls Reallocate: one record, under the outer entry."""
    got = run.per_hook(profile)
    assert got["MemoryManager::Reallocate"] == run.gt.hooks["MemoryManager::Reallocate"]
    assert got["MemoryManager::Reallocate2"] == run.gt.hooks["MemoryManager::Reallocate2"]


def test_game_survives_the_monitor_leaving(run: Run) -> None:
    assert run.rc == 0, "the game must run on unharmed after the monitor left"


def test_late_module_hooks_exact(run: Run, profile: Profile) -> None:
    """Plugin A's fake ucrtbase is loaded after attach and called right away."""
    got = {k: v for k, v in _dll(profile, run.per_hook(profile)).items() if "ucrtbase" in k}
    want = {k: v for k, v in _dll(profile, run.gt.hooks).items() if "ucrtbase" in k}
    assert want["ucrtbase!_recalloc"][0] > 0  # (ptr, count, size), cdecl
    assert got == want


def test_glob_hooks_every_matching_module(run: Run, profile: Profile) -> None:
    """libfake_msvcr*.so matches msvcr120 (the game's) and msvcr100 (plugin B's): both hooked,
    one instance each, records under the same hook index; one hook message per module."""
    assert _dll(profile, run.per_hook(profile)) == _dll(profile, run.gt.hooks)
    details = run.hook_details()["msvcr!malloc"]
    for mod in ("libfake_msvcr120.so", "libfake_msvcr100.so"):
        assert any(mod in d for d in details), details


# ---------------------------------------------------------------- the JSON and per-module figures


@dataclass
class Stats:
    json: dict[str, Any]
    live: dict[tuple[str, str], int]  # (module, heap) -> live bytes, from the engine


@pytest.fixture(scope="module")
def stats(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Stats:
    out = tmp_path_factory.mktemp("fnv-out")
    pipe = Pipeline(run.meta, out_dir=out, prefix="fnv")
    pipe.feed_all(run.messages)
    engine = pipe.engine
    blocks = engine.live_allocations()
    live: dict[tuple[str, str], int] = {}
    for size, heap, mod in zip(blocks["size"].tolist(), blocks["heap"].tolist(),
                               blocks["module"].tolist(), strict=True):
        key = (engine.modmap.name(mod), engine.heap_names[heap])
        live[key] = live.get(key, 0) + size
    pipe.finish()
    return Stats(json.loads(pipe.paths.json.read_text()), live)


def test_json_heaps_equal_ground_truth(stats: Stats, run: Run) -> None:
    heaps = stats.json["monitor"]["heaps"]
    for heap in ("game", "scrap", "crt"):
        assert heaps[heap]["current_bytes"] == run.gt.heaps[heap], heap
    assert heaps["scrap"]["peak_bytes"] > 0
    assert stats.json["memory_stats"]["allocation_failures"] == 0


def test_attribution_by_caller_module(stats: Stats, run: Run) -> None:
    """Live bytes per (calling module, heap): the game's own blocks under FalloutNV.exe, the
    game-heap blocks plugin A allocated by absolute address under libfnvplugin_a.so."""
    for (mod, heap), want in run.gt.live.items():
        if heap in ("game", "crt"):
            assert stats.live.get((mod, heap), 0) == want, (mod, heap)
    assert run.gt.live[("libfnvplugin_a.so", "game")] > 0


def test_formheap_wrapper_attributes_to_the_plugin(run: Run, profile: Profile) -> None:
    """Plugin A allocates 400 and 401 bytes through the game's FormHeap_Allocate (a wrapper
    hook; it calls MemoryManager::Allocate inside FalloutNV.exe) and frees the second through
    FormHeap_Free: the records carry the plugin's call sites, flagged VIA_WRAPPER."""
    r = run.records
    mods = {m.name: m for m in run.meta.modules}
    for m in run.messages:
        if isinstance(m, ModuleEvent) and m.action == "add":
            mods[m.module.name] = m.module
    plugin = mods["libfnvplugin_a.so"]
    mm = [h.name for h in profile.hooks].index("MemoryManager::Allocate")
    allocs = r[(r["kind"] == Kind.ALLOC) & (r["hook"] == mm)]
    in_plugin = (allocs["caller"] >= plugin.base) & (allocs["caller"] < plugin.base + plugin.size)
    flagged = (allocs["flags"] & FLAG_VIA_WRAPPER) != 0
    via = allocs[flagged]
    assert sorted(via["size"].tolist()) == [400, 401]  # exactly the calls through FormHeap
    assert in_plugin[flagged].all()
    # the plugin's direct MemoryManager calls (300..303) and the game's keep their callers
    assert sorted(allocs[in_plugin & ~flagged]["size"].tolist()) == [300, 301, 302, 303]
    # its FormHeap_Free: the first FREE of that block after it (the address is reused later)
    w2 = via[via["size"] == 401][0]
    at = int(np.flatnonzero((r["kind"] == Kind.ALLOC) & (r["ptr"] == w2["ptr"])
                            & (r["seq"] == w2["seq"]))[0])
    later = r[at + 1:]
    free = later[(later["kind"] == Kind.FREE) & (later["ptr"] == w2["ptr"])][0]
    assert plugin.base <= int(free["caller"]) < plugin.base + plugin.size


def test_plugin_crt_attribution(stats: Stats, run: Run) -> None:
    for (mod, heap), want in run.gt.live.items():
        assert stats.live.get((mod, heap), 0) == want, (mod, heap)
    mods = stats.json["monitor"]["modules_live_bytes"]
    assert {m: mods.get(m, 0) for m in run.gt.modules} == run.gt.modules
    assert stats.json["memory_stats"]["current_bytes_allocated"] == sum(run.gt.heaps.values())


def test_banner_from_module_map(run: Run) -> None:
    mods = list(run.meta.modules) + [m.module for m in run.messages
                                     if isinstance(m, ModuleEvent) and m.action == "add"]
    b = fnv.banner(mods, Path(run.meta.target).name)
    assert b.game == "FalloutNV.exe"
    assert b.plugins == ("libfnvplugin_a.so", "libfnvplugin_b.so")
    assert b.nvse is None
    assert "Plugins loaded: 2: libfnvplugin_a.so, libfnvplugin_b.so" in b.lines()


def test_default_out_dir_is_plugins_folder(install: FakeInstall, tmp_path: Path) -> None:
    assert fnv.default_out_dir(install.game, tmp_path) == install.plugins_dir


# ---------------------------------------------------------------- a heap replacer in the process


def _merge_reallocs(table: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Both reallocate entries as one: a replacer that sends both to one function makes Gum hook
    that function once (Gum follows a JMP at the entry to its destination)."""
    out = dict(table)
    a, b = out.pop("MemoryManager::Reallocate", (0, 0)), out.pop("MemoryManager::Reallocate2",
                                                                  (0, 0))
    out["MemoryManager::Reallocate*"] = (a[0] + b[0], a[1] + b[1])
    return out


def test_replacer_patched_before_attach(install: FakeInstall, profile: Profile) -> None:
    """NVHR patched the entry points before the monitor came: the game stays correct and every
    call is still seen (the hook lands on the JMP's destination, NVHR's function)."""
    r = attach_run(install, profile, FAKE_REPLACER="early")
    assert r.out_lines[-1][:2] == ["gt", "game_calls"]
    assert _merge_reallocs(_fixed(profile, r.per_hook(profile))) == \
        _merge_reallocs(_fixed(profile, r.gt.hooks))


def test_replacer_jump_named_in_hook_detail(install: FakeInstall, profile: Profile) -> None:
    r = attach_run(install, profile, FAKE_REPLACER="early", FAKE_GAME_ITERS="20")
    details = r.hook_details()["MemoryManager::Allocate"]
    assert any("follows JMP into libfake_nvhr.so" in d for d in details), details
    # the replacer sends both reallocate entries to one function: hooked once
    details = r.hook_details()["MemoryManager::Reallocate2"]
    assert any("same code as hook MemoryManager::Reallocate" in d for d in details), details


@pytest.fixture(scope="module")
def late_replacer(install: FakeInstall, profile: Profile) -> Run:
    return attach_run(install, profile, FAKE_REPLACER="late", FAKE_GAME_ITERS="50")


def test_replacer_patching_after_attach_left_alone(late_replacer: Run) -> None:
    """NVHR patches the hooked entry points after attach: the agent notices (a hook message
    naming the replacer), does not revert over the replacer's JMP at stop, and the host keeps
    the script loaded instead of letting Gum restore the prologue: the game frees its replacer
    blocks through the replacer after the monitor left and exits cleanly."""
    r = late_replacer
    assert r.rc == 0, "the game crashed after the monitor left (a hook reverted over NVHR)"
    details = r.hook_details()["MemoryManager::Free"]
    assert any("patched by libfake_nvhr.so after attach; left alone" in d for d in details), \
        details


def test_replacer_patching_after_attach_recorded(late_replacer: Run, profile: Profile) -> None:
    """The game's threads start right after NVHR patched the entries: every call is recorded,
    so the patch was found and followed on the patching thread (the patch watch on mprotect),
    before the game went on, not by the once-a-second check."""
    r = late_replacer
    assert _merge_reallocs(_fixed(profile, r.per_hook(profile))) == \
        _merge_reallocs(_fixed(profile, r.gt.hooks)), r.hook_details()
    details = r.hook_details()["MemoryManager::Allocate"]
    assert any("calls followed into libfake_nvhr.so" in d for d in details), details


# ---------------------------------------------------------------- through the fake loader


@pytest.fixture(scope="module")
def spawned(install: FakeInstall, profile: Profile) -> Run:
    """nvse_loader's way: the loader starts the game as a suspended child; with child gating the
    monitor attaches to it and installs the hooks before the game's first allocation."""
    import frida

    plan = fnv.plan_launch(install.root, install.game_argv()[1:], env=_env(FAKE_GAME_AUTORUN="1"))
    assert plan.mode == "loader" and plan.child_name == "FalloutNV.exe"
    dev = frida.get_local_device()
    children: queue.Queue = queue.Queue()
    out: list[bytes] = []
    on_child = lambda c: children.put(c)  # noqa: E731
    on_output = lambda _pid, _fd, data: out.append(data)  # noqa: E731
    dev.on("child-added", on_child)
    dev.on("output", on_output)
    msgs: list[Any] = []
    pids: list[int] = []
    handle = None
    try:
        pid = dev.spawn(list(plan.argv), cwd=str(plan.cwd), env=plan.env, stdio="pipe")
        pids.append(pid)
        dev.attach(pid).enable_child_gating()
        dev.resume(pid)
        while handle is None:
            child = children.get(timeout=20)
            pids.append(child.pid)
            session = dev.attach(child.pid)
            if child.origin == "fork":  # Linux: fork, then exec of the game
                session.enable_child_gating()
            elif Path(child.path or "").name == plan.child_name:
                handle = load_agent(session, profile, AgentConfig(), msgs.append)
                meta = handle.session_meta(target=str(install.game), mode="spawn")
            dev.resume(child.pid)
        deadline = time.monotonic() + 60
        while b"done\n" not in b"".join(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        handle.stop()
        text = b"".join(out).decode()
    finally:
        dev.off("child-added", on_child)
        dev.off("output", on_output)
        for p in pids:
            with contextlib.suppress(frida.ProcessNotFoundError, frida.InvalidOperationError,
                                     frida.NotSupportedError):
                dev.kill(p)
    assert "done\n" in text, text[-500:]
    lines = [ln.split() for ln in text.splitlines()]
    recs = np.concatenate([m.records for m in msgs if isinstance(m, Batch)])
    return Run(parse_truth(lines), recs, msgs, meta, None, lines)


def test_spawn_through_loader_from_first_allocation(spawned: Run, profile: Profile) -> None:
    """Every call of the worker threads (which start right after the game's first
    instructions) is recorded: the hooks were in before the game ran."""
    worker_only = [h.name for h in profile.hooks
                   if h.heap in ("scrap", "crt") or h.name.startswith("MemoryManager::Realloc")]
    got = spawned.per_hook(profile)
    want = spawned.gt.hooks
    assert want["crt!malloc"][0] > 0
    assert {n: got.get(n) for n in worker_only if n in want} == \
        {n: want[n] for n in worker_only if n in want}


def test_spawn_records_main_thread(spawned: Run, profile: Profile) -> None:
    assert _fixed(profile, spawned.per_hook(profile)) == _fixed(profile, spawned.gt.hooks)


def test_fake_loader_alone_resumes_the_game(install: FakeInstall) -> None:
    """Without a monitor the loader starts the game suspended and lets it go."""
    p = subprocess.run([str(install.loader), *install.game_argv()[1:]], cwd=install.root,
                       env=_env(FAKE_GAME_AUTORUN="1", FAKE_LOADER_WAIT="1", FAKE_GAME_ITERS="20"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("loader child ")
    assert p.stdout.rstrip().endswith("bye")


# ---------------------------------------------------------------- the CLI on the fake game


@dataclass
class CliRun:
    rc: int
    gt: GroundTruth
    json: dict[str, Any]
    stderr: str


def _cli_spawn(install: FakeInstall, out: Path, **env: str) -> CliRun:
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "nvse_monitor", "spawn", "--profile", str(FAKE_PROFILE),
         "--out", str(out), "--", *install.game_argv()],
        cwd=install.root, env=_env(FAKE_GAME_AUTORUN="1", **env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120)
    gt = parse_truth([ln.split() for ln in p.stdout.splitlines()])
    files = list(out.glob("*_stats.json"))
    assert files, f"no JSON written (rc={p.returncode}): {p.stderr[-800:]}"
    return CliRun(p.returncode, gt, json.loads(files[0].read_text()), p.stderr)


@pytest.fixture(scope="module")
def cli_spawn(install: FakeInstall, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """`nvse-monitor spawn --profile tests/profiles/fake-fnv.toml -- ./FalloutNV.exe ...`, run in
    the fake game directory; the output directory is given (the default rule is unit-tested)."""
    return _cli_spawn(install, tmp_path_factory.mktemp("fnv-cli"))


def test_cli_spawn_final_heaps_exact(cli_spawn: CliRun) -> None:
    """The CLI's final JSON is the game's state at exit: after printing its ground truth (taken at
    "done") it frees every block it kept, so the worker heaps end empty, and what stays on the
    game heap is plugin A's blocks (allocated by absolute address, never freed)."""
    assert cli_spawn.rc == 0, cli_spawn.stderr[-800:]
    heaps = cli_spawn.json["monitor"]["heaps"]
    assert cli_spawn.gt.heaps["crt"] > 0
    assert heaps["game"]["current_bytes"] == cli_spawn.gt.live[("libfnvplugin_a.so", "game")]
    for heap in ("scrap", "crt"):
        assert heaps[heap]["current_bytes"] == 0, heap
        assert heaps[heap]["peak_bytes"] >= cli_spawn.gt.heaps[heap], heap
    assert cli_spawn.json["monitor"]["profile"] == "fake-fnv"


def test_cli_spawn_with_replacer_loading_later(install: FakeInstall, tmp_path: Path) -> None:
    """Spawn mode hooks the game before NVHR loads and patches the entry points (the common case
    for players): the patch is followed, so the final heaps are still exact, no free is
    untracked (every block the replacer hands out was seen), and the log says what happened."""
    r = _cli_spawn(install, tmp_path, FAKE_REPLACER="late")
    assert r.rc == 0, r.stderr[-800:]
    heaps = r.json["monitor"]["heaps"]
    assert heaps["game"]["current_bytes"] == r.gt.live[("libfnvplugin_a.so", "game")]
    for heap in ("scrap", "crt"):
        assert heaps[heap]["current_bytes"] == 0, heap
    assert r.json["monitor"]["untracked_frees"] == 0
    log = next(tmp_path.glob("*.log")).read_text()
    assert "patched by libfake_nvhr.so after attach; left alone (not reverted); calls followed " \
        "into libfake_nvhr.so" in log
    assert "Hook not needed: MemoryManager::Size (size query: nothing to record)" in log


# ---------------------------------------------------------------- lossless under load (issue 13)


def test_burst_on_thiscall_heaps_lossless_under_cpu_load(install: FakeInstall,
                                                        profile: Profile) -> None:
    """Eight game threads on the thiscall heaps, the static CRT and the plugins' CRTs at once,
    with a CPU-bound process on each core and a small ring: producers wait for the host, and
    every call is recorded exactly once (per hook: calls and bytes), nothing dropped."""
    from test_transport import cpu_hogs

    old = dict(os.environ)
    os.environ.update(_env(FAKE_GAME_THREADS="8", FAKE_GAME_ITERS="6000"))
    try:
        mon = Monitored(install.game_argv(), profile, config=AgentConfig(ring_slots=4096))
    finally:
        os.environ.clear()
        os.environ.update(old)
    try:
        with cpu_hogs():
            mon.say("go")
            lines = mon.read_until("done")
        final = mon.stop()
        assert mon.close() == 0
        gt = parse_truth(lines)
        got = Run(gt, mon.records(), [], None, 0, lines).per_hook(profile)  # type: ignore[arg-type]
    finally:
        if mon.proc.poll() is None:
            mon.proc.kill()
            mon.proc.wait()
    assert gt.hooks["MemoryManager::Allocate"][0] > 40_000
    assert final.dropped == 0 and final.stalls > 0
    assert got == gt.hooks
