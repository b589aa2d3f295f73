"""Minimal 32-bit PE images with a VERSIONINFO resource, written byte by byte for the tests.

Enough for pefile (and Windows' version APIs) to read a FileVersion/ProductVersion and a
StringFileInfo table: one .rsrc section, no code. Used by tests/test_fnv_pe.py so the PE version
check is tested without a Windows toolchain (a mingw-built image is tested too when
i686-w64-mingw32-gcc is installed).
"""

from __future__ import annotations

import struct

FILE_ALIGN = 0x200
SECT_ALIGN = 0x1000
RT_VERSION = 16


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _wstr(s: str) -> bytes:
    return (s + "\0").encode("utf-16-le")


def _node(key: str, value: bytes, value_len: int, vtype: int, children: bytes = b"") -> bytes:
    """One VERSIONINFO block: wLength, wValueLength, wType, szKey, pad, value, pad, children."""
    head = struct.pack("<HHH", 0, value_len, vtype) + _wstr(key)
    body = _pad4(head) + value
    if children:
        body = _pad4(body) + children
    return struct.pack("<H", len(body)) + body[2:]


def _version_words(v: str) -> tuple[int, int]:
    a, b, c, d = (int(x) for x in v.split("."))
    return (a << 16) | b, (c << 16) | d


def version_resource(file_version: str, product_version: str | None = None,
                     strings: dict[str, str] | None = None) -> bytes:
    """A VS_VERSIONINFO blob."""
    fms, fls = _version_words(file_version)
    pms, pls = _version_words(product_version or file_version)
    fixed = struct.pack("<13I", 0xFEEF04BD, 0x00010000, fms, fls, pms, pls,
                        0x3F, 0, 0x40004, 1, 0, 0, 0)
    children = b""
    if strings:
        entries = b"".join(_pad4(_node(k, _wstr(v), len(v) + 1, 1)) for k, v in strings.items())
        table = _node("040904b0", b"", 0, 1, entries)
        children += _pad4(_node("StringFileInfo", b"", 0, 1, _pad4(table)))
    return _node("VS_VERSION_INFO", fixed, len(fixed), 0, children)


VERSION_RC = """1 VERSIONINFO
FILEVERSION {commas}
PRODUCTVERSION {commas}
BEGIN
  BLOCK "StringFileInfo"
  BEGIN
    BLOCK "040904b0"
    BEGIN
      VALUE "ProductName", "{product}\\0"
    END
  END
END
"""


def version_rc(version: str, product: str = "Fallout: New Vegas") -> str:
    """A windres script for a VERSIONINFO resource (for images linked by mingw)."""
    return VERSION_RC.format(commas=version.replace(".", ","), product=product)


def _rsrc_section(blob: bytes, rva: int) -> bytes:
    """Resource tree type 16 -> id 1 -> lang 0x409 -> data entry -> blob."""
    def directory(entry_id: int, offset: int, subdir: bool) -> bytes:
        return struct.pack("<IIHHHH", 0, 0, 4, 0, 0, 1) + struct.pack(
            "<II", entry_id, offset | (0x80000000 if subdir else 0))

    d1 = directory(RT_VERSION, 0x18, True)  # each directory is 16 + 8 bytes
    d2 = directory(1, 0x30, True)
    d3 = directory(0x409, 0x48, False)
    data_entry = struct.pack("<IIII", rva + 0x58, len(blob), 0, 0)
    return d1 + d2 + d3 + data_entry + blob


def build_pe(file_version: str | None, product_version: str | None = None,
             strings: dict[str, str] | None = None, machine: int = 0x14C) -> bytes:
    """A PE32 image; `file_version` None = no resource section at all."""
    rsrc_rva = SECT_ALIGN
    sections = []
    if file_version is not None:
        raw = _rsrc_section(version_resource(file_version, product_version, strings), rsrc_rva)
        sections.append((b".rsrc\0\0\0", raw))
    nsec = len(sections)
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)
    opt_size = 0xE0
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", machine, nsec, 0x4CE26B2B, 0, 0, opt_size, 0x0103)
    size_image = SECT_ALIGN + sum(-(-len(r) // SECT_ALIGN) * SECT_ALIGN for _, r in sections)
    opt = struct.pack(
        "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII",
        0x10B, 9, 0, 0, 0, 0, 0, 0, 0,  # magic, linker, code/data sizes, entry, bases
        0x00400000, SECT_ALIGN, FILE_ALIGN,
        5, 1, 0, 0, 5, 1, 0,  # os / image / subsystem versions, win32 version
        size_image, FILE_ALIGN, 0, 2, 0x8000,  # image size, headers, checksum, GUI, dll chars
        0x100000, 0x1000, 0x100000, 0x1000, 0, 16,  # stack/heap reserve/commit, flags, ndirs
    )
    dirs = [(0, 0)] * 16
    if sections:
        dirs[2] = (rsrc_rva, len(sections[0][1]))
    opt += b"".join(struct.pack("<II", *d) for d in dirs)
    assert len(opt) == opt_size
    shdrs = b""
    body = b""
    off = FILE_ALIGN
    for name, raw in sections:
        raw_size = -(-len(raw) // FILE_ALIGN) * FILE_ALIGN
        shdrs += struct.pack("<8sIIIIIIHHI", name, len(raw), rsrc_rva, raw_size, off,
                             0, 0, 0, 0, 0x40000040)
        body += raw + b"\0" * (raw_size - len(raw))
        off += raw_size
    head = bytes(dos) + coff + opt + shdrs
    return head + b"\0" * (FILE_ALIGN - len(head)) + body
