"""Function names on the Windows path (issue 11, docs/symbols.md): the fake plugin DLLs are
stripped mingw builds whose leaking function, `plugin_run`, is an export. Attached to the fake
game and stopped with Ctrl-C, the leak report must name it (dbghelp's exports under Wine, via
the agent's symbolize RPC), with the offset within it; and the names must be in the recording
(replayed on Linux: the same leaks CSV)."""

from __future__ import annotations

import io
from pathlib import Path

import pefile

from nvse_monitor.engine import leaks
from nvse_monitor.outputs.pipeline import replay
from windows.fakes import PeInstall
from windows.test_win_sessions import _attach


def _export(dll: Path, name: str) -> int:
    pe = pefile.PE(str(dll), fast_load=False)
    for e in pe.DIRECTORY_ENTRY_EXPORT.symbols:
        if e.name and e.name.decode() == name:
            return int(e.address)
    raise AssertionError(f"{name} is not exported by {dll.name}")


def test_plugin_export_named_in_the_leak_report(pe: PeInstall, tmp_path: Path) -> None:
    _check_named(pe, tmp_path)


def test_with_a_pdb_file_next_to_the_plugin(pe: PeInstall, tmp_path: Path) -> None:
    """A `.pdb` next to the DLL sends the agent through dbghelp (loaded by the agent, deferred
    loads set first). This one is not a real PDB (no MSVC here): dbghelp falls back to the
    exports, and the names must be the same."""
    pdb = pe.plugins_dir / "fnvplugin_msvcrt.pdb"
    pdb.write_bytes(b"Microsoft C/C++ MSF 7.00\r\n\x1aDS\0\0\0")
    try:
        _check_named(pe, tmp_path)
    finally:
        pdb.unlink()


def _check_named(pe: PeInstall, tmp_path: Path) -> None:
    mon, _truth, game_rc = _attach(pe, tmp_path, "FalloutNV.exe")
    assert game_rc == 0
    out = tmp_path / "out"
    rep = leaks.read_csv(out / "MemoryPoolNVSE_leaks.csv")
    plugin = "fnvplugin_msvcrt.dll"
    start = _export(pe.plugins_dir / plugin, "plugin_run")  # RVA of the export
    sites = [g for g in rep.sites if g.module == plugin]
    assert sites, rep.sites
    for g in sites:  # every leaking call of the plugin lies in plugin_run, after its start
        assert g.offset is not None and g.offset > start
        assert g.function == f"plugin_run+0x{g.offset - start:x}", (g, mon.stderr[-1500:])
    log = (out / "MemoryPoolNVSE_rpmalloc.log").read_text(errors="replace")
    assert f"Live at end from {plugin}!plugin_run+0x" in log
    assert "Function names unavailable" not in log
    # the recording holds the names: a replay on this side gives the same leaks CSV
    replay(tmp_path / "a.nvmrec", tmp_path / "r", err=io.StringIO())
    got = (tmp_path / "r" / "MemoryPoolNVSE_leaks.csv").read_text()
    assert got.splitlines() == (out / "MemoryPoolNVSE_leaks.csv").read_text().splitlines()
