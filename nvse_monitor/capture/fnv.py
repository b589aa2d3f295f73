"""Fallout New Vegas specifics that are plain decisions: where the game is, where the files go,
how the game is launched, what the log banner says. Pure functions (file-system look-ups only),
so they are unit-tested on Linux with directories laid out like a game install (docs/fnv.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from ..stream.messages import Module

GAME_EXE = "FalloutNV.exe"
LOADER_EXE = "nvse_loader.exe"
EDITOR_EXE = "GECK.exe"
PLUGINS_REL = ("Data", "NVSE", "Plugins")
STEAM_APP_ID = "22380"
STEAM_ENV = ("SteamAppID", "SteamGameId")
# xNVSE's runtime DLL for 1.4.0.525 and its Steam loader stub (nvse_loader injects the latter)
NVSE_MODULES = ("nvse_1_4.dll", "nvse_steam_loader.dll")
FALLBACK_OUT_DIR = Path("nvse-monitor-out")  # = pipeline.DEFAULT_OUT_DIR
# NVHR (New Vegas Heap Replacer) and other known allocator replacers, by module name prefix
HEAP_REPLACERS = ("nvhr", "memorypoolnvse", "heap_replacer")


def _child(directory: Path, *names: str) -> Path | None:
    """directory/names[0]/names[1]... matched case-insensitively (a Windows install copied to, or
    run through Proton on, a case-sensitive file system keeps its Windows spelling)."""
    cur = directory
    for name in names:
        direct = cur / name
        if direct.exists():
            cur = direct
            continue
        try:
            found = next((p for p in cur.iterdir() if p.name.lower() == name.lower()), None)
        except OSError:
            return None
        if found is None:
            return None
        cur = found
    return cur


@dataclass(frozen=True)
class GameDir:
    root: Path
    game_exe: Path | None  # FalloutNV.exe
    loader: Path | None  # nvse_loader.exe
    plugins_dir: Path | None  # Data\NVSE\Plugins
    editor: Path | None = None  # GECK.exe

    def plugins(self) -> list[Path]:
        """The plugin DLLs installed (not necessarily loaded), sorted by name."""
        if self.plugins_dir is None:
            return []
        return sorted((p for p in self.plugins_dir.iterdir()
                       if p.is_file() and p.suffix.lower() == ".dll"), key=lambda p: p.name.lower())


def game_dir_at(directory: Path, game_exe: str = GAME_EXE, loader_exe: str = LOADER_EXE
                ) -> GameDir | None:
    """The game install in `directory` itself (it holds the game executable), else None."""
    exe = _child(directory, game_exe)
    if exe is None or not exe.is_file():
        return None
    loader = _child(directory, loader_exe)
    plugins = _child(directory, *PLUGINS_REL)
    editor = _child(directory, EDITOR_EXE)
    return GameDir(
        root=directory, game_exe=exe,
        loader=loader if loader is not None and loader.is_file() else None,
        plugins_dir=plugins if plugins is not None and plugins.is_dir() else None,
        editor=editor if editor is not None and editor.is_file() else None)


def find_game_dir(start: str | Path, game_exe: str = GAME_EXE, loader_exe: str = LOADER_EXE,
                  max_up: int = 3) -> GameDir | None:
    """The game install holding `start` (the game or loader executable, the game directory, or a
    folder inside it such as Data\\NVSE\\Plugins), looking at most `max_up` levels up."""
    cur = Path(start)
    if cur.is_file():
        cur = cur.parent
    cur = cur.resolve()
    for _ in range(max_up + 1):
        found = game_dir_at(cur, game_exe, loader_exe)
        if found is not None:
            return found
        if cur.parent == cur:
            break
        cur = cur.parent
    return None


def _exe_name(target: str | Path) -> str:
    # The target may be a Windows path seen from Linux (a recording, a unit test) or native.
    return PureWindowsPath(str(target)).name


def default_out_dir(target_exe: str | Path | None, cwd: str | Path,
                    game_exe: str = GAME_EXE) -> Path:
    """Where the four files go without --out: the game's Data\\NVSE\\Plugins when the target is
    the game executable and that folder exists (where players look for plugin logs), else a
    folder under the working directory."""
    if target_exe is not None and _exe_name(target_exe).lower() == game_exe.lower():
        plugins = _child(Path(target_exe).parent, *PLUGINS_REL)
        if plugins is not None and plugins.is_dir():
            return plugins
    return Path(cwd) / FALLBACK_OUT_DIR


def spawn_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start the game with: `base` (default: ours) plus SteamAppID and
    SteamGameId = 22380, so the Steam build does not relaunch itself through Steam (the spawned
    PID would exit and the real game would be Steam's child). Values already set are kept."""
    env = dict(os.environ if base is None else base)
    present = {k.lower() for k in env}  # Windows environment names are case-insensitive
    for key in STEAM_ENV:
        if key.lower() not in present:
            env[key] = STEAM_APP_ID
    return env


@dataclass(frozen=True)
class LaunchPlan:
    """How to start the game so the monitor sees its first allocation.

    mode "loader": spawn `argv` (nvse_loader) in `cwd`, enable child gating, attach to the child
    named `child_name` it creates suspended, load the agent, resume the child, then resume the
    loader. mode "direct": spawn `argv` (the game itself, e.g. a 4GB-patched FalloutNV.exe that
    loads NVSE on its own), load the agent, resume it.
    """

    mode: str  # "loader" | "direct"
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str] = field(repr=False)
    child_name: str | None = None  # the gated child to monitor (mode "loader")
    reason: str = ""

    @property
    def gate_children(self) -> bool:
        return self.mode == "loader"


def plan_launch(target: str | Path, args: Iterable[str] = (), *,
                env: Mapping[str, str] | None = None, game_exe: str = GAME_EXE,
                loader_exe: str = LOADER_EXE, large_address_aware: bool | None = None,
                game_as_dir: bool = False) -> LaunchPlan:
    """The launch plan for `target`: the loader, the game executable, or the game directory.

    A game directory is launched through the loader when it has one, unless the game executable
    is large-address-aware (`large_address_aware`, from pe.read_pe_version; None = unknown =
    not patched): the 4GB patcher's exe loads NVSE itself and is started directly.
    The game executable itself is started directly (`spawn -- FalloutNV.exe`: what was asked),
    or with `game_as_dir` (`launch FalloutNV.exe`: start the game with NVSE) like its directory.
    Raises ValueError with one line when `target` is none of these.
    """
    path = Path(target)
    extra = tuple(args)
    senv = spawn_env(env)
    if game_as_dir and path.is_file() and path.name.lower() == game_exe.lower():
        path = path.parent
    if path.is_dir():
        gd = game_dir_at(path, game_exe, loader_exe)
        if gd is None or gd.game_exe is None:
            raise ValueError(f"{path}: no {game_exe} in this directory")
        if gd.loader is not None and not large_address_aware:
            return LaunchPlan("loader", (str(gd.loader), *extra), gd.root, senv, gd.game_exe.name,
                              f"{loader_exe} found in {gd.root}")
        why = (f"{game_exe} is large-address-aware (4GB patched: loads NVSE itself)"
               if large_address_aware else f"no {loader_exe} in {gd.root}")
        return LaunchPlan("direct", (str(gd.game_exe), *extra), gd.root, senv, None, why)
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory")
    name = path.name.lower()
    if name == loader_exe.lower():
        # nvse_loader takes the game from its working directory (cwd\FalloutNV.exe)
        child = _child(path.parent, game_exe)
        if child is None:
            raise ValueError(f"{path}: no {game_exe} next to the loader (it starts "
                             f"{game_exe} from its own directory)")
        return LaunchPlan("loader", (str(path), *extra), path.parent, senv, child.name,
                          "target is the NVSE loader")
    return LaunchPlan("direct", (str(path), *extra), path.parent, senv, None,
                      "target is the executable itself")


# ---------------------------------------------------------------- banner


def _path_parts(path: str) -> list[str]:
    return [p.lower() for p in PureWindowsPath(path.replace("/", "\\")).parts]


def notable_module(name: str, path: str) -> str | None:
    """What a player looks for when a module loads: "Plugin" (from Data\\NVSE\\Plugins), "NVSE"
    or "Heap replacer"; None for any other module."""
    low = name.lower()
    if is_plugin_path(path):
        return "Plugin"
    if low in NVSE_MODULES:
        return "NVSE"
    if low.startswith(HEAP_REPLACERS):
        return "Heap replacer"
    return None


def is_plugin_path(path: str) -> bool:
    """True when `path` lies in a Data\\NVSE\\Plugins folder (either separator, any case)."""
    parts = _path_parts(path)
    want = [p.lower() for p in PLUGINS_REL]
    return any(parts[i:i + 3] == want for i in range(len(parts) - 3))


@dataclass(frozen=True)
class Banner:
    game: str  # main module name
    game_version: str | None
    nvse: str | None  # the NVSE module loaded (name), None without NVSE
    nvse_version: str | None
    plugins: tuple[str, ...]  # plugin DLL names loaded from Data\NVSE\Plugins, load order
    heap_replacers: tuple[str, ...]  # modules known to patch the allocator entry points

    def lines(self) -> list[str]:
        """The log banner's INFO lines."""
        ver = f" {self.game_version}" if self.game_version else ""
        nvse = "not loaded" if self.nvse is None else (
            self.nvse + (f" {self.nvse_version}" if self.nvse_version else ""))
        out = [f"Game: {self.game}{ver}", f"NVSE: {nvse}",
               f"Plugins loaded: {len(self.plugins)}"
               + (f": {', '.join(self.plugins)}" if self.plugins else "")]
        if self.heap_replacers:
            out.append(f"Heap replacers loaded: {', '.join(self.heap_replacers)}")
        return out


def banner(modules: Iterable[Module], main_module: str, game_version: str | None = None,
           nvse_version: str | None = None) -> Banner:
    """Banner facts from the module map (meta.modules, then module events in order)."""
    mods = list(modules)
    nvse = next((m.name for m in mods if m.name.lower() == NVSE_MODULES[0]), None)
    if nvse is None:
        nvse = next((m.name for m in mods if m.name.lower() in NVSE_MODULES), None)
    seen: set[str] = set()
    plugins: list[str] = []
    for m in mods:
        if is_plugin_path(m.path) and m.name.lower() not in seen:
            seen.add(m.name.lower())
            plugins.append(m.name)
    replacers = tuple(dict.fromkeys(
        m.name for m in mods if m.name.lower().startswith(HEAP_REPLACERS)))
    return Banner(main_module, game_version, nvse, nvse_version, tuple(plugins), replacers)
