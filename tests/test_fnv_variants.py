"""The FNV profile's switchable parts, live on the fake game through the CLI (`spawn --profile`):
the scrap heap turned off (fnv-1.4.0.525-noscrap), the off-by-default kernel32 hooks turned on
(fnv-1.4.0.525-win32: HeapAlloc/HeapReAlloc/HeapFree, VirtualAlloc/VirtualFree, stdcall), and
the `msvcr*.dll` glob reaching msvcrt.dll, with per-plugin attribution (docs/fnv.md).

The test profiles are generated from the bundled variants like tests/profiles/fake-fnv.toml is
from the base (tests/fnv/fakeprofile.py): same hooks, ABIs and argument positions; the module
names map to the fake DLLs (kernel32.dll -> libfake_kernel32.so, a stdcall fake that aborts the
game on a wrong argument or a moved stack pointer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_harness import m32_problem
from conftest import calls_of
from fnv import fakeprofile
from fnv.build import FakeInstall, GroundTruth, build_fake_install, parse_truth

from nvse_monitor.capture.hookprofile import Profile, load_profile
from nvse_monitor.stream.messages import Batch, HookEvent
from nvse_monitor.stream.recording import Recording

pytestmark = [pytest.mark.frida, pytest.mark.m32]

FNV = "fnv-1.4.0.525"
TIMEOUT_S = 120
# frees the game makes after it printed its ground truth (the blocks it kept)
AFTER_TRUTH = ("MemoryManager::Free", "crt!free")


def fake_variant(variant: str, dest: Path) -> Path:
    """tests/profiles/fake-fnv.toml's counterpart for the bundled `fnv-1.4.0.525-<variant>`."""
    real = load_profile(f"{FNV}-{variant}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fakeprofile.MODULES, "kernel32.dll", "libfake_kernel32.so")
        text = fakeprofile.fake_profile_toml(real)
    text = text.replace('name = "fake-fnv"\n', f'name = "fake-fnv-{variant}"\n', 1)
    assert f'"fake-fnv-{variant}"' in text
    path = dest / f"fake-fnv-{variant}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> FakeInstall:
    if why := m32_problem():
        pytest.skip(why)
    inst = build_fake_install(tmp_path_factory.mktemp("fnv-variants-install"))
    for name in ("c", "k32"):  # more plugins: copies of plugin B under their own names
        shutil.copy2(inst.plugins_dir / "libfnvplugin_b.so",
                     inst.plugins_dir / f"libfnvplugin_{name}.so")
    return inst


@dataclass
class Run:
    p: subprocess.CompletedProcess[str]
    gt: GroundTruth
    profile: Profile
    per_hook: dict[str, tuple[int, int]]  # hook name -> (records, bytes), from the recording
    hooks: list[str]  # the recording's hook names
    details: dict[str, list[str]]  # hook name -> the details of its hook messages
    json: dict[str, Any]

    def compared(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(recorded, ground truth) for every hook the game counted and the profile hooks."""
        names = {h.name for h in self.profile.hooks if h.role != "size"} - set(AFTER_TRUTH)
        want = {n: v for n, v in self.gt.hooks.items() if n in names}
        return {n: self.per_hook.get(n) for n in want}, want


def spawn_run(install: FakeInstall, profile_path: Path, out: Path, plugin_args: list[str]) -> Run:
    rec = out / "run.nvmrec"
    env = dict(os.environ, FAKE_GAME_THREADS="3", FAKE_GAME_ITERS="100", FAKE_GAME_AUTORUN="1")
    p = subprocess.run(
        [sys.executable, "-m", "nvse_monitor", "spawn", "--profile", str(profile_path),
         "--out", str(out), "--record", str(rec), "--", str(install.game),
         str(install.crt_dir), *plugin_args],
        cwd=install.root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-1500:]
    gt = parse_truth([ln.split() for ln in p.stdout.splitlines()])
    assert gt.hooks, p.stdout[-500:]
    with Recording(rec) as r:
        names = [h.name for h in r.meta.hooks]
        got: dict[str, tuple[int, int]] = {}
        details: dict[str, list[str]] = {}
        for msg in r:
            if isinstance(msg, HookEvent):
                details.setdefault(msg.name, []).append(msg.detail)
            if not isinstance(msg, Batch):
                continue
            recs = calls_of(msg.records)
            for hook, size in zip(recs["hook"].tolist(), recs["size"].tolist(), strict=True):
                c, b = got.get(names[hook], (0, 0))
                got[names[hook]] = (c + 1, b + size)
    doc = json.loads(next(out.glob("*_stats.json")).read_text())
    return Run(p, gt, load_profile(profile_path), got, names, details, doc)


# ---------------------------------------------------------------- kernel32 turned on


@pytest.fixture(scope="module")
def win32(install: FakeInstall, tmp_path_factory: pytest.TempPathFactory) -> Run:
    d = tmp_path_factory.mktemp("fnv-win32")
    plug, crt = install.plugins_dir, install.crt_dir
    args = [*install.plugin_args(),
            str(plug / "libfnvplugin_c.so"), "msvcr", str(crt / "libfake_msvcrt.so"),
            str(plug / "libfnvplugin_k32.so"), "kernel32", str(crt / "libfake_kernel32.so")]
    return spawn_run(install, fake_variant("win32", d), d, args)


def test_win32_kernel32_calls_recorded_exactly(win32: Run) -> None:
    """Every HeapAlloc / HeapReAlloc / HeapFree / VirtualAlloc / VirtualFree call of the plugin,
    through stdcall hooks (the fake aborts on a shifted argument or a moved stack pointer), and
    every other hook of the base profile, exactly."""
    got, want = win32.compared()
    k32 = {n for n in want if n.startswith("kernel32!")}
    assert k32 == {"kernel32!HeapAlloc", "kernel32!HeapReAlloc", "kernel32!HeapFree",
                   "kernel32!VirtualAlloc", "kernel32!VirtualFree"}
    assert got == want


def test_win32_heaps_and_attribution(win32: Run) -> None:
    """The plugin's HeapAlloc blocks it kept: heap win32-heap, attributed to that plugin; its
    VirtualAlloc regions all released; the CRT DLL heap holds the other plugins' blocks."""
    mon = win32.json["monitor"]
    k32_live = win32.gt.modules["libfnvplugin_k32.so"]
    assert k32_live > 0
    assert mon["heaps"]["win32-heap"]["current_bytes"] == k32_live
    assert mon["heaps"]["virtual"] == {"current_bytes": 0, "peak_bytes": 4 << 16}
    assert mon["heaps"]["dll-crt"]["current_bytes"] == win32.gt.heaps["dll-crt"] - k32_live
    mods = mon["modules_live_bytes"]
    for plugin in ("libfnvplugin_b.so", "libfnvplugin_c.so", "libfnvplugin_k32.so"):
        assert mods.get(plugin) == win32.gt.modules[plugin], plugin


def test_msvcr_glob_reaches_msvcrt(win32: Run) -> None:
    """`msvcr*.dll` (here libfake_msvcr*.so) also hooks msvcrt, loaded after attach: one hook
    message per module, and plugin C's calls recorded under the same hooks as plugin B's
    (msvcr100) and the game's (msvcr120)."""
    details = win32.details["msvcr!malloc"]
    for mod in ("libfake_msvcr120.so", "libfake_msvcr100.so", "libfake_msvcrt.so"):
        assert any(mod in d for d in details), details
    got, want = win32.compared()
    assert want["msvcr!malloc"][0] == 10 + 20 + 20  # the game, plugin B, plugin C
    assert got["msvcr!malloc"] == want["msvcr!malloc"]


# ---------------------------------------------------------------- the scrap heap turned off


@pytest.fixture(scope="module")
def noscrap(install: FakeInstall, tmp_path_factory: pytest.TempPathFactory) -> Run:
    d = tmp_path_factory.mktemp("fnv-noscrap")
    return spawn_run(install, fake_variant("noscrap", d), d, install.plugin_args())


def test_noscrap_records_no_scrap_heap_and_the_rest_exactly(noscrap: Run) -> None:
    assert noscrap.gt.hooks["ScrapHeap::Allocate"][0] > 0  # the game did use its scrap heaps
    assert not [n for n in noscrap.hooks if n.startswith("ScrapHeap::")]
    assert "scrap" not in noscrap.json["monitor"]["heaps"]
    got, want = noscrap.compared()
    assert "ScrapHeap::Allocate" not in want and want["MemoryManager::Allocate"][0] > 100
    assert got == want
