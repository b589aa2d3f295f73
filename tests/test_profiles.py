"""Hook profiles: the bundled ones load, every bad field is refused with one line naming it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nvse_monitor.capture.hookprofile import (
    ProfileError,
    list_profiles,
    load_profile,
    parse_profile,
    select_profile,
)

HEADER = """
[profile]
name = "t"
platform = "windows"
arch = ["ia32"]
executable = ["FalloutNV.exe"]
"""

HOOK = """
[[hook]]
name = "alloc"
heap = "game"
role = "alloc"
module = "FalloutNV.exe"
offset = 0x1000
abi = "thiscall"
nargs = 1
args = { size = 0 }
"""


def parse(text: str, source: str = "t.toml"):
    return parse_profile(textwrap.dedent(text), source)


def test_bundled_linux_libc_is_valid_and_complete():
    p = load_profile("linux-libc")
    names = [h.name for h in p.hooks]
    for fn in ("malloc", "free", "calloc", "realloc", "posix_memalign", "aligned_alloc",
               "memalign"):
        assert fn in names
        assert next(h for h in p.hooks if h.name == fn).required
    assert p.platform == "linux" and set(p.arch) == {"x64", "ia32"}
    pm = next(h for h in p.hooks if h.name == "posix_memalign")
    assert pm.args == {"out": 0, "align": 1, "size": 2} and pm.nargs == 3
    assert not next(h for h in p.hooks if h.name == "valloc").required
    j = p.to_agent_json()
    assert j["hooks"][0] == {"name": "malloc", "heap": "libc", "role": "alloc", "abi": "default",
                             "args": {"size": 0}, "nargs": 1, "required": True,
                             "module": "libc.so.6", "export": "malloc"}
    assert [h.name for h in p.hook_infos()] == names


def test_list_and_select():
    names = [p.name for p in list_profiles()]
    assert "linux-libc" in names and names == sorted(names)
    assert select_profile("anything", "linux", "x64").name == "linux-libc"
    assert select_profile("a.out", "linux", "ia32").name == "linux-libc"
    fnv = select_profile("FalloutNV.exe", "windows", "ia32")
    assert fnv.matches_executable("falloutnv.exe") and fnv.platform == "windows"
    with pytest.raises(ProfileError, match="no bundled profile fits target other.exe"):
        select_profile("other.exe", "windows", "ia32")  # no generic Windows profile
    with pytest.raises(ProfileError, match="no bundled profile fits target a.out"):
        select_profile("a.out", "linux", "arm64")


def test_every_bundled_profile_is_valid():
    for p in list_profiles():
        assert p.hooks and p.source.startswith("<bundled>/")
        assert len({h.name for h in p.hooks}) == len(p.hooks)


def test_select_prefers_profile_naming_the_executable(monkeypatch):
    import nvse_monitor.capture.hookprofile as hp

    generic = parse(HEADER.replace('executable = ["FalloutNV.exe"]', "executable = []") + HOOK)
    fnv = parse(HEADER + HOOK)
    monkeypatch.setattr(hp, "list_profiles", lambda: [generic, fnv])
    assert hp.select_profile("falloutnv.EXE", "windows", "ia32") is fnv
    assert hp.select_profile("other.exe", "windows", "ia32") is generic


def test_user_file_and_errors_name_the_file(tmp_path: Path):
    f = tmp_path / "mine.toml"
    f.write_text(textwrap.dedent(HEADER + HOOK))
    assert load_profile(f).hooks[0].abi == "thiscall"
    assert load_profile(str(f)).source == str(f)
    with pytest.raises(ProfileError, match=r"nope\.toml: no such profile file.*linux-libc"):
        load_profile(tmp_path / "nope.toml")
    f.write_text("[profile\n")
    with pytest.raises(ProfileError, match=r"mine\.toml.*invalid TOML"):
        load_profile(f)


def test_check_target():
    p = parse(HEADER + HOOK)
    p.check_target("FalloutNV.exe", "windows", "ia32")
    p.check_target("falloutnv.exe", "windows", "ia32")
    with pytest.raises(ProfileError, match="is for executable FalloutNV.exe, but the target is "
                                           "Fallout3.exe"):
        p.check_target("Fallout3.exe", "windows", "ia32")
    p.check_target("Fallout3.exe", "windows", "ia32", force=True)
    with pytest.raises(ProfileError, match="platform windows, but target x runs on linux"):
        p.check_target("x", "linux", "ia32", force=True)
    with pytest.raises(ProfileError, match="arch ia32, but target FalloutNV.exe is x64"):
        p.check_target("FalloutNV.exe", "windows", "x64", force=True)


BAD_CASES = [
    # (replace in HEADER+HOOK, text expected in the one-line error)
    ('role = "alloc"', 'role = "alocc"', "hook 'alloc': field 'role': unknown role 'alocc'"),
    ('abi = "thiscall"', 'abi = "pascal"', "field 'abi': unknown ABI 'pascal'"),
    ('heap = "game"\n', "", "hook 'alloc': field 'heap': missing"),
    ("nargs = 1\n", "", "field 'nargs': required with ABI thiscall"),
    ("args = { size = 0 }", "args = { size = 1 }", "argument position 1 does not fit nargs = 1"),
    ("args = { size = 0 }", "args = { ptr = 0 }", "field 'args.ptr': argument 'ptr' does not fit "
                                                 "role alloc"),
    ("args = { size = 0 }", "args = { }", "field 'args.size': role alloc needs argument 'size'"),
    ("args = { size = 0 }\n", "", "field 'args': missing"),
    ("args = { size = 0 }", 'args = { size = "0" }', "field 'args.size': must be an integer"),
    ("offset = 0x1000", "offset = -4", "field 'offset'"),
    ("offset = 0x1000", "address = 0x401000",
     "field 'module': an absolute address takes no module"),
    ('module = "FalloutNV.exe"\noffset = 0x1000', "address = 0x10",
     "field 'address': 0x10 is out of range"),
    ('module = "FalloutNV.exe"\noffset = 0x1000', "address = 0x100000000",
     "field 'address': 0x100000000 is out of range"),
    ("offset = 0x1000", 'offset = 0x1000\nexport = "f"', "give exactly one of export, offset"),
    ("offset = 0x1000", "", "give exactly one of export, offset, address"),
    ('module = "FalloutNV.exe"\n', "", "field 'module': missing"),
    ("nargs = 1", "nargs = 1\ncolour = 3", "field 'colour': unknown field"),
    ("nargs = 1", "nargs = 1\nrequired = 1", "field 'required': must be true or false"),
    ('platform = "windows"', 'platform = "macos"', "field 'profile.platform': unknown platform"),
    ('arch = ["ia32"]', 'arch = ["arm64"]', "field 'profile.arch': unknown arch 'arm64'"),
    ('arch = ["ia32"]', "arch = []", "field 'profile.arch': must list at least one arch"),
    ('arch = ["ia32"]', 'arch = ["x64"]', "field 'abi': ABI thiscall exists only on ia32"),
    ('name = "t"\n', "", "field 'profile.name': missing"),
    ('name = "t"', 'name = "t"\nversion = 2', "field 'profile.version': unknown field"),
]


@pytest.mark.parametrize(("old", "new", "expect"), BAD_CASES)
def test_bad_field_is_one_line_naming_file_hook_field(old, new, expect):
    text = HEADER + HOOK
    assert old in text
    with pytest.raises(ProfileError) as info:
        parse(text.replace(old, new, 1), "bad.toml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("bad.toml")
    assert expect in msg


def test_duplicate_names_and_positions():
    with pytest.raises(ProfileError, match="hook 'alloc': field 'name': duplicate hook name"):
        parse(HEADER + HOOK + HOOK)
    two = HOOK.replace('role = "alloc"', 'role = "calloc"').replace(
        "args = { size = 0 }", "args = { count = 0, size = 0 }")
    with pytest.raises(ProfileError, match="two arguments at the same position"):
        parse(HEADER + two)


def test_missing_tables():
    with pytest.raises(ProfileError, match="missing \\[profile\\] table"):
        parse(HOOK)
    with pytest.raises(ProfileError, match="no \\[\\[hook\\]\\] entries"):
        parse(HEADER)
    with pytest.raises(ProfileError, match="unknown table \\[hooks\\]"):
        parse(HEADER + HOOK.replace("[[hook]]", "[[hooks]]"))


def test_every_role_and_default_nargs():
    text = HEADER.replace('arch = ["ia32"]', 'arch = ["x64", "ia32"]')
    roles = {
        "alloc": "{ size = 0 }", "calloc": "{ count = 0, size = 1 }",
        "realloc": "{ ptr = 0, size = 1 }", "free": "{ ptr = 0 }",
        "aligned_alloc": "{ size = 0, align = 1 }",
        "posix_memalign": "{ out = 0, align = 1, size = 2 }",
        "aligned_free": "{ ptr = 0 }", "size": "{ ptr = 0 }",
    }
    for role, args in roles.items():
        text += textwrap.dedent(f"""
            [[hook]]
            name = "{role}"
            heap = "h"
            role = "{role}"
            module = "x*.dll"
            export = "{role}"
            args = {args}
            """)
    p = parse(text)
    assert [h.role for h in p.hooks] == list(roles)
    assert [h.nargs for h in p.hooks] == [1, 2, 2, 1, 2, 3, 1, 1]
    assert all(h.abi == "default" and h.required for h in p.hooks)
    assert p.hooks[0].where() == "x*.dll!alloc"
