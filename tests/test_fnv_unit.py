"""nvse_monitor.capture.fnv: game-directory detection, output directory, spawn environment,
launch plan and banner, on directories laid out like a game install (no Windows needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvse_monitor.capture import fnv
from nvse_monitor.stream.messages import Module


def make_game(root: Path, loader: bool = True, plugins: bool = True, editor: bool = False,
              exe: str = "FalloutNV.exe") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / exe).write_bytes(b"MZ")
    if loader:
        (root / "nvse_loader.exe").write_bytes(b"MZ")
    if plugins:
        d = root / "Data" / "NVSE" / "Plugins"
        d.mkdir(parents=True)
        (d / "jip_nvse.dll").write_bytes(b"MZ")
        (d / "JohnnyGuitarNVSE.dll").write_bytes(b"MZ")
        (d / "readme.txt").write_text("not a plugin")
    if editor:
        (root / "GECK.exe").write_bytes(b"MZ")
    return root


# ---------------------------------------------------------------- game directory


def test_detects_full_install(tmp_path: Path) -> None:
    root = make_game(tmp_path / "Fallout New Vegas", editor=True)
    gd = fnv.find_game_dir(root)
    assert gd is not None
    assert gd.game_exe == root / "FalloutNV.exe"
    assert gd.loader == root / "nvse_loader.exe"
    assert gd.plugins_dir == root / "Data" / "NVSE" / "Plugins"
    assert gd.editor == root / "GECK.exe"
    assert [p.name for p in gd.plugins()] == ["jip_nvse.dll", "JohnnyGuitarNVSE.dll"]


@pytest.mark.parametrize("start", ["FalloutNV.exe", "nvse_loader.exe", "Data/NVSE/Plugins",
                                   "Data/NVSE/Plugins/jip_nvse.dll", "Data"])
def test_found_from_inside(tmp_path: Path, start: str) -> None:
    root = make_game(tmp_path / "game")
    gd = fnv.find_game_dir(root / start)
    assert gd is not None and gd.root == root.resolve()


def test_case_insensitive_names(tmp_path: Path) -> None:
    """A Windows install copied to (or run through Proton on) a case-sensitive file system."""
    root = tmp_path / "g"
    root.mkdir()
    (root / "falloutnv.EXE").write_bytes(b"MZ")
    (root / "NVSE_Loader.exe").write_bytes(b"MZ")
    (root / "data" / "nvse" / "plugins").mkdir(parents=True)
    gd = fnv.find_game_dir(root)
    assert gd is not None
    assert gd.game_exe is not None and gd.game_exe.name == "falloutnv.EXE"
    assert gd.loader is not None and gd.loader.name == "NVSE_Loader.exe"
    assert gd.plugins_dir == root / "data" / "nvse" / "plugins"


def test_no_game_dir(tmp_path: Path) -> None:
    (tmp_path / "x" / "Data" / "NVSE" / "Plugins").mkdir(parents=True)
    assert fnv.find_game_dir(tmp_path / "x") is None
    assert fnv.find_game_dir(tmp_path / "x" / "Data", max_up=0) is None


def test_without_loader_or_plugins(tmp_path: Path) -> None:
    gd = fnv.find_game_dir(make_game(tmp_path / "g", loader=False, plugins=False))
    assert gd is not None and gd.loader is None and gd.plugins_dir is None and gd.plugins() == []


# ---------------------------------------------------------------- output directory


def test_out_dir_is_plugins_folder_for_the_game(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    assert fnv.default_out_dir(root / "FalloutNV.exe", tmp_path / "cwd") == \
        root / "Data" / "NVSE" / "Plugins"
    assert fnv.default_out_dir(root / "falloutnv.exe", tmp_path / "cwd") == \
        root / "Data" / "NVSE" / "Plugins"


@pytest.mark.parametrize("case", ["no plugins dir", "other exe", "no target"])
def test_out_dir_falls_back_to_cwd(tmp_path: Path, case: str) -> None:
    root = make_game(tmp_path / "g", plugins=case != "no plugins dir", editor=True)
    target = {"no plugins dir": root / "FalloutNV.exe", "other exe": root / "GECK.exe",
              "no target": None}[case]
    cwd = tmp_path / "cwd"
    assert fnv.default_out_dir(target, cwd) == cwd / "nvse-monitor-out"


def test_fallback_matches_pipeline_default() -> None:
    from nvse_monitor.outputs.pipeline import DEFAULT_OUT_DIR

    assert fnv.FALLBACK_OUT_DIR == DEFAULT_OUT_DIR


def test_out_dir_for_a_windows_path_seen_elsewhere(tmp_path: Path) -> None:
    # a target path that does not exist here (e.g. from a recording) never crashes
    assert fnv.default_out_dir(r"C:\Games\FNV\FalloutNV.exe", tmp_path) == \
        tmp_path / "nvse-monitor-out"


# ---------------------------------------------------------------- environment and launch plan


def test_spawn_env_sets_steam_ids() -> None:
    env = fnv.spawn_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "SteamAppID": "22380", "SteamGameId": "22380"}


def test_spawn_env_keeps_user_values_any_case() -> None:
    env = fnv.spawn_env({"steamappid": "1", "SteamGameId": "2"})
    assert env == {"steamappid": "1", "SteamGameId": "2"}


def test_spawn_env_does_not_touch_its_input() -> None:
    base = {"A": "1"}
    fnv.spawn_env(base)
    assert base == {"A": "1"}


def test_plan_game_dir_with_loader(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    plan = fnv.plan_launch(root, ["-x"], env={})
    assert plan.mode == "loader" and plan.gate_children
    assert plan.argv == (str(root / "nvse_loader.exe"), "-x")
    assert plan.cwd == root and plan.child_name == "FalloutNV.exe"
    assert plan.env["SteamAppID"] == "22380"


def test_plan_game_dir_4gb_patched_starts_the_game(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    plan = fnv.plan_launch(root, env={}, large_address_aware=True)
    assert plan.mode == "direct" and not plan.gate_children
    assert plan.argv == (str(root / "FalloutNV.exe"),) and "4GB" in plan.reason


def test_plan_game_dir_without_loader(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g", loader=False)
    plan = fnv.plan_launch(root, env={})
    assert plan.mode == "direct" and "nvse_loader.exe" in plan.reason


def test_plan_loader_target(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    plan = fnv.plan_launch(root / "nvse_loader.exe", env={})
    assert plan.mode == "loader" and plan.cwd == root and plan.child_name == "FalloutNV.exe"


def test_plan_exe_target(tmp_path: Path) -> None:
    root = make_game(tmp_path / "g")
    plan = fnv.plan_launch(root / "FalloutNV.exe", ["a"], env={})
    assert plan.mode == "direct" and plan.argv == (str(root / "FalloutNV.exe"), "a")
    assert plan.cwd == root


@pytest.mark.parametrize("loader,laa,mode", [(True, False, "loader"), (True, True, "direct"),
                                             (False, False, "direct")])
def test_plan_exe_as_its_game_dir(tmp_path: Path, loader: bool, laa: bool, mode: str) -> None:
    """`launch FalloutNV.exe` starts the game with NVSE: through the loader next to it, unless
    the exe is 4GB patched or there is no loader."""
    root = make_game(tmp_path / "g", loader=loader)
    plan = fnv.plan_launch(root / "FalloutNV.exe", ["a"], env={}, large_address_aware=laa,
                           game_as_dir=True)
    assert plan.mode == mode and plan.cwd == root and plan.argv[1:] == ("a",)
    assert plan.argv[0] == str(root / ("nvse_loader.exe" if mode == "loader" else "FalloutNV.exe"))


@pytest.mark.parametrize("what", ["empty dir", "missing", "loader alone"])
def test_plan_errors_are_one_line(tmp_path: Path, what: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "nvse_loader.exe").write_bytes(b"MZ")
    target = {"empty dir": tmp_path / "empty", "missing": tmp_path / "nope",
              "loader alone": tmp_path / "lonely" / "nvse_loader.exe"}[what]
    with pytest.raises(ValueError) as e:
        fnv.plan_launch(target, env={})
    assert str(target) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- banner


def _mod(name: str, path: str) -> Module:
    return Module(name=name, base=0x10000000, size=0x1000, path=path)


def test_banner_from_windows_modules() -> None:
    g = r"C:\Games\Fallout New Vegas"
    mods = [
        _mod("FalloutNV.exe", g + r"\FalloutNV.exe"),
        _mod("ntdll.dll", r"C:\Windows\SYSTEM32\ntdll.dll"),
        _mod("nvse_steam_loader.dll", g + r"\nvse_steam_loader.dll"),
        _mod("nvse_1_4.dll", g + r"\nvse_1_4.dll"),
        _mod("jip_nvse.dll", g + r"\Data\NVSE\Plugins\jip_nvse.dll"),
        _mod("nvhr_1_4.dll", g + r"\nvhr_1_4.dll"),
        _mod("JohnnyGuitarNVSE.dll", g + r"\data\nvse\plugins\JohnnyGuitarNVSE.dll"),
        _mod("jip_nvse.dll", g + r"\Data\NVSE\Plugins\jip_nvse.dll"),  # reloaded: listed once
    ]
    b = fnv.banner(mods, "FalloutNV.exe", "1.4.0.525", "6.3.7.0")
    assert b.nvse == "nvse_1_4.dll" and b.plugins == ("jip_nvse.dll", "JohnnyGuitarNVSE.dll")
    assert b.heap_replacers == ("nvhr_1_4.dll",)
    assert b.lines() == [
        "Game: FalloutNV.exe 1.4.0.525",
        "NVSE: nvse_1_4.dll 6.3.7.0",
        "Plugins loaded: 2: jip_nvse.dll, JohnnyGuitarNVSE.dll",
        "Heap replacers loaded: nvhr_1_4.dll",
    ]


def test_banner_without_nvse() -> None:
    b = fnv.banner([_mod("FalloutNV.exe", r"C:\g\FalloutNV.exe")], "FalloutNV.exe")
    assert b.lines() == ["Game: FalloutNV.exe", "NVSE: not loaded", "Plugins loaded: 0"]


@pytest.mark.parametrize("path,want", [
    (r"C:\g\Data\NVSE\Plugins\a.dll", True),
    ("/home/u/g/Data/NVSE/Plugins/liba.so", True),
    (r"C:\g\Data\NVSE\a.dll", False),
    (r"C:\g\Plugins\a.dll", False),
    ("", False),
])
def test_is_plugin_path(path: str, want: bool) -> None:
    assert fnv.is_plugin_path(path) is want
