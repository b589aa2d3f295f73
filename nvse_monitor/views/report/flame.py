"""The report's sampled-stack views (issue 11, docs/attribution.md): flame graphs of estimated
bytes per stack (live at the peak, live at the end, allocated) and the sampled stacks of each
leak site's live blocks. Gathered from an engine at a session's end (Engine.samples): by the
report's own replay of a recording, or by a live session or replay into `<prefix>_stacks.json`
(to_json / from_json), which a report of the output directory reads. html.py draws them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...engine.modmap import UNKNOWN
from ...engine.sitename import site_label

VIEWS = (("peak", "live at the peak"), ("end", "live at the end"), ("allocated", "allocated"))
MIN_SHARE = 0.001  # frames under 0.1 % of a view's total are left in their caller's width
MAX_NODES = 4000  # per view, the widest kept
STACKS_PER_SITE = 5  # the leak table's sampled stacks per call site


@dataclass
class FlameView:
    """One view's tree: node ids, labels, parents, values (estimated bytes, totals of the
    subtree), sampled allocations (or blocks) per node."""

    title: str
    total: float  # estimated bytes of the view
    sampled: int
    ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


@dataclass
class SiteStack:
    frames: list[str]  # labels, innermost first
    blocks: int  # sampled blocks live at the end with this stack
    est_bytes: float


@dataclass
class FlameData:
    sample_bytes: int
    sampled_allocations: int
    stackless: int
    discarded: int
    views: dict[str, FlameView]
    # leak call site (module, offset) -> its live sampled blocks' stacks, widest first
    site_stacks: dict[tuple[str, int | None], list[SiteStack]]
    peak_t: float | None = None  # seconds: when live bytes first reached their peak


FORMAT = 1


def to_json(fd: FlameData) -> dict[str, Any]:
    """`<prefix>_stacks.json` (docs/attribution.md): every figure an estimate but the counts."""
    return {
        "format": FORMAT, "estimates": True, "sample_bytes": fd.sample_bytes,
        "sampled_allocations": fd.sampled_allocations, "stackless_samples": fd.stackless,
        "discarded_stacks": fd.discarded, "peak_seconds": fd.peak_t,
        "views": {k: {"title": v.title, "estimated_bytes": v.total, "sampled": v.sampled,
                      "ids": v.ids, "labels": v.labels, "parents": v.parents,
                      "estimated_node_bytes": v.values, "node_sampled": v.counts}
                  for k, v in fd.views.items()},
        "leak_sites": [{"module": m, "offset": off,
                        "stacks": [{"frames": st.frames, "sampled_blocks": st.blocks,
                                    "estimated_bytes": st.est_bytes} for st in sts]}
                       for (m, off), sts in fd.site_stacks.items()],
    }


def from_json(d: dict[str, Any]) -> FlameData:
    """Raises ValueError / KeyError / TypeError on a file that is not one."""
    if d.get("format") != FORMAT:
        raise ValueError(f"format {d.get('format')!r}, not {FORMAT}")
    views = {k: FlameView(str(v["title"]), float(v["estimated_bytes"]), int(v["sampled"]),
                          list(v["ids"]), list(v["labels"]), list(v["parents"]),
                          [float(x) for x in v["estimated_node_bytes"]],
                          [int(x) for x in v["node_sampled"]])
             for k, v in d["views"].items()}
    sites = {(str(s["module"]), None if s["offset"] is None else int(s["offset"])):
             [SiteStack(list(st["frames"]), int(st["sampled_blocks"]),
                        float(st["estimated_bytes"])) for st in s["stacks"]]
             for s in d["leak_sites"]}
    peak = d.get("peak_seconds")
    return FlameData(int(d["sample_bytes"]), int(d["sampled_allocations"]),
                     int(d["stackless_samples"]), int(d["discarded_stacks"]), views, sites,
                     None if peak is None else float(peak))


def _labeller(engine: Any) -> Any:
    mods = engine.modmap.modules
    symbols: dict[int, str] = getattr(engine, "symbols", None) or {}
    cache: dict[tuple[int, int], str] = {}

    def label(addr: int, mod: int) -> str:
        key = (addr, mod)
        s = cache.get(key)
        if s is None:
            if mod != UNKNOWN and mod < len(mods):
                m = mods[mod]
                s = site_label(m.name, addr - m.base, symbols.get(addr))
            else:
                s = site_label("unknown", addr, symbols.get(addr))
            cache[key] = s
        return s

    return label


def _view(title: str, stacks: list[list[str]], values: np.ndarray,
          counts: np.ndarray) -> FlameView:
    total = float(values.sum())
    v = FlameView(title, total, int(counts.sum()))
    if total <= 0:
        return v
    # a trie of label paths, outermost frame first: nodes merge where the labels do
    node_val: dict[tuple[str, ...], float] = {}
    node_cnt: dict[tuple[str, ...], int] = {}
    for frames, val, cnt in zip(stacks, values.tolist(), counts.tolist(), strict=True):
        if val <= 0:
            continue
        path: tuple[str, ...] = ()
        for f in reversed(frames or ["[no frame in a known module]"]):
            path = (*path, f)
            node_val[path] = node_val.get(path, 0.0) + val
            node_cnt[path] = node_cnt.get(path, 0) + cnt
    keep = [p for p, x in node_val.items() if x >= total * MIN_SHARE]
    keep.sort(key=lambda p: (-node_val[p], p))
    keep = set(keep[:MAX_NODES])
    ids = {(): "all"}
    v.ids.append("all")
    v.labels.append("all sampled stacks")
    v.parents.append("")
    v.values.append(total)
    v.counts.append(v.sampled)
    for p in sorted(keep, key=lambda p: (len(p), p)):  # parents before children
        if p[:-1] not in ids:
            continue  # its caller was too narrow
        ids[p] = f"n{len(ids)}"
        v.ids.append(ids[p])
        v.labels.append(p[-1])
        v.parents.append(ids[p[:-1]])
        v.values.append(node_val[p])
        v.counts.append(node_cnt[p])
    return v


def gather(engine: Any, live: dict[str, np.ndarray] | None = None,
           leak_sites: list[Any] | None = None) -> FlameData | None:
    """The views of an engine's sampled stacks (None: the session did not sample). `live`:
    Engine.live_allocations() (ptr, caller, module columns) to group the sampled live blocks by
    their leak call site; `leak_sites`: the leak report's sites shown."""
    sp = getattr(engine, "samples", None)
    if sp is None:
        return None
    label = _labeller(engine)
    stacks = [[label(a, m) for a, m in zip(s.frames, s.modules, strict=True)]
              for s in sp.stacks]
    views = {}
    for key, title in VIEWS:
        fig = {"peak": sp.at_peak, "end": sp.live_now, "allocated": sp.allocated}[key]()
        views[key] = _view(title, stacks, fig.bytes, fig.sampled)
    site_stacks: dict[tuple[str, int | None], list[SiteStack]] = {}
    if live is not None and sp.live and leak_sites:
        site_stacks = _site_stacks(engine, sp, stacks, live, leak_sites)
    return FlameData(sp.sample_bytes, sp.sampled_allocations, sp.stackless, sp.discarded_stacks,
                     views, site_stacks, None if sp.peak_us is None else sp.peak_us / 1e6)


def _site_stacks(engine: Any, sp: Any, stacks: list[list[str]], live: dict[str, np.ndarray],
                 leak_sites: list[Any]) -> dict[tuple[str, int | None], list[SiteStack]]:
    """The sampled blocks still live, grouped by the leak call site of their block (the
    engine's module and caller for that pointer), then by stack."""
    mods = engine.modmap.modules
    shown = {(g.module, g.offset) for g in leak_sites}
    ptrs = np.array(sorted(sp.live), np.uint64)
    lp = np.asarray(live["ptr"], np.uint64)  # sorted by pointer
    at = np.minimum(np.searchsorted(lp, ptrs), max(len(lp) - 1, 0))
    found = (lp[at] == ptrs) if len(lp) else np.zeros(len(ptrs), bool)
    groups: dict[tuple[str, int | None], dict[int, list[float]]] = {}
    for p, i, ok in zip(ptrs.tolist(), at.tolist(), found.tolist(), strict=True):
        if not ok:
            continue  # sampled, but not tracked (tracking was full): no leak site
        mi, caller = int(live["module"][i]), int(live["caller"][i])
        if mi < len(mods) and mi != UNKNOWN:
            key = (mods[mi].name, caller - mods[mi].base)
        else:
            key = ("unknown", caller)
        if key not in shown:
            continue
        sid, _size, wb, _wn, _caller = sp.live[p]
        g = groups.setdefault(key, {}).setdefault(sid, [0, 0.0])
        g[0] += 1
        g[1] += wb
    out = {}
    for key, by in groups.items():
        rows = sorted(by.items(), key=lambda kv: (-kv[1][1], kv[0]))[:STACKS_PER_SITE]
        out[key] = [SiteStack(stacks[sid], int(n), float(b)) for sid, (n, b) in rows]
    return out
