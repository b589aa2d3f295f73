"""Leak report: the blocks still live at the end, grouped by module and by call site.

A call site is the allocating call's return address, shown as module!function+0xoff where the
function is known (issue 11: the engine's SymbolNames), else module+offset (the module that
held it when the block was allocated, as the engine attributed it). Grouping is vectorised
(one sort of the live blocks, reduceat per column), so 1M+ live blocks take well under a second;
only the distinct call sites (usually hundreds) are handled in Python.

Blocks of uncertain fate (issue 13): when the agent dropped free/realloc records, a block
allocated at or before the batch that reported the drop may have been freed by one of them.
Those blocks are set aside as "uncertain" (their own groups, scopes `uncertain-module` and
`uncertain-site`), never presented as leaks; blocks allocated later stay leak candidates.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..stream.messages import Module
from ..words import plural as _n
from .modmap import UNKNOWN
from .sitename import site_label

# `function` (issue 11) came last so that readers by position keep working.
CSV_COLUMNS = ("scope", "module", "offset", "allocations", "bytes", "sites", "min_size",
               "max_size", "heaps", "oldest_timestamp", "newest_timestamp", "function")
LOG_TOP = 10  # modules and call sites named in the log


@dataclass(frozen=True)
class LeakGroup:
    scope: str  # "module" or "site"
    module: str  # module name, "unknown" outside every known module
    offset: int | None  # site: return address - module base (absolute when unknown); module: None
    allocations: int
    bytes: int
    sites: int  # distinct call sites in the group (1 for a site)
    min_size: int
    max_size: int
    heaps: tuple[str, ...]
    oldest_us: int  # stream time of the oldest / newest live block of the group
    newest_us: int
    function: str | None = None  # site: "name+0xoff" where a symbol is known (issue 11)

    @property
    def where(self) -> str:
        if self.offset is None:
            return self.module
        return site_label(self.module, self.offset, self.function)


_FUNC_OFFSET = re.compile(r"\+0x[0-9a-fA-F]+$")


@dataclass(frozen=True)
class FunctionGroup:
    """Live blocks by the function of their call site (`top`'s top functions): exact, since
    every call site lies in one function. Sites with no known function stay on their own."""

    label: str  # module!function, or the site's offset form
    allocations: int
    bytes: int
    sites: int


def by_function(sites: Sequence[LeakGroup]) -> list[FunctionGroup]:
    """Sites grouped by module and function name (without the offset), most bytes first."""
    acc: dict[str, list[int]] = {}
    for g in sites:
        if g.function:
            label = site_label(g.module, None, _FUNC_OFFSET.sub("", g.function))
        else:
            label = g.where
        a = acc.setdefault(label, [0, 0, 0])
        a[0] += g.allocations
        a[1] += g.bytes
        a[2] += 1
    out = [FunctionGroup(k, *v) for k, v in acc.items()]
    out.sort(key=lambda f: (-f.bytes, -f.allocations, f.label))
    return out


UNCERTAIN = "uncertain-"  # scope prefix of the groups of blocks whose fate is uncertain


@dataclass
class LeakReport:
    allocations: int  # leak candidates (every live block when nothing was lost)
    bytes: int
    modules: list[LeakGroup]
    sites: list[LeakGroup]
    # Live blocks allocated at or before `uncertain_until_us` (stream µs) when free records may
    # have been lost: set aside, not leaks. Scopes "uncertain-module" / "uncertain-site".
    uncertain_allocations: int = 0
    uncertain_bytes: int = 0
    uncertain_modules: list[LeakGroup] = field(default_factory=list)
    uncertain_sites: list[LeakGroup] = field(default_factory=list)
    uncertain_until_us: int | None = None
    uncertain_reason: str = ""  # what was lost, e.g. "5 free/realloc records were dropped"

    def log_lines(self, top: int = LOG_TOP, csv_name: str = "") -> list[str]:
        """WARN messages for the log: a summary, then the top modules and call sites; then
        the blocks set aside as uncertain, if any."""
        lines = self._leak_lines(top, csv_name)
        if self.uncertain_allocations:
            when = ("" if self.uncertain_until_us is None else
                    f" at or before {self.uncertain_until_us / 1e6:.6f} s")
            why = f" ({self.uncertain_reason})" if self.uncertain_reason else ""
            where = f"; rows uncertain-* in {csv_name}" if csv_name else ""
            lines.append(f"Leak report: {_n(self.uncertain_allocations, 'allocation')}, "
                         f"{_n(self.uncertain_bytes, 'byte')} still live set aside as uncertain, "
                         f"not leaks: allocated{when}, when free records were lost{why}{where}")
        return lines

    def _leak_lines(self, top: int, csv_name: str) -> list[str]:
        if not self.allocations:
            return []
        where = f"; all in {csv_name}" if csv_name else ""
        lines = [f"Leak report: {_n(self.allocations, 'allocation')}, {_n(self.bytes, 'byte')} "
                 f"still live from {_n(len(self.sites), 'call site')} in "
                 f"{_n(len(self.modules), 'module')}{where}"]
        for g in self.modules[:top]:
            lines.append(f"Live at end in {g.where}: {_n(g.allocations, 'allocation')}, "
                         f"{_n(g.bytes, 'byte')} from {_n(g.sites, 'call site')}")
        for g in self.sites[:top]:
            sizes = f"{g.min_size}" if g.min_size == g.max_size else \
                f"{g.min_size}..{g.max_size}"
            lines.append(f"Live at end from {g.where}: {_n(g.allocations, 'allocation')}, "
                         f"{_n(g.bytes, 'byte')} (size {sizes}, {'+'.join(g.heaps)})")
        return lines

    def log_to(self, engine: Any, csv_name: str) -> None:
        """The log_lines as WARN lines through the engine's health (so the JSON counts them), at
        the engine's current time: what a session's end and a recording's report both log."""
        for msg in self.log_lines(csv_name=csv_name):
            engine.health.log(engine.now, "WARN", msg)
        note = getattr(engine, "note_leaks", None)
        if note is not None:  # the final JSON's monitor.leaks
            note(self)

    def csv_text(self, wall_clock_zero_us: int = 0) -> str:
        out = io.StringIO()
        out.write(",".join(CSV_COLUMNS) + "\n")
        for g in [*self.modules, *self.sites, *self.uncertain_modules, *self.uncertain_sites]:
            off = "" if g.offset is None else f"0x{g.offset:x}"
            row = [g.scope, _csv_field(g.module), off, g.allocations, g.bytes, g.sites,
                   g.min_size, g.max_size, _csv_field("+".join(g.heaps)),
                   wall_clock_zero_us + g.oldest_us, wall_clock_zero_us + g.newest_us,
                   _csv_field(g.function or "")]
            out.write(",".join(str(v) for v in row) + "\n")
        return out.getvalue()


def _csv_field(s: str) -> str:
    if any(c in s for c in ',"\r\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


def group_live(live: dict[str, np.ndarray], modules: Sequence[Module],
               heap_names: Sequence[str], uncertain_until: int | None = None,
               uncertain_reason: str = "",
               symbols: Mapping[int, str] | None = None) -> LeakReport:
    """Group live blocks (Engine.live_allocations() columns: size, ts, caller, heap, module);
    those allocated at or before `uncertain_until` (stream µs) apart, as uncertain. `symbols`:
    call site address -> "function+0xoff" (Engine.symbols)."""
    syms = symbols or {}
    if uncertain_until is None:
        return _group(live, modules, heap_names, syms)
    ts = np.asarray(live["ts"], dtype=np.uint64)
    before = ts <= np.uint64(max(uncertain_until, 0))
    leak = _group({k: np.asarray(v)[~before] for k, v in live.items()}, modules, heap_names,
                  syms)
    unc = _group({k: np.asarray(v)[before] for k, v in live.items()}, modules, heap_names, syms)
    return replace(
        leak, uncertain_allocations=unc.allocations, uncertain_bytes=unc.bytes,
        uncertain_modules=[replace(g, scope=UNCERTAIN + g.scope) for g in unc.modules],
        uncertain_sites=[replace(g, scope=UNCERTAIN + g.scope) for g in unc.sites],
        uncertain_until_us=uncertain_until, uncertain_reason=uncertain_reason)


def _group(live: dict[str, np.ndarray], modules: Sequence[Module],
           heap_names: Sequence[str], symbols: Mapping[int, str]) -> LeakReport:
    caller = np.asarray(live["caller"], dtype=np.uint64)
    n = len(caller)
    if n == 0:
        return LeakReport(0, 0, [], [])
    mod = np.asarray(live["module"], dtype=np.uint64)
    size = np.asarray(live["size"], dtype=np.uint64)
    ts = np.asarray(live["ts"], dtype=np.uint64)
    heap = np.asarray(live["heap"], dtype=np.uint64)
    # One sort key (module, caller) when callers fit in 48 bits (user space on x64/ia32),
    # else a lexsort: same groups either way.
    if int(caller.max()) < (1 << 48):
        key = (mod << np.uint64(48)) | caller
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    else:
        order = np.lexsort((caller, mod))
        c, m = caller[order], mod[order]
        starts = np.flatnonzero(np.concatenate(([True], (c[1:] != c[:-1]) | (m[1:] != m[:-1]))))
    s, t = size[order], ts[order]
    counts = np.diff(np.append(starts, n))
    nbytes = np.add.reduceat(s, starts)
    smin, smax = np.minimum.reduceat(s, starts), np.maximum.reduceat(s, starts)
    tmin, tmax = np.minimum.reduceat(t, starts), np.maximum.reduceat(t, starts)
    site_of = np.repeat(np.arange(len(starts)), counts)
    pairs = np.unique(site_of.astype(np.uint64) * np.uint64(256) + heap[order])
    heaps_of: dict[int, list[str]] = {}
    for p in pairs.tolist():
        h = p & 0xFF
        heaps_of.setdefault(p >> 8, []).append(heap_names[h] if h < len(heap_names) else "unknown")

    # Distinct (module index, caller) -> (module name, offset); a module loaded twice at
    # different bases gives the same name+offset: merged.
    merged: dict[tuple[str, int], list[Any]] = {}
    first_caller, first_mod = caller[order][starts].tolist(), mod[order][starts].tolist()
    cols = zip(first_caller, first_mod, counts.tolist(), nbytes.tolist(), smin.tolist(),
               smax.tolist(), tmin.tolist(), tmax.tolist(), strict=True)
    for i, (cal, mi, cnt, b, lo, hi, t0, t1) in enumerate(cols):
        if mi < len(modules) and mi != UNKNOWN:
            name, off = modules[mi].name, cal - modules[mi].base
        else:
            name, off = "unknown", cal
        g = merged.get((name, off))
        if g is None:
            merged[(name, off)] = [cnt, b, lo, hi, t0, t1, set(heaps_of[i]), symbols.get(cal)]
        else:
            g[7] = g[7] or symbols.get(cal)
            g[0] += cnt
            g[1] += b
            g[2], g[3] = min(g[2], lo), max(g[3], hi)
            g[4], g[5] = min(g[4], t0), max(g[5], t1)
            g[6].update(heaps_of[i])
    sites = [LeakGroup("site", name, off, g[0], g[1], 1, g[2], g[3], tuple(sorted(g[6])), g[4],
                       g[5], g[7]) for (name, off), g in merged.items()]
    by_mod: dict[str, list[LeakGroup]] = {}
    for g in sites:
        by_mod.setdefault(g.module, []).append(g)
    mods = [LeakGroup("module", name, None, sum(x.allocations for x in gs),
                      sum(x.bytes for x in gs), len(gs), min(x.min_size for x in gs),
                      max(x.max_size for x in gs),
                      tuple(sorted({h for x in gs for h in x.heaps})),
                      min(x.oldest_us for x in gs), max(x.newest_us for x in gs))
            for name, gs in by_mod.items()]
    # Most bytes first; ties by count, then name/offset: deterministic.
    sites.sort(key=lambda g: (-g.bytes, -g.allocations, g.module, g.offset))
    mods.sort(key=lambda g: (-g.bytes, -g.allocations, g.module))
    return LeakReport(n, int(nbytes.sum()), mods, sites)


def from_engine(engine: Any) -> LeakReport:
    """The leak report of an Engine's live blocks now (those of uncertain fate apart)."""
    return group_live(engine.live_allocations(), engine.modmap.modules, engine.heap_names,
                      getattr(engine, "uncertain_until", None),
                      getattr(engine, "uncertain_reason", ""), getattr(engine, "symbols", None))


def leaks_path(out_dir: Path | str, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}_leaks.csv"


def stacks_path(out_dir: Path | str, prefix: str) -> Path:
    """The sampled stacks' views written beside the leak report (views/report/flame.py,
    issue 11)."""
    return Path(out_dir) / f"{prefix}_stacks.json"


def request_path(out_dir: Path | str, prefix: str) -> Path:
    """`top DIR` creates this file to ask the session writing DIR for the leaks CSV now; the
    session writes `<prefix>_leaks.csv`, then removes it."""
    return Path(out_dir) / f"{prefix}_leaks.request"


def read_csv(path: Path | str) -> LeakReport:
    """A leaks CSV read back (top, report). Raises OSError / ValueError."""
    import csv

    groups: dict[str, list[LeakGroup]] = {"module": [], "site": [], "uncertain-module": [],
                                          "uncertain-site": []}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        g = LeakGroup(r["scope"], r["module"], int(r["offset"], 16) if r["offset"] else None,
                      int(r["allocations"]), int(r["bytes"]), int(r["sites"]),
                      int(r["min_size"]), int(r["max_size"]),
                      tuple(x for x in r["heaps"].split("+") if x),
                      int(r["oldest_timestamp"]), int(r["newest_timestamp"]),
                      r.get("function") or None)  # older CSVs have no function column
        if g.scope not in groups:
            raise ValueError(f"unknown scope {g.scope!r}")
        groups[g.scope].append(g)
    mods, um = groups["module"], groups["uncertain-module"]
    return LeakReport(sum(g.allocations for g in mods), sum(g.bytes for g in mods), mods,
                      groups["site"], sum(g.allocations for g in um), sum(g.bytes for g in um),
                      um, groups["uncertain-site"])
