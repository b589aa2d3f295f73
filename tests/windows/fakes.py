"""Build the PE fakes of the Windows lane with i686-w64-mingw32-gcc and windres (no pytest here).

`build_pe_install(root)` fills a game directory like a real install:
    FalloutNV.exe               1.4.0.525 (fakes/game.c): entry points at the game's addresses
    nvse_loader.exe             fakes/loader.c: starts .\\FalloutNV.exe suspended, injects
    nvse_steam_loader.dll       fakes/steam_loader.c: what the loader injects
    nvhr_fake.dll               fakes/nvhr.c: patches the MemoryManager entries with JMPs
    Data/NVSE/Plugins/fnvplugin_msvcrt.dll, fnvplugin_ucrt.dll, fnvplugin_formheap.dll,
                      fnvplugin_late.dll  (fakes/plugin.c, built four ways)
and beside it `<root>-524/FalloutNV.exe` (1.4.0.524: to be refused) and `<root>-geck/GECK.exe`
(1.4.0.518, with its formheap plugin).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fnv.pebuild import version_rc  # noqa: E402

SRC = Path(__file__).resolve().parent / "fakes"
GCC = "i686-w64-mingw32-gcc"
WINDRES = "i686-w64-mingw32-windres"
# -fno-omit-frame-pointer: every entry starts with a real prologue (push ebp; mov ebp, esp);
# -fno-toplevel-reorder keeps the .org padding next to its function; -nostdlib: no CRT start-up.
CFLAGS = ["-O1", "-fno-omit-frame-pointer", "-falign-functions=1", "-fno-toplevel-reorder",
          "-ffreestanding", "-nostdlib", "-s", "-Wall", "-Werror", f"-I{SRC}"]
LIBS = ["-lkernel32", "-lgcc"]
PLUGINS = {"fnvplugin_msvcrt.dll": "VIA_MSVCRT", "fnvplugin_ucrt.dll": "VIA_UCRT",
           "fnvplugin_formheap.dll": "VIA_FORMHEAP", "fnvplugin_late.dll": "VIA_MSVCRT"}


@dataclass(frozen=True)
class PeInstall:
    root: Path

    @property
    def game(self) -> Path:
        return self.root / "FalloutNV.exe"

    @property
    def plugins_dir(self) -> Path:
        return self.root / "Data" / "NVSE" / "Plugins"

    @property
    def old_game(self) -> Path:
        return self.root.with_name(self.root.name + "-524") / "FalloutNV.exe"

    @property
    def geck_root(self) -> Path:
        return self.root.with_name(self.root.name + "-geck")


def mingw_problem() -> str | None:
    missing = [t for t in (GCC, WINDRES) if shutil.which(t) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (bash tests/windows/setup.sh)"


def _run(args: list[str], cwd: Path) -> None:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr}")


PAGE_RE = re.compile(r'PAGE_AT \((\w{8}),|"\.fnv_(\w{8})"')


def _section_starts(source: Path, geck: bool) -> list[str]:
    """--section-start for each page the source places (PAGE_AT and the heap object's page),
    taking the `#ifdef FAKE_GECK` / `#else` half that is compiled."""
    text = source.read_text()
    kept = []
    for n, chunk in enumerate(text.split("#ifdef FAKE_GECK")):
        if n == 0:
            kept.append(chunk)
            continue
        yes, _, rest = chunk.partition("#else")
        no, _, after = rest.partition("#endif")
        kept += [yes if geck else no, after]
    pages = {a or b for a, b in PAGE_RE.findall("".join(kept))}
    return [f"-Wl,--section-start=.fnv_{p}=0x{p}" for p in sorted(pages)]


def _exe(out: Path, source: str, entry: str, version: str | None, product: str,
         defines: list[str], fixed: bool) -> None:
    objs = []
    if version is not None:
        rc = out.with_suffix(".rc")
        rc.write_text(version_rc(version, product))
        _run([WINDRES, str(rc), "-O", "coff", "-o", str(rc.with_suffix(".res.o"))], out.parent)
        objs.append(str(rc.with_suffix(".res.o")))
        rc.unlink()
    layout = []
    if fixed:  # the game's own layout: base 0x400000, no ASLR, .text after the FormHeap page
        layout = ["-Wl,--image-base=0x400000", "-Wl,--disable-dynamicbase",
                  "-Wl,--section-start=.text=0x00402000",
                  *_section_starts(SRC / source, "-DFAKE_GECK" in defines)]
    _run([GCC, *CFLAGS, *defines, str(SRC / source), *objs, "-o", str(out), f"-Wl,-e,_{entry}",
          "-Wl,--subsystem,console", *layout, *LIBS], out.parent)
    for o in objs:
        Path(o).unlink()


def _dll(out: Path, source: str, defines: list[str], libs: tuple[str, ...] = ()) -> None:
    _run([GCC, *CFLAGS, *defines, "-shared", str(SRC / source), "-o", str(out),
          "-Wl,-e,_DllMain@12", *libs, *LIBS], out.parent)


def build_pe_install(root: Path) -> PeInstall:
    """Compile everything (once: a complete build in `root` is reused)."""
    inst = PeInstall(root)
    done = root / ".built"
    if done.exists():
        return inst
    inst.plugins_dir.mkdir(parents=True, exist_ok=True)
    _exe(inst.game, "game.c", "game_main", "1.4.0.525", "Fallout: New Vegas", [], True)
    _exe(root / "nvse_loader.exe", "loader.c", "loader_main", None, "", [], False)
    _dll(root / "nvse_steam_loader.dll", "steam_loader.c", [])
    _dll(root / "nvhr_fake.dll", "nvhr.c", [])
    for name, via in PLUGINS.items():
        _dll(inst.plugins_dir / name, "plugin.c", [f"-D{via}", f'-DPLUGIN_NAME="{name}"'],
             ("-lmsvcrt",) if via == "VIA_MSVCRT" else ())
    inst.old_game.parent.mkdir(parents=True, exist_ok=True)
    _exe(inst.old_game, "game.c", "game_main", "1.4.0.524", "Fallout: New Vegas", [], True)
    geck_plugins = inst.geck_root / "Data" / "NVSE" / "Plugins"
    geck_plugins.mkdir(parents=True, exist_ok=True)
    _exe(inst.geck_root / "GECK.exe", "game.c", "game_main", "1.4.0.518",
         "Garden of Eden Creation Kit", ["-DFAKE_GECK"], True)
    _dll(geck_plugins / "fnvplugin_formheap.dll", "plugin.c",
         ["-DVIA_FORMHEAP", "-DFAKE_GECK", '-DPLUGIN_NAME="fnvplugin_formheap.dll"'])
    done.write_text("ok\n")
    return inst


if __name__ == "__main__":
    print(build_pe_install(Path(sys.argv[1]).resolve()).root)
