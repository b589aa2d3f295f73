"""The Windows nvse-monitor under Wine against the PE fakes (tests/windows/fakes): spawn, launch
through nvse_loader (child gating), attach by name and by PID, heap replacers patching before
and after attach, the version check, GECK, the default output directory and the address-space
sampler. Every figure is compared exactly with the fakes' own ground truth, per hook and calling
module (recording) and per heap and module (JSON)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from windows.fakes import PeInstall
from windows.winlane import (
    GECK,
    Monitor,
    Truth,
    assert_exact,
    assert_final,
    game_env,
    read_truth,
    run_monitor,
    running_game,
    stats,
    wait_truth,
    winpath,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def spawned(pe: PeInstall, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Truth, Path]:
    """`spawn -- FalloutNV.exe` in the game directory, no --out (the default directory)."""
    work = tmp_path_factory.mktemp("win-spawn")
    for f in pe.plugins_dir.glob("MemoryPoolNVSE_*"):
        f.unlink()
    p = run_monitor(["spawn", "--record", winpath(work / "s.nvmrec"), "--", "FalloutNV.exe"],
                    cwd=pe.root, env=game_env(FAKE_GAME_TRUTH=winpath(work / "truth.txt")))
    assert p.returncode == 0, p.stderr[-2000:]
    return p, wait_truth(work / "truth.txt", 5), work


def test_spawn_counts_exact(spawned: tuple[Any, Truth, Path], pe: PeInstall) -> None:
    p, truth, work = spawned
    assert_exact(truth, work / "s.nvmrec")
    assert ("FalloutNV.exe", "MemoryManager::Allocate") in truth.calls
    assert ("fnvplugin_ucrt.dll", "ucrtbase!_aligned_malloc") in truth.calls
    assert_final(stats(pe.plugins_dir), truth)


def test_optional_export_missing_is_info_not_degraded(spawned: tuple[Any, Truth, Path],
                                                      pe: PeInstall) -> None:
    """Wine's msvcrt.dll has no _recalloc: the optional hook is "not present", the session
    never degrades for it (it degraded from the first second before)."""
    p, _, _ = spawned
    log = (pe.plugins_dir / "MemoryPoolNVSE_rpmalloc.log").read_text()
    assert "[INFO]" in log and "Hook not present: msvcr!_recalloc (export _recalloc not found " \
        "in msvcrt.dll)" in log
    assert "-> DEGRADED (hook" not in log and "Hook failed" not in log
    assert "(1 optional not present)" in p.stderr
    assert stats(pe.plugins_dir)["hooks_failed"] == []


def test_spawn_gets_steam_ids_and_game_dir(spawned: tuple[Any, Truth, Path],
                                          pe: PeInstall) -> None:
    _, truth, _ = spawned
    assert truth.env == {"SteamAppID": "22380", "SteamGameId": "22380"}
    assert truth.cwd.rstrip("\\").lower() == winpath(pe.root).lower()


def test_default_out_dir_is_data_nvse_plugins(spawned: tuple[Any, Truth, Path],
                                              pe: PeInstall) -> None:
    p, _, _ = spawned
    assert f"files in {winpath(pe.plugins_dir)}" in p.stderr
    for kind in ("stats.json", "rpmalloc.log", "performance.csv", "status.txt", "leaks.csv"):
        assert (pe.plugins_dir / f"MemoryPoolNVSE_{kind}").is_file(), kind
    log = (pe.plugins_dir / "MemoryPoolNVSE_rpmalloc.log").read_text()
    for name in ("fnvplugin_msvcrt.dll", "fnvplugin_late.dll", "fnvplugin_formheap.dll"):
        assert f"[INFO] [TID:{truth_pid(p.stderr)}] Plugin loaded: {name}" in log, name


def truth_pid(stderr: str) -> int:
    m = re.search(r"monitoring \S+ \(PID (\d+)", stderr)
    assert m, stderr[-1500:]
    return int(m.group(1))


def test_launch_through_loader_follows_the_child(pe: PeInstall, tmp_path: Path) -> None:
    """`launch GAME_DIR` from elsewhere: nvse_loader.exe starts the game suspended, injects
    nvse_steam_loader.dll, resumes it and exits; the monitor follows the child (child gating)
    from its first allocation."""
    (pe.root / "loader_child.txt").unlink(missing_ok=True)
    out = tmp_path / "out"
    p = run_monitor(["launch", winpath(pe.root), "--out", winpath(out), "--record",
                     winpath(tmp_path / "l.nvmrec")], cwd=tmp_path,
                    env=game_env(FAKE_GAME_TRUTH=winpath(tmp_path / "truth.txt")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "nvse_loader.exe" in p.stderr
    truth = wait_truth(tmp_path / "truth.txt", 5)
    child = int((pe.root / "loader_child.txt").read_text().split()[-1])
    assert truth_pid(p.stderr) == child == truth.pid
    assert truth.injected, "nvse_steam_loader.dll was not injected"
    assert truth.env == {"SteamAppID": "22380", "SteamGameId": "22380"}
    assert_exact(truth, tmp_path / "l.nvmrec")
    assert_final(stats(out), truth)


def _attach(pe: PeInstall, work: Path, target: str | None, replacer: str | None = None,
            exe: Path | None = None) -> tuple[Monitor, Truth, int]:
    env = {"FAKE_REPLACER": replacer} if replacer else {}
    out = work / "out"
    with running_game(exe or pe.game, work, **env) as (game, pid):
        mon = Monitor(["attach", target or str(pid), "--out", winpath(out), "--record",
                       winpath(work / "a.nvmrec")], cwd=work)
        try:
            mon.wait_for("monitoring ")
            (work / "go").touch()
            truth = wait_truth(work / "truth.txt")
            time.sleep(2.5)  # a drain and an address-space sample after the last call
            mon.ctrl_c()
            rc = mon.wait()
        finally:
            mon.close()
        (work / "hold").touch()
        game_rc = game.wait(timeout=120)
    assert rc == 0, mon.stderr[-2000:]
    assert "session ended: interrupted" in mon.stderr, mon.stderr[-1500:]
    return mon, truth, game_rc


@pytest.mark.parametrize("by", ["name", "pid"])
def test_attach_exact(pe: PeInstall, tmp_path: Path, by: str) -> None:
    mon, truth, game_rc = _attach(pe, tmp_path, "FalloutNV.exe" if by == "name" else None)
    assert game_rc == 0, read_truth(tmp_path / "truth.txt").error
    assert truth_pid(mon.stderr) == truth.pid
    assert "Plugins loaded: 2" in mon.stderr  # the early ones, loaded before the attach
    assert_exact(truth, tmp_path / "a.nvmrec")
    assert_final(stats(tmp_path / "out"), truth)


def test_address_space_agrees_with_the_games_own_walk(pe: PeInstall, tmp_path: Path) -> None:
    """The sampler's last sample (JSON) and the game's VirtualQuery walk, taken while the game
    holds still, agree within 8 MiB (what Frida's own threads map in between: ~0.2 MiB seen)."""
    mon, truth, _ = _attach(pe, tmp_path, "FalloutNV.exe")
    a = stats(tmp_path / "out")["address_space"]
    free_b, largest, committed, reserved = truth.vq
    assert a["samples"] >= 1 and a["limit_bytes"] >= 2047 * MiB
    assert abs(a["largest_free_bytes"] - largest) <= 8 * MiB, (a, truth.vq)
    assert abs(a["free_bytes"] - free_b) <= 8 * MiB, (a, truth.vq)
    assert abs(a["committed_bytes"] - committed) <= 8 * MiB, (a, truth.vq)
    assert abs(a["reserved_bytes"] - reserved) <= 8 * MiB, (a, truth.vq)


@pytest.mark.parametrize("when", ["early", "late"])
def test_replacer_patches_followed_not_overwritten(pe: PeInstall, tmp_path: Path,
                                                  when: str) -> None:
    """nvhr_fake.dll writes JMPs over the MemoryManager entries before the attach (followed at
    install) or after it (followed through the VirtualProtect watch). Every call is still
    counted, and the game exits 0 after the monitor left: a block of the replacer reaching the
    game's own Free (a JMP undone) would make it exit 3."""
    mon, truth, game_rc = _attach(pe, tmp_path, "FalloutNV.exe", replacer=when)
    assert game_rc == 0, read_truth(tmp_path / "truth.txt").error
    # NVHR sends both reallocate entries to one function: recorded under the first hook there
    truth.merge("MemoryManager::Reallocate2", "MemoryManager::Reallocate")
    assert_exact(truth, tmp_path / "a.nvmrec")
    assert_final(stats(tmp_path / "out"), truth)
    log = (tmp_path / "out" / "MemoryPoolNVSE_rpmalloc.log").read_text()
    assert "nvhr_fake.dll" in log
    if when == "late":
        assert "patched by nvhr_fake.dll after attach; left alone" in log


@pytest.mark.parametrize("mode", ["attach", "spawn"])
def test_other_version_refused_naming_both(pe: PeInstall, tmp_path: Path, mode: str) -> None:
    old = pe.old_game
    if mode == "spawn":
        p = run_monitor(["spawn", "--out", winpath(tmp_path), "--", old.name], cwd=old.parent)
        err = p.stderr
        rc = p.returncode
    else:
        no_plugins = {"FAKE_GAME_PLUGINS": "", "FAKE_GAME_LATE_PLUGINS": ""}
        with running_game(old, tmp_path, **no_plugins) as (_, pid):
            p = run_monitor(["attach", str(pid), "--out", winpath(tmp_path)], cwd=tmp_path)
            err, rc = p.stderr, p.returncode
    assert rc == 2, err[-1500:]
    line = next(ln for ln in err.splitlines() if "error:" in ln)
    assert "1.4.0.525" in line and "1.4.0.524" in line and "--force" in line
    assert not (tmp_path / "MemoryPoolNVSE_stats.json").exists()


def test_geck_profile_and_addresses(pe: PeInstall, tmp_path: Path) -> None:
    root = pe.geck_root
    p = run_monitor(["spawn", "--out", winpath(tmp_path / "out"), "--record",
                     winpath(tmp_path / "g.nvmrec"), "--", "GECK.exe"], cwd=root,
                    env=game_env(FAKE_GAME_TRUTH=winpath(tmp_path / "truth.txt"),
                                 FAKE_GAME_PLUGINS="",
                                 FAKE_GAME_LATE_PLUGINS="fnvplugin_formheap.dll"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "profile geck-1.4.0.518" in p.stderr
    truth = wait_truth(tmp_path / "truth.txt", 5)
    assert ("GECK.exe", "MemoryManager::Deallocate") in truth.calls
    assert_exact(truth, tmp_path / "g.nvmrec")
    assert_final(stats(tmp_path / "out"), truth, GECK)


def test_burst_four_threads_lossless(pe: PeInstall, tmp_path: Path) -> None:
    """4 threads x 200,000 hooked calls each on the PE game: nothing dropped, counts exact."""
    p = run_monitor(["spawn", "--out", winpath(tmp_path / "out"), "--record",
                     winpath(tmp_path / "b.nvmrec"), "--", "FalloutNV.exe"], cwd=pe.root,
                    env=game_env(FAKE_GAME_TRUTH=winpath(tmp_path / "truth.txt"),
                                 FAKE_GAME_PLUGINS="", FAKE_GAME_LATE_PLUGINS="",
                                 FAKE_GAME_ITERS="21000"), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    truth = wait_truth(tmp_path / "truth.txt", 5)
    per_thread = sum(c for (_, _), (c, _) in truth.calls.items()) / 4
    assert per_thread >= 200_000
    assert " 0 dropped" in p.stderr, p.stderr[-800:]
    assert_exact(truth, tmp_path / "b.nvmrec")
    assert_final(stats(tmp_path / "out"), truth)
