"""FNV decisions inside live sessions that need no target: the spawn plan for nvse_loader.exe /
FalloutNV.exe, the PE version check, the banner lines, the 4GB-patch probe of `launch`
(nvse_monitor/capture/: session.py, children.py, banner.py; nvse_monitor/cli/live.py;
docs/fnv.md)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from fnv.pebuild import build_pe
from test_fnv_unit import make_game

from nvse_monitor.capture import addrspace, fnv
from nvse_monitor.capture.banner import fnv_banner
from nvse_monitor.capture.hookprofile import load_profile
from nvse_monitor.capture.session import LiveSession, SessionError, SessionOptions
from nvse_monitor.cli.live import _large_address_aware
from nvse_monitor.stream.messages import Module, SessionMeta

FNV = load_profile("fnv-1.4.0.525")


def _session(**kw: object) -> LiveSession:
    return LiveSession(SessionOptions(**kw), err=io.StringIO())  # type: ignore[arg-type]


# ---------------------------------------------------------------- spawn plan


def test_spawned_loader_is_followed_to_the_game(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    live = _session()
    live._plan_spawn([str(root / "nvse_loader.exe"), "-x"])
    o = live.opts
    assert o.follow_child and o.child_name == "FalloutNV.exe"
    assert o.spawn_cwd == root  # nvse_loader takes the game from its working directory
    assert o.spawn_env is not None
    assert o.spawn_env["SteamAppID"] == o.spawn_env["SteamGameId"] == "22380"


def test_spawned_game_gets_steam_env_and_its_dir(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    live = _session()
    live._plan_spawn([str(root / "FalloutNV.exe")])
    assert not live.opts.follow_child and live.opts.child_name is None
    assert live.opts.spawn_cwd == root
    assert live.opts.spawn_env is not None and live.opts.spawn_env["SteamGameId"] == "22380"


def test_user_choices_are_kept(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    live = _session(spawn_cwd=tmp_path, spawn_env={"A": "1"}, child_name="Other.exe")
    live._plan_spawn([str(root / "nvse_loader.exe")])
    assert live.opts.spawn_cwd == tmp_path and live.opts.spawn_env == {"A": "1"}
    assert live.opts.follow_child and live.opts.child_name == "Other.exe"


def test_other_programs_untouched(tmp_path: Path) -> None:
    live = _session()
    live._plan_spawn(["/bin/true"])
    o = live.opts
    assert (o.follow_child, o.child_name, o.spawn_cwd, o.spawn_env) == (False, None, None, None)


def test_loader_without_game_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "nvse_loader.exe").write_bytes(b"MZ")
    with pytest.raises(SessionError) as e:
        _session()._plan_spawn([str(tmp_path / "nvse_loader.exe")])
    assert "FalloutNV.exe" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- version check


@pytest.mark.parametrize("force", [False, True])
def test_version_mismatch_names_both(tmp_path: Path, force: bool) -> None:
    exe = tmp_path / "FalloutNV.exe"
    exe.write_bytes(build_pe("1.4.0.512"))
    live = _session(force=force)
    if not force:
        with pytest.raises(SessionError) as e:
            live._check_version(FNV, str(exe))
        msg = str(e.value)
        assert "1.4.0.525" in msg and "1.4.0.512" in msg and "--force" in msg
        assert "\n" not in msg
    else:
        live._check_version(FNV, str(exe))
        assert any("1.4.0.512" in n and "forced" in n for n in live._notes)
        assert "warning" in live.err.getvalue()  # type: ignore[attr-defined]


def test_right_version_passes_silently(tmp_path: Path) -> None:
    exe = tmp_path / "FalloutNV.exe"
    exe.write_bytes(build_pe("1.4.0.525"))
    live = _session()
    live._check_version(FNV, str(exe))
    assert live._notes == [] and live.err.getvalue() == ""  # type: ignore[attr-defined]


def test_profile_without_version_reads_nothing(tmp_path: Path) -> None:
    live = _session()
    live._check_version(load_profile("linux-libc"), str(tmp_path / "missing"))
    assert live._notes == []


# ---------------------------------------------------------------- banner


def _meta(target: str, modules: list[Module]) -> SessionMeta:
    return SessionMeta(target=target, pid=1, arch="ia32", platform="windows", profile="p",
                       modules=modules)


def test_banner_reads_game_and_nvse_versions(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    (root / "FalloutNV.exe").write_bytes(build_pe("1.4.0.525"))
    (root / "nvse_1_4.dll").write_bytes(build_pe("6.3.7.0"))
    plug = root / "Data" / "NVSE" / "Plugins" / "jip_nvse.dll"
    mods = [Module("FalloutNV.exe", 0x400000, 0x1000, str(root / "FalloutNV.exe")),
            Module("nvse_1_4.dll", 0x10000000, 0x1000, str(root / "nvse_1_4.dll")),
            Module("jip_nvse.dll", 0x20000000, 0x1000, str(plug))]
    lines = fnv_banner(_meta("FalloutNV.exe", mods), str(root / "FalloutNV.exe"))
    assert lines == ["Game: FalloutNV.exe 1.4.0.525", "NVSE: nvse_1_4.dll 6.3.7.0",
                     "Plugins loaded: 1: jip_nvse.dll"]


def test_no_banner_for_other_targets() -> None:
    assert fnv_banner(_meta("game", []), "/usr/bin/game") == []


# ---------------------------------------------------------------- launch: 4GB patch


def _set_laa(exe: Path) -> None:
    data = bytearray(exe.read_bytes())
    pe_off = struct.unpack_from("<I", data, 0x3C)[0]
    chars = struct.unpack_from("<H", data, pe_off + 4 + 18)[0]
    struct.pack_into("<H", data, pe_off + 4 + 18, chars | 0x20)
    exe.write_bytes(bytes(data))


def test_launch_starts_a_4gb_patched_game_directly(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    exe = root / "FalloutNV.exe"
    exe.write_bytes(build_pe("1.4.0.525"))
    assert _large_address_aware(root) is False
    assert fnv.plan_launch(root, large_address_aware=_large_address_aware(root)).mode == "loader"
    _set_laa(exe)
    assert _large_address_aware(root) is True
    assert fnv.plan_launch(root, large_address_aware=_large_address_aware(root)).mode == "direct"


@pytest.mark.parametrize("target", ["dir", "exe"])
@pytest.mark.parametrize("patched", [False, True])
def test_launch_command_spawns_per_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        target: str, patched: bool) -> None:
    """`launch GAME_DIR|FalloutNV.exe -- ARGS` hands the session the plan: the loader with child
    gating in the game directory, or (4GB patched) the game itself; Steam variables set."""
    from click.testing import CliRunner

    from nvse_monitor.cli import live as cli_live
    from nvse_monitor.cli import main

    root = make_game(tmp_path / "g")
    exe = root / "FalloutNV.exe"
    exe.write_bytes(build_pe("1.4.0.525"))
    if patched:
        _set_laa(exe)
    calls: list[tuple[str, object, dict]] = []
    monkeypatch.setattr(cli_live, "_run", lambda kind, argv, spawn=None, **kw:
                        calls.append((kind, argv, spawn or {})))
    monkeypatch.delenv("SteamAppID", raising=False)
    arg = str(root if target == "dir" else exe)
    r = CliRunner().invoke(main, ["launch", arg, "--", "-windowed"])
    assert r.exit_code == 0, r.output
    (kind, argv, spawn), = calls
    want = exe if patched else root / "nvse_loader.exe"
    assert kind == "spawn" and argv == [str(want), "-windowed"]
    assert spawn["spawn_cwd"] == root and spawn["follow_child"] is (not patched)
    assert spawn["child_name"] == (None if patched else "FalloutNV.exe")
    assert spawn["spawn_env"]["SteamAppID"] == spawn["spawn_env"]["SteamGameId"] == "22380"


def test_launch_probe_unknown_for_non_pe(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")  # "MZ" only: not a PE image
    assert _large_address_aware(root) is None
    assert _large_address_aware(tmp_path / "nowhere") is None


# ---------------------------------------------------------------- address-space headroom
# (the samples' rule, JSON section, CSV and recording: tests/test_addrspace.py)


@pytest.mark.parametrize("arch,platform,want", [("ia32", "linux", 1 << 32),
                                                ("ia32", "windows", None),
                                                ("x64", "linux", None)])
def test_addrspace_limit(arch: str, platform: str, want: int | None) -> None:
    assert addrspace.default_limit(arch, platform) == want
    src = addrspace.script_source(want, 250)
    assert src.startswith("const ADDRSPACE = {") and '"interval_ms": 250' in src
