"""PE version reading and the profile version check (nvse_monitor/capture/pe.py), on PE images
the tests write byte by byte (tests/fnv/pebuild.py) and, when mingw is installed, on one it
builds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fnv.pebuild import build_pe, version_rc

from nvse_monitor.capture.fnv import plan_launch
from nvse_monitor.capture.hookprofile import load_profile
from nvse_monitor.capture.pe import PeError, check_profile_version, is_pe, read_pe_version
from nvse_monitor.cli.live import _large_address_aware

FNV = load_profile("fnv-1.4.0.525")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("version", ["1.4.0.525", "1.4.0.523", "65535.0.1.65534"])
def test_reads_file_version(tmp_path: Path, version: str) -> None:
    exe = _write(tmp_path, "FalloutNV.exe", build_pe(version, product_version="1.4.0.0",
                                                     strings={"ProductName": "Fallout NV"}))
    info = read_pe_version(exe)
    assert info.file_version == version
    assert info.product_version == "1.4.0.0"
    assert info.machine == "ia32"
    assert info.strings == {"ProductName": "Fallout NV"}
    assert not info.large_address_aware


def test_large_address_aware_flag(tmp_path: Path) -> None:
    data = bytearray(build_pe("1.4.0.525"))
    chars = 0x40 + 4 + 18  # COFF Characteristics (after the PE signature)
    data[chars] |= 0x20
    assert read_pe_version(_write(tmp_path, "a.exe", bytes(data))).large_address_aware


def test_matching_version_passes(tmp_path: Path) -> None:
    exe = _write(tmp_path, "FalloutNV.exe", build_pe("1.4.0.525"))
    assert check_profile_version(FNV, exe) is None


def test_other_version_refused_naming_both(tmp_path: Path) -> None:
    exe = _write(tmp_path, "FalloutNV.exe", build_pe("1.4.0.523"))
    with pytest.raises(PeError) as e:
        check_profile_version(FNV, exe)
    msg = str(e.value)
    assert "1.4.0.525" in msg and "1.4.0.523" in msg and "--force" in msg
    assert "\n" not in msg
    note = check_profile_version(FNV, exe, force=True)
    assert note is not None and "1.4.0.523" in note and "forced" in note


def test_no_version_resource_refused(tmp_path: Path) -> None:
    exe = _write(tmp_path, "FalloutNV.exe", build_pe(None))
    assert read_pe_version(exe).file_version is None
    with pytest.raises(PeError, match="no version resource"):
        check_profile_version(FNV, exe)


def test_non_pe_refused_unless_forced(tmp_path: Path) -> None:
    elf = _write(tmp_path, "fake_game", b"\x7fELF" + b"\0" * 200)
    assert not is_pe(elf)
    with pytest.raises(PeError, match="not a PE executable.*1.4.0.525"):
        check_profile_version(FNV, elf)
    assert "forced" in (check_profile_version(FNV, elf, force=True) or "")


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    cut = _write(tmp_path, "cut.exe", build_pe("1.4.0.525")[:0x100])
    with pytest.raises(PeError, match="cut.exe"):
        read_pe_version(cut)
    with pytest.raises(PeError, match="cannot read"):
        read_pe_version(tmp_path / "absent.exe")


def test_profile_without_version_never_checks(tmp_path: Path) -> None:
    libc = load_profile("linux-libc")
    assert check_profile_version(libc, tmp_path / "absent") is None


def test_geck_profile_version(tmp_path: Path) -> None:
    geck = load_profile("geck-1.4.0.518")
    assert check_profile_version(geck, _write(tmp_path, "GECK.exe", build_pe("1.4.0.518"))) is None
    with pytest.raises(PeError, match="1.4.0.518.*1.4.0.525"):
        check_profile_version(geck, _write(tmp_path, "x.exe", build_pe("1.4.0.525")))


@pytest.mark.parametrize("build,laa", [(525, False), (523, False), (525, True)])
def test_mingw_built_exe(tmp_path: Path, build: int, laa: bool) -> None:
    """A real linker's output (i686-w64-mingw32), not only our own writer's; `laa`: linked
    large-address-aware like a 4GB-patched FalloutNV.exe, which `launch` starts directly."""
    gcc, windres = shutil.which("i686-w64-mingw32-gcc"), shutil.which("i686-w64-mingw32-windres")
    if not gcc or not windres:
        pytest.skip("gcc-mingw-w64-i686 is not installed (apt-get install gcc-mingw-w64-i686)")
    (tmp_path / "v.rc").write_text(version_rc(f"1.4.0.{build}"))
    (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
    subprocess.run([windres, "v.rc", "-O", "coff", "-o", "v.o"], cwd=tmp_path, check=True)
    flags = ["-Wl,--large-address-aware"] if laa else []
    subprocess.run([gcc, "-o", "FalloutNV.exe", "m.c", "v.o", *flags], cwd=tmp_path, check=True)
    exe = tmp_path / "FalloutNV.exe"
    info = read_pe_version(exe)
    assert info.file_version == f"1.4.0.{build}"
    assert info.strings.get("ProductName") == "Fallout: New Vegas"
    assert info.machine == "ia32" and info.large_address_aware is laa
    assert _large_address_aware(tmp_path) is laa  # what `launch` asks
    (tmp_path / "nvse_loader.exe").write_bytes(exe.read_bytes())
    assert plan_launch(tmp_path, env={}, large_address_aware=laa).mode == \
        ("direct" if laa else "loader")
    if build == 525:
        assert check_profile_version(FNV, exe) is None
    else:
        with pytest.raises(PeError, match="1.4.0.523"):
            check_profile_version(FNV, exe)
