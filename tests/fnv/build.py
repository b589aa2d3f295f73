"""Build the fake Fallout New Vegas install for the tests (-m32 Linux programs, no pytest here).

Layout of the directory it fills (like a game install, so nvse_monitor.capture.fnv sees a game dir):
    FalloutNV.exe                 the fake game (tests/fnv/fake_game.c), entry points at FNV's
                                  addresses; image base 0x00400000 like the real one
    nvse_loader.exe               the fake loader (fake_loader.c)
    crt/libfake_ucrtbase.so, crt/libfake_msvcr100.so, crt/libfake_msvcr120.so,
    crt/libfake_msvcrt.so         fake CRT DLLs (fake_crt.c)
    crt/libfake_kernel32.so       fake kernel32 Heap*/Virtual* (fake_crt.c -DFAKE_KERNEL32)
    crt/libfake_nvhr.so           the fake heap replacer (fake_nvhr.c)
    Data/NVSE/Plugins/libfnvplugin_a.so, libfnvplugin_b.so   fake plugins (fake_plugin.c)
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent
CFLAGS = ["-m32", "-g", "-Wall", "-Werror", "-fno-builtin"]


def section_starts(source: Path) -> list[str]:
    """--section-start options for every `.fnv_XXXXXXXX` section of the fake game (AT(addr) and
    the heap object): the addresses live in the C source only."""
    addrs = sorted(set(re.findall(r'AT\((00[0-9a-f]{6})\)|\.fnv_([0-9a-f]{8})"',
                                  source.read_text())) - {("", "")})
    flat = sorted({a or b for a, b in addrs})
    return [f"-Wl,--section-start=.fnv_{a}=0x{a}" for a in flat]


@dataclass(frozen=True)
class FakeInstall:
    root: Path

    @property
    def game(self) -> Path:
        return self.root / "FalloutNV.exe"

    @property
    def loader(self) -> Path:
        return self.root / "nvse_loader.exe"

    @property
    def crt_dir(self) -> Path:
        return self.root / "crt"

    @property
    def plugins_dir(self) -> Path:
        return self.root / "Data" / "NVSE" / "Plugins"

    def plugin_args(self) -> list[str]:
        """Game arguments: plugin A on the fake ucrtbase (and the game heap), B on msvcr100."""
        return [str(self.plugins_dir / "libfnvplugin_a.so"), "ucrtbase",
                str(self.crt_dir / "libfake_ucrtbase.so"),
                str(self.plugins_dir / "libfnvplugin_b.so"), "msvcr",
                str(self.crt_dir / "libfake_msvcr100.so")]

    def game_argv(self, plugins: bool = True) -> list[str]:
        return [str(self.game), str(self.crt_dir), *(self.plugin_args() if plugins else [])]


def _cc(args: list[str]) -> None:
    r = subprocess.run(["gcc", *CFLAGS, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"gcc {' '.join(args)} failed:\n{r.stderr}")


def build_fake_install(root: Path) -> FakeInstall:
    """Compile everything into `root` (once: an existing complete build is reused)."""
    inst = FakeInstall(root)
    done = root / ".built"
    if done.exists():
        return inst
    inst.crt_dir.mkdir(parents=True, exist_ok=True)
    inst.plugins_dir.mkdir(parents=True, exist_ok=True)
    game_src = SRC / "fake_game.c"
    _cc(["-O0", "-no-pie", "-fno-pie", "-falign-functions=1", "-pthread", str(game_src),
         "-o", str(inst.game), "-ldl", "-Wl,-Ttext-segment=0x00400000",
         *section_starts(game_src)])
    _cc(["-O0", str(SRC / "fake_loader.c"), "-o", str(inst.loader)])
    for name in ("ucrtbase", "msvcr100", "msvcr120", "msvcrt"):
        _cc(["-O1", "-shared", "-fPIC", str(SRC / "fake_crt.c"),
             "-o", str(inst.crt_dir / f"libfake_{name}.so")])
    _cc(["-O1", "-shared", "-fPIC", "-DFAKE_KERNEL32", str(SRC / "fake_crt.c"),
         "-o", str(inst.crt_dir / "libfake_kernel32.so")])
    _cc(["-O0", "-shared", "-fPIC", str(SRC / "fake_nvhr.c"),
         "-o", str(inst.crt_dir / "libfake_nvhr.so")])
    for p in ("a", "b"):
        _cc(["-O0", "-shared", "-fPIC", str(SRC / "fake_plugin.c"),
             "-o", str(inst.plugins_dir / f"libfnvplugin_{p}.so"), "-ldl"])
    done.write_text("ok\n")
    return inst


@dataclass
class GroundTruth:
    hooks: dict[str, tuple[int, int]]  # hook name -> (calls, bytes)
    heaps: dict[str, int]  # heap -> live bytes at the end
    modules: dict[str, int]  # module name -> live bytes at the end
    live: dict[tuple[str, str], int]  # (calling module, heap) -> live bytes at the end


def parse_truth(lines: list[list[str]]) -> GroundTruth:
    """The fake game's `gt ...` lines (split into words)."""
    gt = GroundTruth({}, {}, {}, {})
    for w in lines:
        if w[:2] == ["gt", "hook"]:
            gt.hooks[w[2]] = (int(w[3]), int(w[4]))
        elif w[:2] == ["gt", "heap"]:
            gt.heaps[w[2]] = int(w[3])
        elif w[:2] == ["gt", "module"]:
            gt.modules[w[2]] = int(w[3])
        elif w[:2] == ["gt", "live"]:
            gt.live[(w[2], w[3])] = int(w[4])
    return gt
