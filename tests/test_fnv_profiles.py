"""The bundled Fallout New Vegas / GECK profiles: they load, fit the reference addresses, hook one
level of the game heap only, and the variant and test profiles stay in step with the base."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from fnv.fakeprofile import MODULES, fake_hooks, fake_profile_toml

from nvse_monitor.capture.hookprofile import (
    HookSpec,
    Profile,
    list_profiles,
    load_profile,
    select_profile,
)

REPO = Path(__file__).resolve().parent.parent
# The project's FNV reference (addresses, ABIs, sources), kept in the repo so CI checks against
# it; the shared original next to the repo, when present, must be the same text.
REFERENCE = REPO / "fixtures" / "reference" / "fnv-entry-points.md"
SHARED_REFERENCE = REPO.parent / "shared" / "reference" / "fnv-entry-points.md"
FNV = "fnv-1.4.0.525"
ALL = [FNV, f"{FNV}-noscrap", f"{FNV}-win32", "geck-1.4.0.518"]
DLL_EXPORTS = {"malloc", "free", "calloc", "realloc", "_aligned_malloc", "_aligned_realloc",
               "_aligned_free", "_msize", "_recalloc"}


@pytest.fixture(scope="module")
def base() -> Profile:
    return load_profile(FNV)


@pytest.mark.parametrize("name", ALL)
def test_profile_loads(name: str) -> None:
    p = load_profile(name)
    assert p.platform == "windows" and p.arch == ("ia32",)
    assert p.pe_version in ("1.4.0.525", "1.4.0.518")
    assert p.name == name
    assert name in {q.name for q in list_profiles()}


def test_selected_by_executable() -> None:
    assert select_profile("FalloutNV.exe", "windows", "ia32").name == FNV
    assert select_profile("falloutnv.EXE", "windows", "ia32").name == FNV
    assert select_profile("GECK.exe", "windows", "ia32").name == "geck-1.4.0.518"


def _addr_hooks(p: Profile) -> dict[int, HookSpec]:
    return {h.address: h for h in p.hooks if h.address is not None}


def test_game_heap_is_thiscall_with_exact_argument_counts(base: Profile) -> None:
    want = {"alloc": 1, "free": 1, "realloc": 2, "size": 1, "aligned_alloc": 2}
    for h in base.hooks:
        if h.role == "wrapper":  # FormHeap_*, Ni_*, operator new/delete: cdecl
            assert h.abi == "cdecl", h.name
        elif h.heap in ("game", "scrap"):
            assert h.abi == "thiscall", h.name
            assert h.nargs == want[h.role], h.name  # the callee pops exactly these
        elif h.heap in ("crt", "dll-crt"):
            assert h.abi == "cdecl", h.name


def test_one_level_of_the_game_heap(base: Profile) -> None:
    """FormHeap_Allocate/Free wrap MemoryManager: recording both would count twice, so they
    are wrappers (attribution only, issue 11)."""
    by_addr = _addr_hooks(base)
    assert {by_addr[a].role for a in (0x00401000, 0x00401030, 0x00AA13E0, 0x00AA1460)} \
        == {"wrapper"}
    geck = _addr_hooks(load_profile("geck-1.4.0.518"))
    assert {geck[a].role for a in (0x00401000, 0x00401180)} == {"wrapper"}
    assert {0x00AA3E40, 0x00AA4060, 0x00AA4150, 0x00AA4200} <= set(_addr_hooks(base))


def test_uncertain_entries_are_optional(base: Profile) -> None:
    by_addr = _addr_hooks(base)
    for a in (0x00AA4200, 0x00ED0CDF, 0x00ED0D24, 0x00ED0D70, 0x00ED0DBE):
        assert not by_addr[a].required, hex(a)
    assert by_addr[0x00AA3E40].required


@pytest.mark.parametrize("name", [FNV, "geck-1.4.0.518"])
def test_addresses_are_in_the_reference(name: str) -> None:
    ref = {int(a, 16) for a in re.findall(r"0x([0-9A-Fa-f]{8})", REFERENCE.read_text())}
    for a, h in _addr_hooks(load_profile(name)).items():
        assert a in ref, f"{h.name} at {a:#010x} is not in {REFERENCE.name}"


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason=f"{SHARED_REFERENCE} not present")
def test_reference_copy_is_current() -> None:
    assert REFERENCE.read_text() == SHARED_REFERENCE.read_text(), \
        f"copy {SHARED_REFERENCE} to {REFERENCE}"


# Reference entries deliberately not in the profiles, and why (docs/fnv.md).
NOT_HOOKED = {
    "MemoryManager::GetThreadScrapHeap": "returns the thread's scrap heap, allocates nothing",
}
# reference function name -> profile role (the scrap heap's Allocate takes an alignment)
REF_ROLES = {"Allocate": "alloc", "Free": "free", "Deallocate": "free", "Reallocate": "realloc",
             "second reallocate entry": "realloc", "Size": "size", "malloc": "alloc",
             "calloc": "calloc", "realloc": "realloc", "free": "free", "_msize": "size",
             "_recalloc": "recalloc"}


def _sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


def reference_entries(text: str, exe: str) -> list[tuple[str, int, str, str, str]]:
    """(name, address, heap, role, abi) of every allocator entry point the reference lists for
    FalloutNV.exe ("fnv") or GECK.exe ("geck")."""
    sec = _sections(text)
    out: list[tuple[str, int, str, str, str]] = []

    def add(name: str, addr: str, heap: str, abi: str) -> None:
        short = name.split("::")[-1]
        role = "aligned_alloc" if heap == "scrap" and short == "Allocate" else REF_ROLES.get(short)
        out.append((name, int(addr, 16), heap, role or "?", abi))

    if exe == "fnv":
        for title, heap in (("Game heap", "game"), ("Scrap heap", "scrap")):
            body = next(v for k, v in sec.items() if k.startswith(title))
            for name, addr, abi in re.findall(r"^\| ([^|]+?) \| (0x[0-9A-F]{8}) \| (\w+)", body,
                                              re.M):
                add(name, addr, heap, abi)
        body = next(v for k, v in sec.items() if k.startswith("Statically linked CRT"))
        for name, first, second in re.findall(
                r"^\| (\w+) \| (0x[0-9A-F]{8}) \| (0x[0-9A-F]{8})? *\|", body, re.M):
            add(name, first, "crt", "cdecl")
            if second:
                add(name, second, "crt", "cdecl")
    else:
        body = sec["GECK.exe 1.4.0.518"]
        mm, rest = body.split("ScrapHeap", 1)
        scrap = rest.split("FormHeap_Allocate", 1)[0]
        for part, heap in ((mm, "game"), (scrap, "scrap")):
            for name, addr in re.findall(r"(Allocate|Reallocate|Deallocate|Size) (0x[0-9A-F]{8})",
                                         part):
                add(("MemoryManager::" if heap == "game" else "ScrapHeap::") + name, addr, heap,
                    "thiscall")
    return out


@pytest.mark.parametrize("name,exe,count", [(FNV, "fnv", 19), ("geck-1.4.0.518", "geck", 7)])
def test_every_reference_entry_point_is_in_the_profile(name: str, exe: str, count: int) -> None:
    """Each allocator entry point of the reference (MemoryManager Allocate / Free / both
    Reallocate entries / Size, the scrap heap's, the static CRT's with their second entries) is
    a hook at that address with the right heap, role and ABI; the exceptions are named."""
    entries = reference_entries(REFERENCE.read_text(), exe)
    assert len(entries) == count, entries  # the parse found every row
    by_addr = _addr_hooks(load_profile(name))
    for ref, addr, heap, role, abi in entries:
        if ref.split("::")[-1] in NOT_HOOKED or ref in NOT_HOOKED:
            assert addr not in by_addr, ref
            continue
        h = by_addr.get(addr)
        assert h is not None, f"{ref} at {addr:#010x} is not in {name}"
        assert (h.heap, h.role, h.abi) == (heap, role, abi), (ref, h)


@pytest.mark.parametrize("name", [FNV, "geck-1.4.0.518"])
def test_plugin_crt_hooks(name: str) -> None:
    p = load_profile(name)
    dll = [h for h in p.hooks if h.heap == "dll-crt" and h.role != "wrapper"]
    ops = {h.export for h in p.hooks if h.heap == "dll-crt" and h.role == "wrapper"}
    assert ops == {"??2@YAPAXI@Z", "??3@YAXPAX@Z", "??_U@YAPAXI@Z", "??_V@YAXPAX@Z"}
    assert {h.module for h in dll} == {"ucrtbase.dll", "msvcr*.dll"}
    for mod in ("ucrtbase.dll", "msvcr*.dll"):
        assert {h.export for h in dll if h.module == mod} == DLL_EXPORTS
    assert all(not h.required and h.abi == "cdecl" for h in dll)


def _same(a: HookSpec, b: HookSpec) -> bool:
    return dataclasses.asdict(a) == dataclasses.asdict(b)


def test_noscrap_is_base_without_scrap(base: Profile) -> None:
    v = load_profile(f"{FNV}-noscrap")
    want = [h for h in base.hooks if h.heap != "scrap"]
    assert len(v.hooks) == len(want) and all(map(_same, v.hooks, want))
    assert v.executable == base.executable and v.pe_version == base.pe_version


def test_win32_is_base_plus_kernel32(base: Profile) -> None:
    v = load_profile(f"{FNV}-win32")
    n = len(base.hooks)
    assert all(map(_same, v.hooks[:n], base.hooks))
    extra = v.hooks[n:]
    assert {h.export for h in extra} == {"HeapAlloc", "HeapReAlloc", "HeapFree", "HeapSize",
                                        "VirtualAlloc", "VirtualFree"}
    assert all(h.abi == "stdcall" and not h.required and h.module == "kernel32.dll"
               for h in extra)
    assert not {h.heap for h in extra} & {h.heap for h in base.hooks}
    assert not any(h.module == "kernel32.dll" for h in base.hooks)  # off by default


def test_fake_profile_is_generated_from_base(base: Profile) -> None:
    path = REPO / "tests" / "profiles" / "fake-fnv.toml"
    assert path.read_text() == fake_profile_toml(base), \
        "regenerate: python tests/fnv/fakeprofile.py > tests/profiles/fake-fnv.toml"
    fake = load_profile(path)
    assert fake.platform == "linux" and fake.pe_version is None
    want = fake_hooks(base)
    assert len(fake.hooks) == len(want)
    for f, b in zip(fake.hooks, want, strict=True):
        assert f.module == MODULES.get(b.module, b.module)
        assert _same(dataclasses.replace(f, module=b.module, address=b.address), b)
        assert f.address == b.address or b.role == "wrapper"
    assert {h.address for h in fake.hooks if h.name.startswith("FormHeap")} \
        == {0x00A01000, 0x00A01030}
