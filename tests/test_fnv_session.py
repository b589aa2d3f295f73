"""FNV in live sessions, through the CLI with real Frida on the fake game (tests/fnv/): following
nvse_loader to the game it starts (child gating: `spawn --follow-child`, `spawn -- nvse_loader.exe`,
`launch GAME_DIR`), the Steam variables and working directory of a spawned game, the default
output directory (the game's Data/NVSE/Plugins), the banner, the PE version check with --force,
and the address-space headroom warning.

The fake loader starts the fake game as a suspended child, like nvse_loader; the monitor must
see the game from its first allocation: every allocation call the game counts (main thread and
workers) is in the recording, exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_harness import m32_problem
from conftest import calls_of
from fnv.build import FakeInstall, GroundTruth, build_fake_install, parse_truth

from nvse_monitor.capture.children import LAUNCHER_GRACE_S
from nvse_monitor.capture.hookprofile import Profile, load_profile
from nvse_monitor.stream.messages import Batch
from nvse_monitor.stream.recording import Recording

pytestmark = [pytest.mark.frida, pytest.mark.m32]

FAKE_PROFILE = Path(__file__).parent / "profiles" / "fake-fnv.toml"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> FakeInstall:
    if why := m32_problem():
        pytest.skip(why)
    inst = build_fake_install(tmp_path_factory.mktemp("fnv-session-install"))
    # the same launcher under a name that means nothing to the monitor (generic --follow-child)
    shutil.copy2(inst.loader, inst.root / "launcher")
    for job in ("hog", "env"):  # plugins with a job of their own (tests/fnv/fake_plugin.c)
        shutil.copy2(inst.plugins_dir / "libfnvplugin_b.so",
                     inst.plugins_dir / f"libfnvplugin_{job}.so")
    return inst


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(FAKE_PROFILE)


def _env(**kw: str) -> dict[str, str]:
    env = dict(os.environ, FAKE_GAME_THREADS="3", FAKE_GAME_ITERS="100", FAKE_GAME_AUTORUN="1")
    env.update(kw)
    return env


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvse_monitor", *args], cwd=cwd,
                          env=_env(**env), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@dataclass
class Followed:
    p: subprocess.CompletedProcess[str]
    gt: GroundTruth
    out_dir: Path
    rec: Path

    def json(self) -> dict[str, Any]:
        return json.loads(next(self.out_dir.glob("*_stats.json")).read_text())

    def monitored_pid(self) -> int:
        m = re.search(r"monitoring (\S+) \(PID (\d+)", self.p.stderr)
        assert m, self.p.stderr[-800:]
        assert m.group(1) == "FalloutNV.exe"
        return int(m.group(2))

    def loader_child_pid(self) -> int:
        m = re.search(r"^loader child (\d+)$", self.p.stdout, re.M)
        assert m, self.p.stdout[-500:]
        return int(m.group(1))


def _followed(p: subprocess.CompletedProcess[str], out_dir: Path, rec: Path) -> Followed:
    assert p.returncode == 0, p.stderr[-1500:]
    gt = parse_truth([ln.split() for ln in p.stdout.splitlines()])
    assert gt.hooks, p.stdout[-500:]
    return Followed(p, gt, out_dir, rec)


@pytest.fixture(scope="module")
def via_spawn(install: FakeInstall, tmp_path_factory: pytest.TempPathFactory) -> Followed:
    """`spawn --follow-child -- ./launcher ARGS` in the game directory, no --out."""
    rec = tmp_path_factory.mktemp("fnv-follow") / "s.nvmrec"
    p = cli(["spawn", "--profile", str(FAKE_PROFILE), "--prefix", "Follow", "--record",
             str(rec), "--follow-child", "--", "./launcher", *install.game_argv()[1:]],
            cwd=install.root)
    return _followed(p, install.plugins_dir, rec)


@pytest.fixture(scope="module")
def via_launch(install: FakeInstall, tmp_path_factory: pytest.TempPathFactory) -> Followed:
    """`launch GAME_DIR -- ARGS` from another directory: the loader is found and started in the
    game directory (it runs ./FalloutNV.exe from there)."""
    elsewhere = tmp_path_factory.mktemp("fnv-launch")
    out = elsewhere / "out"
    p = cli(["launch", str(install.root), "--profile", str(FAKE_PROFILE), "--out", str(out),
             "--record", str(elsewhere / "l.nvmrec"), "--", *install.game_argv()[1:]],
            cwd=elsewhere)
    return _followed(p, out, elsewhere / "l.nvmrec")


@pytest.fixture(scope="module")
def via_loader(install: FakeInstall, tmp_path_factory: pytest.TempPathFactory) -> Followed:
    """`spawn -- GAME_DIR/nvse_loader.exe ARGS` from another directory, nothing else: the loader's
    name alone makes the monitor follow it to FalloutNV.exe, started in the game directory."""
    elsewhere = tmp_path_factory.mktemp("fnv-loader")
    out = elsewhere / "out"
    p = cli(["spawn", "--profile", str(FAKE_PROFILE), "--out", str(out), "--record",
             str(elsewhere / "n.nvmrec"), "--", str(install.loader), *install.game_argv()[1:]],
            cwd=elsewhere)
    return _followed(p, out, elsewhere / "n.nvmrec")


def _per_hook(rec: Path, profile: Profile) -> tuple[Any, dict[str, tuple[int, int]]]:
    names = [h.name for h in profile.hooks]
    got: dict[str, tuple[int, int]] = {}
    r = Recording(rec)
    with r:
        meta = r.meta
        for msg in r:
            if not isinstance(msg, Batch):
                continue
            recs = calls_of(msg.records)
            for hook, size in zip(recs["hook"].tolist(), recs["size"].tolist(), strict=True):
                c, b = got.get(names[hook], (0, 0))
                got[names[hook]] = (c + 1, b + size)
    return meta, got


def _allocating_fixed_hooks(profile: Profile) -> list[str]:
    """Hooks at the game's absolute addresses that allocate (frees go on after the ground truth
    is printed: the game frees what it kept before it exits)."""
    return [h.name for h in profile.hooks if h.address is not None and h.role not in
            ("free", "size")]


@pytest.mark.parametrize("how", ["via_spawn", "via_launch", "via_loader"])
def test_child_monitored_from_first_allocation(how: str, request: pytest.FixtureRequest,
                                               profile: Profile) -> None:
    run: Followed = request.getfixturevalue(how)
    assert run.monitored_pid() == run.loader_child_pid()  # the game, not the loader
    meta, got = _per_hook(run.rec, profile)
    assert meta.mode == "spawn" and Path(meta.target).name == "FalloutNV.exe"
    want = {n: run.gt.hooks[n] for n in _allocating_fixed_hooks(profile) if n in run.gt.hooks}
    assert want["MemoryManager::Allocate"][0] > 100 and want["crt!malloc"][0] > 0
    assert {n: got.get(n) for n in want} == want


@pytest.mark.parametrize("how", ["via_spawn", "via_launch", "via_loader"])
def test_child_json_final_heaps(how: str, request: pytest.FixtureRequest) -> None:
    """At its end the game has freed everything it kept; what stays on the game heap is plugin
    A's blocks (allocated by absolute address, never freed)."""
    run: Followed = request.getfixturevalue(how)
    heaps = run.json()["monitor"]["heaps"]
    assert heaps["game"]["current_bytes"] == run.gt.live[("libfnvplugin_a.so", "game")]
    assert heaps["crt"]["current_bytes"] == 0 and heaps["scrap"]["current_bytes"] == 0
    assert heaps["crt"]["peak_bytes"] >= run.gt.heaps["crt"] > 0
    assert "session ended: target-exited" in run.p.stderr


def test_default_out_dir_is_the_games_plugins_folder(via_spawn: Followed,
                                                      install: FakeInstall) -> None:
    assert (install.plugins_dir / "Follow_stats.json").is_file()
    assert f"files in {install.plugins_dir}" in via_spawn.p.stderr


def test_banner_on_stderr_in_meta_and_log(via_spawn: Followed) -> None:
    """The banner (game, NVSE, plugins at start) on stderr, in the recording's metadata and in
    the log file's banner; the plugins that load later get an INFO line each in the log."""
    meta = Recording(via_spawn.rec).meta
    lines = meta.extra.get("banner")
    assert lines and lines[0] == "Game: FalloutNV.exe" and "NVSE: not loaded" in lines
    assert "Plugins loaded: 0" in lines  # spawned: none is loaded yet
    log = next(via_spawn.out_dir.glob("Follow_*.log")).read_text().splitlines()
    profile_line = next(i for i, ln in enumerate(log) if ln.endswith("] Profile: fake-fnv"))
    for i, line in enumerate(lines):
        assert f"nvse-monitor: {line}\n" in via_spawn.p.stderr
        got = log[profile_line + 1 + i]
        assert "[INFO]" in got and got.endswith(f"] {line}"), log[:12]
    for plugin in ("libfnvplugin_a.so", "libfnvplugin_b.so"):
        assert any("[INFO]" in ln and f"] Plugin loaded: {plugin} at 0x" in ln for ln in log)


def test_launch_says_how(via_launch: Followed) -> None:
    assert "launching" in via_launch.p.stderr and "nvse_loader.exe" in via_launch.p.stderr


def test_spawned_game_gets_steam_ids_and_its_directory(install: FakeInstall,
                                                        tmp_path: Path) -> None:
    """FalloutNV.exe spawned directly (no loader, as a 4GB-patched game is) from another
    directory, with no Steam variables of ours: the game sees SteamAppID = SteamGameId = 22380
    and runs in its own directory (a plugin prints what it sees)."""
    env_plugin = install.plugins_dir / "libfnvplugin_env.so"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("steamappid", "steamgameid")}
    p = subprocess.run(
        [sys.executable, "-m", "nvse_monitor", "spawn", "--profile", str(FAKE_PROFILE),
         "--out", str(tmp_path / "out"), "--", str(install.game), str(install.crt_dir),
         str(env_plugin), "env", str(install.crt_dir)],
        cwd=tmp_path, env=dict(env, FAKE_GAME_AUTORUN="1", FAKE_GAME_ITERS="5"),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "monitoring FalloutNV.exe" in p.stderr
    assert f"plugin env SteamAppID=22380 SteamGameId=22380 cwd={install.root.resolve()}\n" \
        in p.stdout, p.stdout[-500:]


# ---------------------------------------------------------------- errors


def test_launcher_without_child_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "nvse_monitor", "spawn", "--out", str(tmp_path),
                        "--follow-child", "--", "/bin/true"], capture_output=True, text=True,
                       timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "without starting a child process" in err[0]


def test_launcher_that_lives_on_neither_holds_the_end_nor_is_harmed(tmp_path: Path) -> None:
    """A launcher that outlives its child by more than LAUNCHER_GRACE_S (here sh): the session
    ends with the child, and the monitor leaves the launcher END_GRACE_S later instead of
    waiting out the grace; the launcher runs on to its own end."""
    stamp, after = tmp_path / "child-ended", tmp_path / "launcher-ended"
    linger = LAUNCHER_GRACE_S + 2
    script = f"/bin/true; date +%s.%N > {stamp}; sleep {linger:g}; echo ok > {after}"
    # output to a file: the launcher inherits it, and would hold a pipe open to its end
    with open(tmp_path / "err", "w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "nvse_monitor", "spawn", "--out",
                              str(tmp_path / "o"), "--follow-child", "--", "/bin/sh", "-c",
                              script], stdout=err, stderr=err, stdin=subprocess.DEVNULL)
        rc = p.wait(timeout=TIMEOUT_S)
        left = time.time()
        err.seek(0)
        text = err.read()
    assert rc == 0, text
    assert "session ended: target-exited" in text, text
    assert left - float(stamp.read_text()) < LAUNCHER_GRACE_S / 2, text
    deadline = time.monotonic() + linger + 30
    while not after.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after.read_text() == "ok\n"  # unharmed by the detach


def test_launch_not_a_game_dir(tmp_path: Path) -> None:
    p = cli(["launch", str(tmp_path)], cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == f"nvse-monitor: error: {tmp_path}: no FalloutNV.exe in this " \
                               "directory"


# ---------------------------------------------------------------- version check


@pytest.fixture(scope="module")
def versioned_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake profile with the real one's version requirement (the fake game is no PE)."""
    text = FAKE_PROFILE.read_text().replace('name = "fake-fnv"\n',
                                            'name = "fake-fnv-pe"\npe_version = "1.4.0.525"\n', 1)
    assert "pe_version" in text
    p = tmp_path_factory.mktemp("fnv-pe-profile") / "fake-fnv-pe.toml"
    p.write_text(text)
    return p


def test_version_check_refuses_a_non_pe_game(install: FakeInstall, versioned_profile: Path,
                                             tmp_path: Path) -> None:
    p = cli(["spawn", "--profile", str(versioned_profile), "--out", str(tmp_path), "--",
             *install.game_argv(plugins=False)], cwd=install.root, FAKE_GAME_ITERS="5")
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "not a PE executable" in err[0] and "1.4.0.525" in err[0]
    assert "--force" in err[0]
    assert "gt hook" not in p.stdout  # the game was killed before it ran
    assert not list(tmp_path.glob("*_stats.json"))


def test_version_check_forced(install: FakeInstall, versioned_profile: Path,
                              tmp_path: Path) -> None:
    p = cli(["spawn", "--force", "--profile", str(versioned_profile), "--out", str(tmp_path),
             "--", *install.game_argv(plugins=False)], cwd=install.root, FAKE_GAME_ITERS="5")
    assert p.returncode == 0, p.stderr[-1500:]
    assert "warning:" in p.stderr and "forced" in p.stderr
    assert json.loads(next(tmp_path.glob("*_stats.json")).read_text())["monitor"]["profile"] \
        == "fake-fnv-pe"


# ---------------------------------------------------------------- address-space headroom


def _status_of(path: Path) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"^Status: (\w+)$", text, re.M)
    return m.group(1) if m else None


def _wait_status(path: Path, want: str, timeout_s: float = 5.0) -> str | None:
    """The status file's state once it is `want`, or the last one seen after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = _status_of(path)
        if st == want or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def _say(mon: subprocess.Popen[str], line: str, expect: str) -> str:
    """Send a line to the fake game (through the monitor: its stdio is inherited) and return the
    first output line starting with `expect`."""
    assert mon.stdin is not None and mon.stdout is not None
    if line:
        mon.stdin.write(line + "\n")
        mon.stdin.flush()
    while True:
        got = mon.stdout.readline()
        assert got, f"the game ended before printing {expect!r}"
        if got.startswith(expect):
            return got.strip()


def test_address_space_low_warns_and_is_recorded(install: FakeInstall, tmp_path: Path) -> None:
    """The fake game under the FNV test profile, with a plugin that reserves the 32-bit address
    space in 64 MiB regions until it is full: the largest free block falls under the threshold
    (WARN, DEGRADED), then the plugin releases them (recovered, ACTIVE); the log, the JSON
    section and the time series show it, and a replay of the recording writes the same time
    series and lines."""
    out, rec = tmp_path / "live", tmp_path / "hog.nvmrec"
    hog = install.plugins_dir / "libfnvplugin_hog.so"
    mon = subprocess.Popen(
        [sys.executable, "-m", "nvse_monitor", "spawn", "--profile", str(FAKE_PROFILE),
         "--out", str(out), "--prefix", "hog", "--record", str(rec), "--",
         str(install.game), str(install.crt_dir), str(hog), "hog", str(install.crt_dir)],
        cwd=install.root, env=_env(FAKE_GAME_ITERS="20"), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = out / "hog_status.txt"
    try:
        _say(mon, "", "hog ready")
        time.sleep(1.2)  # a sample of the roomy address space
        before = _status_of(status)
        filled = int(_say(mon, "fill", "hog filled").split()[2])
        assert filled > 40  # ~3.5 GB of reservations
        low_status = _wait_status(status, "DEGRADED")
        time.sleep(1.2)
        _say(mon, "free", "hog freed")
        back_status = _wait_status(status, "ACTIVE")
        time.sleep(1.2)
        _say(mon, "end", "done")
        assert mon.stdin is not None
        mon.stdin.close()  # the game reads EOF and exits
        mon.stdin = None
        _, err = mon.communicate(timeout=TIMEOUT_S)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    assert mon.returncode == 0, err[-1500:]
    assert before == "ACTIVE" and low_status == "DEGRADED" and back_status == "ACTIVE"
    log = (out / "hog_rpmalloc.log").read_text().splitlines()
    low = [ln for ln in log if "[WARN]" in ln and "Address space low: largest free block" in ln]
    back = [ln for ln in log if "[INFO]" in ln and "Address space recovered" in ln]
    assert len(low) == 1 and len(back) == 1, "\n".join(log[-30:])
    assert log.index(low[0]) < log.index(back[0])
    assert any(ln.endswith("Status: ACTIVE -> DEGRADED (address space low)") for ln in log)
    assert any(ln.endswith("Status: DEGRADED -> ACTIVE (address space recovered)") for ln in log)
    rows = (out / "hog_addrspace.csv").read_text().splitlines()
    assert rows[0].startswith("timestamp,mapped_bytes,")
    largest = [int(r.split(",")[5]) for r in rows[1:]]
    limit = 256 << 20
    first_low = next(i for i, v in enumerate(largest) if v < limit)
    assert first_low > 0 and any(v >= limit for v in largest[first_low:])
    mapped = [int(r.split(",")[1]) for r in rows[1:]]
    assert max(mapped) - mapped[0] >= filled * (64 << 20) * 0.9
    doc = json.loads((out / "hog_stats.json").read_text())
    sec = doc["monitor"]["address_space"]
    assert sec["samples"] == len(rows) - 1 and sec["min_largest_free_bytes"] == min(largest)
    assert sec["largest_free_bytes"] == largest[-1] and sec["low"] is False
    assert sec["limit_bytes"] == 1 << 32 and sec["warn_below_bytes"] == limit
    assert doc["monitor"]["profile"] == "fake-fnv"
    assert "smallest largest-free block" in err
    # the samples are stream messages: the replay writes the same time series and lines
    p = cli(["replay", str(rec), "--out", str(tmp_path / "replay"), "--prefix", "hog"],
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-1500:]
    assert (tmp_path / "replay" / "hog_addrspace.csv").read_bytes() == \
        (out / "hog_addrspace.csv").read_bytes()
    replayed = (tmp_path / "replay" / "hog_rpmalloc.log").read_text().splitlines()
    assert [ln for ln in replayed if "Address space" in ln] == low + back


def test_agent_footprint_in_banner_and_json(via_spawn: Followed) -> None:
    """The agent measures its own share of the -m32 target (the regions Frida cloaks): more than
    its ring, far less than the address space; in the banner and the JSON."""
    fp = via_spawn.json()["monitor"]["agent_footprint"]
    assert fp["ring_bytes"] < fp["committed_bytes"] < 256 << 20
    assert "Monitor footprint in the target: " in via_spawn.p.stderr
