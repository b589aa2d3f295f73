"""The version of a Windows executable (its VERSIONINFO resource), and the profile version check.

A game profile names the executable version its addresses were taken from (`pe_version`, e.g.
FalloutNV.exe 1.4.0.525). Hooking absolute addresses in any other build would write over code
that is not the expected function, so the host reads the target's PE version first and refuses
a mismatch unless the user forces it (`--force`, which also lets a profile run on a non-PE test
build of the same layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pefile

from .hookprofile import Profile

_MACHINES = {0x14C: "ia32", 0x8664: "x64", 0xAA64: "arm64"}
_FORCE_HINT = "use --force to monitor it anyway"


class PeError(ValueError):
    """A file that is not a readable PE image, or a version that does not fit the profile."""


@dataclass(frozen=True)
class PeVersion:
    path: str
    machine: str  # ia32 | x64 | arm64 | 0x.... for others
    file_version: str | None  # VS_FIXEDFILEINFO FileVersion "a.b.c.d"; None without VERSIONINFO
    product_version: str | None
    strings: dict[str, str]  # StringFileInfo (ProductName, FileDescription, ...), may be empty
    large_address_aware: bool = False  # IMAGE_FILE_LARGE_ADDRESS_AWARE: a "4GB patched" game


def _dotted(ms: int, ls: int) -> str:
    return f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}"


def is_pe(path: str | Path) -> bool:
    """True when the file starts like a PE image (MZ header pointing at a PE signature)."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x40)
            if len(head) < 0x40 or head[:2] != b"MZ":
                return False
            f.seek(int.from_bytes(head[0x3C:0x40], "little"))
            return f.read(4) == b"PE\0\0"
    except OSError:
        return False


def read_pe_version(path: str | Path) -> PeVersion:
    """The version resource of a PE file. Raises PeError (one line naming the file) when it is
    not a readable PE image."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PeError(f"{p}: cannot read: {e.strerror or e}") from None
    if not is_pe(p):
        raise PeError(f"{p}: not a PE executable (no MZ/PE header)")
    try:
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(
            directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_RESOURCE"]])
    except pefile.PEFormatError as e:
        raise PeError(f"{p}: bad PE image: {e.value}") from None
    if len(pe.sections) != pe.FILE_HEADER.NumberOfSections:
        raise PeError(f"{p}: truncated or bad PE image ({len(pe.sections)} of "
                      f"{pe.FILE_HEADER.NumberOfSections} sections readable)")
    for sec in pe.sections:
        if sec.PointerToRawData + sec.SizeOfRawData > len(data):
            name = sec.Name.rstrip(b"\0").decode("ascii", "replace")
            raise PeError(f"{p}: truncated PE image (section {name} ends at "
                          f"{sec.PointerToRawData + sec.SizeOfRawData:#x}, file has "
                          f"{len(data):#x} bytes)")
    machine = _MACHINES.get(pe.FILE_HEADER.Machine, f"{pe.FILE_HEADER.Machine:#06x}")
    file_version = product_version = None
    fixed = getattr(pe, "VS_FIXEDFILEINFO", None) or []
    if fixed:
        ffi = fixed[0]
        file_version = _dotted(ffi.FileVersionMS, ffi.FileVersionLS)
        product_version = _dotted(ffi.ProductVersionMS, ffi.ProductVersionLS)
    strings: dict[str, str] = {}
    for info in getattr(pe, "FileInfo", None) or []:
        for entry in info:
            for table in getattr(entry, "StringTable", None) or []:
                for k, v in table.entries.items():
                    strings[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    laa = bool(pe.FILE_HEADER.Characteristics & 0x20)
    pe.close()
    return PeVersion(str(p), machine, file_version, product_version, strings, laa)


def check_profile_version(profile: Profile, exe_path: str | Path,
                          force: bool = False) -> str | None:
    """Refuse an executable whose PE version is not the one `profile` was made for.

    Returns None when it fits (or the profile names no version), a note for the log when
    `force` let a mismatch through; raises PeError naming both versions otherwise.
    """
    want = profile.pe_version
    if want is None:
        return None
    what = f"profile {profile.name!r} is for version {want}"
    try:
        got = read_pe_version(exe_path)
    except PeError as e:
        if force:
            return f"{e}; {what}: forced"
        raise PeError(f"{e}; {what} ({_FORCE_HINT})") from None
    if got.file_version == want:
        return None
    shown = got.file_version or "unknown (no version resource)"
    msg = f"{what}, but {got.path} is version {shown}"
    if force:
        return f"{msg}: forced"
    raise PeError(f"{msg} ({_FORCE_HINT})")
