"""The lines a live session prints when monitoring starts: what is monitored and how many hooks
are in, the agent's footprint in the target, and for the game or the editor the FNV banner."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath
from typing import Any

from ..engine.engine import NOT_PRESENT
from ..stream.messages import SessionMeta
from . import fnv


def monitoring_line(meta: SessionMeta, pid: int, hook_specs: list[Any],
                    init_result: dict[str, Any], out_dir: Path | None, attach: bool) -> str:
    """`monitoring TARGET (PID, arch, platform) with profile P: n/m hooks..., agent memory,
    files in DIR` (hook_specs: the profile's hooks, in init's `index` order)."""
    # wrappers (issue 11) record nothing: counted apart, installed or waiting for a module
    is_wrapper = [h.role == "wrapper" for h in hook_specs]
    all_hooks = init_result.get("hooks", [])
    hooks = [h for h in all_hooks if not is_wrapper[int(h.get("index", 0))]]
    wrappers = [h for h in all_hooks if is_wrapper[int(h.get("index", 0))]]
    hooks_ok = sum(1 for h in hooks if h.get("ok"))
    absent = sum(1 for h in all_hooks if not h.get("ok")
                 and str(h.get("detail", "")).startswith(NOT_PRESENT))
    wrap_note = (f", {sum(1 for h in wrappers if h.get('ok'))}/{len(wrappers)} wrappers"
                 if wrappers else "")
    agent_bytes = init_result.get("agent_bytes") or init_result.get("ring_bytes") or 0
    agent_mib = int(agent_bytes) / 2**20
    return (
        f"monitoring {meta.target} (PID {pid}, {meta.arch}, "
        f"{meta.platform}) with profile {meta.profile}: {hooks_ok}/"
        f"{len(hooks)} hooks{wrap_note}"
        f"{f' ({absent} optional not present)' if absent else ''}, "
        f"agent memory {agent_mib:.1f} MiB; "
        f"files in {out_dir}{'; Ctrl-C to stop' if attach else ''}"
    )


def agent_footprint(init_result: dict[str, Any]) -> tuple[dict[str, int], str] | None:
    """The agent's own share of the target's memory (measured in the target at the end of init:
    the regions Frida cloaks) for the metadata and a banner line; None when not measured."""
    fp = init_result.get("footprint")
    if not isinstance(fp, dict) or "committed" not in fp:
        return None
    d = {"committed_bytes": int(fp["committed"]), "reserved_bytes": int(fp.get("reserved", 0)),
         "ring_bytes": int(init_result.get("ring_bytes") or 0)}
    mib = 1 << 20
    line = (f"Monitor footprint in the target: {d['committed_bytes'] / mib:.1f} MiB committed, "
            f"{d['reserved_bytes'] / mib:.1f} MiB reserved (Frida agent, ring "
            f"{d['ring_bytes'] / mib:.1f} MiB, hooks)")
    return d, line


def fnv_banner(meta: SessionMeta, exe_path: str) -> list[str]:
    """The FNV banner lines (game and NVSE versions, plugins, heap replacers) for the game or
    the editor; [] for other targets."""
    name = PureWindowsPath(meta.target).name
    if name.lower() not in (fnv.GAME_EXE.lower(), fnv.EDITOR_EXE.lower()):
        return []
    from .pe import PeError, is_pe, read_pe_version

    def version(path: str) -> str | None:
        if not path or not is_pe(path):
            return None
        try:
            return read_pe_version(path).file_version
        except PeError:
            return None

    nvse = next((m for m in meta.modules if m.name.lower() in fnv.NVSE_MODULES), None)
    nvse_path = next((m.path for m in meta.modules if m.name.lower() == fnv.NVSE_MODULES[0]),
                     nvse.path if nvse is not None else "")
    return fnv.banner(meta.modules, name, version(exe_path), version(nvse_path)).lines()
