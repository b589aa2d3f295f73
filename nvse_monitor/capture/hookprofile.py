"""Hook profiles: which allocator entry points the agent hooks, where, and how (TOML data).

A profile is data, never code (schema: docs/profiles.md). Every field is checked on load; a bad
one raises ProfileError with one line naming the file, the hook and the field.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..stream.messages import HookInfo

PLATFORMS = ("linux", "windows")
ARCHES = ("x64", "ia32")  # the hot path is x86 code (inline asm, rdtsc)
ABIS = ("default", "cdecl", "stdcall", "fastcall", "thiscall")
CALLEE_POPS = ("stdcall", "fastcall", "thiscall")  # the exact argument count matters
MAX_HOOKS = 256  # a record's `hook` field is one byte
MAX_ARGS = 16

# role -> (required argument names, optional argument names)
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alloc": (("size",), ()),
    "calloc": (("count", "size"), ()),
    "realloc": (("ptr", "size"), ()),
    "recalloc": (("ptr", "count", "size"), ()),  # MSVC _recalloc: realloc to count * size, zeroed
    "free": (("ptr",), ()),
    "aligned_alloc": (("size",), ("align",)),
    "posix_memalign": (("out", "size"), ("align",)),
    "aligned_free": (("ptr",), ()),
    "size": (("ptr",), ()),
    # a function that allocates or frees through hooked ones (FormHeap_Allocate, operator new):
    # not recorded itself; calls inside it are attributed to its caller (docs/profiles.md)
    "wrapper": ((), ()),
}

PROFILE_KEYS = {"name", "description", "platform", "arch", "executable", "pe_version"}
HOOK_KEYS = {
    "name", "heap", "role", "module", "export", "offset", "address", "abi", "args", "nargs",
    "required", "arch",
}


class ProfileError(ValueError):
    """A profile that cannot be used: bad TOML, a bad field, or a target it does not fit."""


@dataclass(frozen=True)
class HookSpec:
    name: str
    heap: str
    role: str
    args: dict[str, int]
    nargs: int
    abi: str = "default"
    module: str = ""  # glob pattern (case-insensitive); "" with `address`
    export: str | None = None
    offset: int | None = None
    address: int | None = None
    required: bool = True
    arch: tuple[str, ...] = ()  # only on these architectures (libstdc++'s mangled size_t); () = all

    def where(self) -> str:
        if self.export is not None:
            return f"{self.module}!{self.export}"
        if self.offset is not None:
            return f"{self.module}+{self.offset:#x}"
        return f"{self.address:#x}"

    def to_agent_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "heap": self.heap, "role": self.role, "abi": self.abi,
            "args": dict(self.args), "nargs": self.nargs, "required": self.required,
        }
        if self.module:
            d["module"] = self.module
        for key in ("export", "offset", "address"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d


@dataclass(frozen=True)
class Profile:
    name: str
    platform: str
    arch: tuple[str, ...]
    hooks: tuple[HookSpec, ...]
    description: str = ""
    executable: tuple[str, ...] = ()
    pe_version: str | None = None
    source: str = ""  # file it came from

    def to_agent_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "platform": self.platform,
            "hooks": [h.to_agent_json() for h in self.hooks],
        }

    @property
    def has_wrappers(self) -> bool:
        return any(h.role == "wrapper" for h in self.hooks)

    def for_arch(self, arch: str) -> Profile:
        """This profile without the hooks made for other architectures (records index the
        hooks of the profile the agent was given: use the same one for both)."""
        keep = tuple(h for h in self.hooks if not h.arch or arch in h.arch)
        return self if len(keep) == len(self.hooks) else dataclasses.replace(self, hooks=keep)

    def hook_infos(self) -> list[HookInfo]:
        """SessionMeta.hooks: records' `hook` field indexes this list."""
        return [HookInfo(name=h.name, heap=h.heap, role=h.role, module=h.module)
                for h in self.hooks]

    def matches_executable(self, exe_name: str) -> bool:
        low = exe_name.lower()
        return any(fnmatch.fnmatchcase(low, pat.lower()) for pat in self.executable)

    def check_target(self, exe_name: str, platform: str, arch: str, force: bool = False) -> None:
        """Refuse a target this profile is not for. `force` skips the executable check only:
        the platform and architecture decide the calling conventions and must match."""
        what = f"profile {self.name!r} ({self.source})"
        if platform != self.platform:
            raise ProfileError(
                f"{what} is for platform {self.platform}, but target {exe_name} runs on {platform}")
        if arch not in self.arch:
            raise ProfileError(
                f"{what} is for arch {'/'.join(self.arch)}, but target {exe_name} is {arch}")
        if self.executable and not force and not self.matches_executable(exe_name):
            raise ProfileError(
                f"{what} is for executable {', '.join(self.executable)}, but the target is "
                f"{exe_name} (use --force to monitor it anyway)")


# ---------------------------------------------------------------- loading and validation


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, msg: str, hook: str | None = None, key: str | None = None) -> ProfileError:
        where = self.source
        if hook is not None:
            where += f": hook {hook}"
        if key is not None:
            where += f": field {key!r}"
        return ProfileError(f"{where}: {msg}")


def _str(ctx: _Ctx, table: dict[str, Any], key: str, hook: str | None, required: bool = True,
         default: str = "", prefix: str = "") -> str:
    label = prefix + key
    if key not in table:
        if required:
            raise ctx.err("missing", hook, label)
        return default
    value = table[key]
    if not isinstance(value, str):
        raise ctx.err(f"must be a string, got {value!r}", hook, label)
    if required and not value.strip():
        raise ctx.err("must not be empty", hook, label)
    return value


def _int(ctx: _Ctx, value: Any, hook: str | None, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.err(f"must be an integer, got {value!r}", hook, key)
    if not lo <= value <= hi:
        raise ctx.err(f"{value:#x} is out of range [{lo:#x}, {hi:#x}]", hook, key)
    return value


def _str_list(ctx: _Ctx, table: dict[str, Any], key: str, required: bool) -> tuple[str, ...]:
    if key not in table:
        if required:
            raise ctx.err("missing", None, f"profile.{key}")
        return ()
    value = table[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ctx.err(f"must be a list of strings, got {value!r}", None, f"profile.{key}")
    return tuple(value)


def _hook(ctx: _Ctx, i: int, raw: Any, arches: tuple[str, ...]) -> HookSpec:
    if not isinstance(raw, dict):
        raise ctx.err(f"[[hook]] #{i + 1} is not a table")
    label = f"#{i + 1}"
    name = _str(ctx, raw, "name", label)
    label = repr(name)
    unknown = sorted(set(raw) - HOOK_KEYS)
    if unknown:
        raise ctx.err(f"unknown field (known: {', '.join(sorted(HOOK_KEYS))})", label, unknown[0])
    heap = _str(ctx, raw, "heap", label)
    role = _str(ctx, raw, "role", label)
    if role not in ROLES:
        raise ctx.err(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", label, "role")
    abi = _str(ctx, raw, "abi", label, required=False, default="default")
    if abi not in ABIS:
        raise ctx.err(f"unknown ABI {abi!r} (expected one of {', '.join(ABIS)})", label, "abi")
    if abi in CALLEE_POPS and "ia32" not in arches:
        raise ctx.err(f"ABI {abi} exists only on ia32 (profile arch {', '.join(arches)})",
                      label, "abi")

    # where: module + export, module + offset, or an absolute address
    places = [k for k in ("export", "offset", "address") if k in raw]
    if len(places) != 1:
        raise ctx.err("give exactly one of export, offset, address"
                      + (f" (got {', '.join(places)})" if places else ""), label,
                      places[1] if len(places) > 1 else "export")
    module = _str(ctx, raw, "module", label, required=False)
    export = offset = address = None
    addr_max = 0xFFFF_FFFF if arches == ("ia32",) else 0xFFFF_FFFF_FFFF_FFFF
    if "address" in raw:
        if "module" in raw:
            raise ctx.err("an absolute address takes no module (use offset)", label, "module")
        address = _int(ctx, raw["address"], label, "address", 0x1000, addr_max)
    else:
        if not module.strip():
            raise ctx.err("missing (needed with export/offset)", label, "module")
        if "export" in raw:
            export = _str(ctx, raw, "export", label)
        else:
            offset = _int(ctx, raw["offset"], label, "offset", 0, addr_max)

    args_raw = raw.get("args", {} if role == "wrapper" else None)
    if not isinstance(args_raw, dict):
        raise ctx.err("missing or not a table of argument positions", label, "args")
    needed, optional = ROLES[role]
    args: dict[str, int] = {}
    for key, pos in args_raw.items():
        if key not in needed and key not in optional:
            allowed = ", ".join(needed + optional)
            raise ctx.err(f"argument {key!r} does not fit role {role} (takes {allowed})", label,
                          f"args.{key}")
        args[key] = _int(ctx, pos, label, f"args.{key}", 0, MAX_ARGS - 1)
    for key in needed:
        if key not in args:
            raise ctx.err(f"role {role} needs argument {key!r}", label, f"args.{key}")
    positions = sorted(args.values())
    if len(set(positions)) != len(positions):
        raise ctx.err("two arguments at the same position", label, "args")

    if "nargs" in raw:
        nargs = _int(ctx, raw["nargs"], label, "nargs", 0, MAX_ARGS)
        if positions and positions[-1] >= nargs:
            raise ctx.err(f"argument position {positions[-1]} does not fit nargs = {nargs}",
                          label, "args")
    elif abi in CALLEE_POPS:
        raise ctx.err(f"required with ABI {abi} (the callee pops its arguments)", label, "nargs")
    elif role == "wrapper":
        raise ctx.err("required for a wrapper (its arguments are passed on)", label, "nargs")
    else:
        nargs = positions[-1] + 1 if positions else 0

    required = raw.get("required", True)
    if not isinstance(required, bool):
        raise ctx.err(f"must be true or false, got {required!r}", label, "required")
    arch: tuple[str, ...] = ()
    if "arch" in raw:
        value = raw["arch"]
        arch = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) \
            else ()
        if not arch or any(a not in arches for a in arch):
            raise ctx.err(f"must list architectures of the profile ({', '.join(arches)}), got "
                          f"{value!r}", label, "arch")
    return HookSpec(name=name, heap=heap, role=role, args=args, nargs=nargs, abi=abi,
                    module=module, export=export, offset=offset, address=address,
                    required=required, arch=arch)


def parse_profile(text: str, source: str) -> Profile:
    """A Profile from TOML text; `source` names it in errors."""
    ctx = _Ctx(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ctx.err(f"invalid TOML: {e}") from None
    unknown = sorted(set(data) - {"profile", "hook"})
    if unknown:
        raise ctx.err(f"unknown table [{unknown[0]}] (expected [profile] and [[hook]])")
    prof = data.get("profile")
    if not isinstance(prof, dict):
        raise ctx.err("missing [profile] table")
    bad = sorted(set(prof) - PROFILE_KEYS)
    if bad:
        raise ctx.err(f"unknown field (known: {', '.join(sorted(PROFILE_KEYS))})", None,
                      f"profile.{bad[0]}")
    name = _str(ctx, prof, "name", None, prefix="profile.")
    ctx.source = f"{source} (profile {name})" if Path(source).stem != name else source
    platform = _str(ctx, prof, "platform", None, prefix="profile.")
    if platform not in PLATFORMS:
        raise ctx.err(f"unknown platform {platform!r} (expected {', '.join(PLATFORMS)})", None,
                      "profile.platform")
    arch = _str_list(ctx, prof, "arch", required=True)
    for a in arch:
        if a not in ARCHES:
            raise ctx.err(f"unknown arch {a!r} (expected {', '.join(ARCHES)})", None,
                          "profile.arch")
    if not arch:
        raise ctx.err("must list at least one arch", None, "profile.arch")
    executable = _str_list(ctx, prof, "executable", required=False)
    pe_version = None
    if "pe_version" in prof:
        pe_version = _str(ctx, prof, "pe_version", None, prefix="profile.")
    description = _str(ctx, prof, "description", None, required=False, prefix="profile.")

    raw_hooks = data.get("hook", [])
    if not isinstance(raw_hooks, list) or not raw_hooks:
        raise ctx.err("no [[hook]] entries")
    if len(raw_hooks) > MAX_HOOKS:
        raise ctx.err(f"{len(raw_hooks)} hooks; at most {MAX_HOOKS}")
    hooks: list[HookSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_hooks):
        h = _hook(ctx, i, raw, arch)
        if h.name in seen:
            raise ctx.err("duplicate hook name", repr(h.name), "name")
        seen.add(h.name)
        hooks.append(h)
    return Profile(name=name, platform=platform, arch=arch, hooks=tuple(hooks),
                   description=description, executable=executable, pe_version=pe_version,
                   source=source)


def _bundled() -> dict[str, Any]:
    root = resources.files("nvse_monitor.profiles")
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".toml")}


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name (e.g. "linux-libc") or a user TOML file by path."""
    text_name = str(name_or_path)
    bundled = _bundled()
    if text_name in bundled and not Path(text_name).exists():
        res = bundled[text_name]
        return parse_profile(res.read_text(encoding="utf-8"), f"<bundled>/{res.name}")
    path = Path(name_or_path)
    if not path.is_file():
        raise ProfileError(
            f"{text_name}: no such profile file, and not a bundled profile "
            f"(bundled: {', '.join(sorted(bundled)) or 'none'})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read: {e}") from None
    return parse_profile(text, str(path))


def list_profiles() -> list[Profile]:
    """Every bundled profile, by name."""
    return [load_profile(name) for name in sorted(_bundled())]


def select_profile(exe_name: str, platform: str, arch: str) -> Profile:
    """The bundled profile for a target: one naming its executable first, else a generic one
    for its platform and arch (a Linux process -> linux-libc)."""
    fits = [p for p in list_profiles() if p.platform == platform and arch in p.arch]
    for p in fits:
        if p.executable and p.matches_executable(exe_name):
            return p
    for p in fits:
        if not p.executable:
            return p
    raise ProfileError(
        f"no bundled profile fits target {exe_name} ({platform}/{arch}); give one with --profile")
