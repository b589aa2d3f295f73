"""ReportData -> one self-contained HTML page: plotly charts (plotly.js inlined once, no network)
and plain HTML tables."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from importlib import resources
from string import Template
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from ... import __version__
from ...words import plural
from .data import LEAK_ROWS, ReportData
from .flame import FlameData

MIB = 1 << 20
STATE_COLORS = {"INITIALIZING": "rgba(128,128,128,0.15)", "DEGRADED": "rgba(255,160,0,0.18)",
                "ERROR": "rgba(220,40,40,0.18)", "UNINITIALIZED": "rgba(128,128,128,0.10)"}
STATE_ORDER = ["UNINITIALIZED", "INITIALIZING", "ACTIVE", "DEGRADED", "ERROR", "SHUTDOWN"]
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
CONFIG = {"displaylogo": False, "responsive": True}


def _e(x: Any) -> str:
    return html.escape(str(x))


def _layout(fig: go.Figure, title: str, y: str, height: int = 340,
            end_t: float | None = None) -> go.Figure:
    """`end_t`: a time chart's x axis spans exactly the session, 0 .. end_t, so the charts over
    time line up with each other."""
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=50, b=45),
                      xaxis_title="seconds since start", yaxis_title=y, template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    if end_t is not None and end_t > 0:
        fig.update_xaxes(range=[0, end_t])
    return fig


def si(x: float) -> str:
    """12.3 M, 45.6 k, 789."""
    for unit, s in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= s:
            return f"{x / s:.3g} {unit}"
    return f"{x:.3g}"


def duration(s: float) -> str:
    """A bucket width in words: 10 ms, 2 s, 500 µs."""
    if s >= 1:
        return f"{s:g} s"
    if s >= 1e-3:
        return f"{s * 1e3:g} ms"
    return f"{s * 1e6:g} µs"


def _div(fig: go.Figure, name: str) -> str:
    return ('<div class="chart">' + pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                                 div_id=f"chart-{name}", config=CONFIG)
            + "</div>")


def _intervals(data: ReportData) -> list[tuple[float, float, str]]:
    """(start, end, state) from the status changes."""
    out = []
    for i, (t, _frm, to, _why) in enumerate(data.status):
        end = data.status[i + 1][0] if i + 1 < len(data.status) else data.end_t
        out.append((t, max(end, t), to))
    return out


def memory_chart(data: ReportData) -> str:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=data.t, y=[v / MIB for v in data.current], name="live (MiB)",
                             mode="lines", line=dict(color=PALETTE[0])))
    fig.add_trace(go.Scatter(x=data.t, y=[v / MIB for v in data.peak], name="peak so far",
                             mode="lines", line=dict(color=PALETTE[3], dash="dot")))
    peak = data.doc["memory_stats"]["peak_bytes_allocated"]
    if data.peak_t is not None:
        fig.add_trace(go.Scatter(x=[data.peak_t], y=[peak / MIB], name="peak",
                                 mode="markers+text", text=[f"peak {peak / MIB:.2f} MiB"],
                                 textposition="top center",
                                 marker=dict(color=PALETTE[3], size=11, symbol="diamond")))
    for t0, t1, state in _intervals(data):
        if state in STATE_COLORS and t1 > t0:
            fig.add_vrect(x0=t0, x1=t1, fillcolor=STATE_COLORS[state], line_width=0,
                          annotation_text=state, annotation_position="top left")
    return _div(_layout(fig, "Memory over time (tracked live bytes; shaded: health not ACTIVE)",
                        "MiB", end_t=data.end_t), "memory")


def rates_chart(data: ReportData) -> str:
    """Both rates per time bucket as steps: allocations/s a wide solid line, frees/s a narrower
    dashed one drawn over it (equal rates, the usual case, still show both); the session's
    averages as dotted lines."""
    fig = go.Figure()
    xs = [*data.rate_t, data.end_t] if data.rate_t else []
    for name, ys, color, line in (
            ("allocations/s", data.alloc_rate, PALETTE[2], dict(width=3.5)),
            ("frees/s", data.free_rate, PALETTE[1], dict(width=1.6, dash="dash"))):
        fig.add_trace(go.Scatter(x=xs, y=[*ys, ys[-1]] if ys else [], name=name, mode="lines",
                                 line_shape="hv", line=dict(color=color, **line),
                                 hovertemplate="%{x:.6g} s: %{y:.4s}/s<extra>" + name
                                 + "</extra>"))
    if data.end_t > 0:
        for name, avg, color in (("allocations", data.avg_alloc_rate, PALETTE[2]),
                                 ("frees", data.avg_free_rate, PALETTE[1])):
            fig.add_trace(go.Scatter(x=[0, data.end_t], y=[avg, avg], mode="lines",
                                     name=f"average {si(avg)} {name}/s",
                                     line=dict(color=color, width=1, dash="dot"),
                                     hoverinfo="skip"))
    title = (f"Allocation and free rates (per {duration(data.bucket_s)} bucket; averages "
             f"{si(data.avg_alloc_rate)} allocations/s, {si(data.avg_free_rate)} frees/s)")
    fig = _layout(fig, title, "per second", end_t=data.end_t)
    fig.update_yaxes(rangemode="tozero")
    return _div(fig, "rates")


def health_chart(data: ReportData) -> str:
    xs, ys, text = [], [], []
    for t, frm, to, why in data.status:
        if not xs:
            xs.append(0.0)
            ys.append(frm)
            text.append("start")
        xs.append(t)
        ys.append(to)
        text.append(why)
    if xs:
        xs.append(max(data.end_t, xs[-1]))
        ys.append(ys[-1])
        text.append("end")
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", line_shape="hv", text=text,
                               hovertemplate="%{x:.3f} s: %{y} (%{text})<extra></extra>",
                               line=dict(color=PALETTE[4])))
    fig.update_yaxes(categoryorder="array", categoryarray=STATE_ORDER)
    return _div(_layout(fig, "Health changes", "status", height=260, end_t=data.end_t),
                "health")


def modules_over_time_chart(data: ReportData) -> str:
    fig = go.Figure()
    names = list(data.module_series)
    shown, other = names[:8], names[8:]
    for i, name in enumerate(shown):
        fig.add_trace(go.Scatter(x=data.module_t, y=[v / MIB for v in data.module_series[name]],
                                 name=name, mode="lines", stackgroup="m",
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    if other:
        tot = [sum(data.module_series[n][i] for n in other) / MIB
               for i in range(len(data.module_t))]
        fig.add_trace(go.Scatter(x=data.module_t, y=tot, name=f"{len(other)} others",
                                 mode="lines", stackgroup="m"))
    return _div(_layout(fig, "Live bytes per module over time (stacked, at the memory chart's "
                        "sample times)", "MiB", end_t=data.end_t), "modules-time")


def module_bars(data: ReportData) -> list[tuple[str, dict[str, int]]]:
    """(legend, live bytes by module) of the live-vs-leaked chart: a recording has the module
    series, so its sample nearest the peak; a directory the last snapshot (the same blocks as
    the leak report once the session ended)."""
    bars = []
    if data.module_peak is not None:
        bars.append((f"live at {data.module_peak_t:.3f} s (the sample nearest the peak at "
                     f"{data.peak_t:.3f} s)", data.module_peak))
    else:
        bars.append(("live at the last snapshot",
                     data.doc.get("monitor", {}).get("modules_live_bytes", {}) or {}))
    if data.leaks is not None:
        bars.append(("leaked (still live at the end)",
                     {g.module: g.bytes for g in data.leaks.modules}))
    return bars


def modules_chart(data: ReportData) -> str:
    bars = module_bars(data)
    names = sorted({m for _, b in bars for m in b}, key=lambda m: -max(b.get(m, 0)
                                                                       for _, b in bars))[:20]
    fig = go.Figure()
    for (legend, b), color in zip(bars, (PALETTE[0], PALETTE[3]), strict=False):
        fig.add_trace(go.Bar(x=names, y=[b.get(m, 0) / MIB for m in names], name=legend,
                             marker_color=color))
    fig.update_layout(barmode="group")
    fig = _layout(fig, "Live and leaked bytes per module", "MiB")
    fig.update_xaxes(title="module")
    return _div(fig, "modules")


def hist_chart(data: ReportData) -> str:
    assert data.hist is not None
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[h.label for h in data.hist], y=[h.allocations for h in data.hist],
                         name="allocations", marker_color=PALETTE[0],
                         customdata=[[f"{h.min_bytes:,}", f"{h.max_bytes:,}"] for h in data.hist],
                         hovertemplate="%{customdata[0]}..%{customdata[1]} bytes: %{y} "
                         "allocations<extra></extra>"))
    fig = _layout(fig, "Allocation sizes (all allocations of the session, power-of-two "
                  "classes)", "allocations")
    fig.update_xaxes(title="size (bytes)", type="category")
    fig.update_yaxes(type="log")
    return _div(fig, "sizes")


def _mib(b: float) -> str:
    return f"{b / MIB:,.2f} MiB" if b >= MIB / 100 else f"{b:,.0f} bytes"


FLAME_COLORS = ["#f4a261", "#e9c46a", "#e76f51", "#f6bd60", "#ee9b00", "#ca6702", "#f28482",
                "#ffb703", "#d4a373", "#fb8500"]


def _flame_color(label: str) -> str:
    """One warm colour per module (the label up to `!` or `+`): a plugin's frames stand out
    from the game's. A stable hash: the same page for the same data."""
    if label == "all sampled stacks":
        return "#eeeeee"
    mod = label.split("!", 1)[0].split("+", 1)[0]
    return FLAME_COLORS[sum(mod.encode()) % len(FLAME_COLORS)]


def flame_chart(fl: FlameData) -> str:
    """The flame graphs (root at the bottom, callers below callees, width = estimated bytes) of
    the three views, one shown at a time (the menu); click a frame to zoom into it."""
    fig = go.Figure()
    keys = [k for k, v in fl.views.items() if v.total > 0]
    for i, k in enumerate(keys):
        v = fl.views[k]
        share = [x / v.total for x in v.values]
        fig.add_trace(go.Icicle(
            ids=v.ids, labels=v.labels, parents=v.parents, values=v.values,
            branchvalues="total", visible=i == 0, name=v.title, sort=False,
            tiling=dict(orientation="v", flip="y"), root=dict(color="#f3f3f3"),
            customdata=[[_mib(x), f"{s:.1%}", n] for x, s, n in zip(v.values, share, v.counts,
                                                                   strict=True)],
            texttemplate="%{label}", marker=dict(colors=[_flame_color(x) for x in v.labels]),
            hovertemplate="%{label}<br>estimated %{customdata[0]} (%{customdata[1]}), "
            "from %{customdata[2]} sampled<extra>" + v.title + "</extra>"))
    titles = [f"Sampled stacks: estimated bytes {fl.views[k].title} "
              f"({_mib(fl.views[k].total)} in all, {fl.views[k].sampled:,} sampled)"
              for k in keys]
    buttons = [dict(label=fl.views[k].title, method="update",
                    args=[{"visible": [j == i for j in range(len(keys))]},
                          {"title": titles[i]}]) for i, k in enumerate(keys)]
    fig.update_layout(title=titles[0] if titles else "", height=560,
                      margin=dict(l=10, r=10, t=80, b=10), template="plotly_white",
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right",
                                        y=1.12, yanchor="top", showactive=True)])
    return _div(fig, "flame")


def _flame_section(data: ReportData) -> list[str]:
    fl = data.flame
    if fl is None:
        return []
    out = ["<h2>Sampled stacks (estimates)</h2>",
           f'<p class="note">Every allocation is counted exactly above; only stacks are '
           f"sampled: about one allocation per {fl.sample_bytes:,} bytes allocated "
           f"(--sample-bytes), {fl.sampled_allocations:,} in this session. Each sampled "
           "allocation of s bytes stands for s / (1 - exp(-s/N)) bytes, as heapprofd and tcmalloc "
           "estimate: widths are estimates, good to about sqrt(N / bytes) of a frame's bytes "
           "(docs/attribution.md). Frame 0 (the top of a flame) is the allocating call; callers "
           "are below it. The peak view is at the first moment live bytes reached their peak"
           + (f" ({fl.peak_t:.3f} s)" if fl.peak_t is not None else "") + ".</p>"]
    if fl.stackless or fl.discarded:
        out.append(f'<p class="note">{fl.stackless:,} sampled allocations lost their stack '
                   f"(shown by their call site alone); {fl.discarded:,} stacks lost their call "
                   "(dropped records).</p>")
    if any(v.total > 0 for v in fl.views.values()):
        out.append(flame_chart(fl))
    else:
        out.append('<p class="note">no sampled allocation</p>')
    return out


def _stacks_cell(stacks: list[Any]) -> str:
    if not stacks:
        return ""
    items = []
    for st in stacks:
        frames = "<br>&larr; ".join(f"<code>{_e(f)}</code>" for f in st.frames) or "?"
        items.append(f"<li>{st.blocks:,} sampled blocks (estimated {_mib(st.est_bytes)}):<br>"
                     f"{frames}</li>")
    return (f"<details><summary>{plural(len(stacks), 'stack')}</summary><ol>"
            + "".join(items) + "</ol></details>")


def _table(head: list[str], rows: list[list[Any]], numeric: set[int]) -> str:
    out = ['<table class="t"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ' class="n"' if i in numeric else ""
            cells.append(f"<td{cls}>{v}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _cards(data: ReportData) -> str:
    d = data.doc
    p, ms, mon = d["plugin"], d["memory_stats"], d.get("monitor", {}) or {}
    status = str(p["status"]).upper()
    health = "HEALTHY" if p["is_healthy"] else "UNHEALTHY"
    cards = [
        ("status", f'<span class="{status}">{status}</span>'),
        ("health", f'<span class="{health}">{health}</span>'),
        ("uptime", f"{p['uptime_seconds']:,.1f} s"),
        ("allocations", f"{ms['total_allocations']:,}"),
        ("frees", f"{ms['total_frees']:,}"),
        ("live at end", f"{ms['current_bytes_allocated'] / MIB:,.2f} MiB"),
        ("peak", f"{ms['peak_bytes_allocated'] / MIB:,.2f} MiB"),
        ("failures", f"{ms['allocation_failures']:,}"),
        ("dropped events", f"{int(mon.get('dropped_events', 0)):,}"),
        ("untracked frees", f"{int(mon.get('untracked_frees', 0)):,}"),
        *_ring_cards(data, mon),
        ("warnings / errors", f"{d['health']['warning_count']} / {d['health']['error_count']}"),
    ]
    return "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div>'
                   "</div>" for k, v in cards)


def _us(us: int) -> str:
    if us < 1000:
        return f"{us} µs"
    return f"{us / 1e3:,.1f} ms" if us < 1_000_000 else f"{us / 1e6:,.2f} s"


def _ring_cards(data: ReportData, mon: dict[str, Any]) -> list[tuple[str, str]]:
    """Issue 13: stalls (a session that had them or knows its --on-full policy) and the
    blocks set aside as uncertain; nothing for an older session without either."""
    cards = []
    stalls = int(mon.get("stalls") or 0)
    if stalls or mon.get("on_full") is not None:
        detail = (f' <span class="note">({_us(int(mon.get("stall_total_us") or 0))}, longest '
                  f'{_us(int(mon.get("stall_max_us") or 0))})</span>' if stalls else "")
        cards.append(("stalls", f"{stalls:,}{detail}"))
    if mon.get("dropped_frees"):
        cards.append(("lost frees", f"{int(mon['dropped_frees']):,}"))
    if data.leaks is not None and data.leaks.uncertain_allocations:
        cards.append(("uncertain blocks", f"{data.leaks.uncertain_allocations:,}"))
    return cards


def _uncertain_section(data: ReportData) -> list[str]:
    rep = data.leaks
    if rep is None or not rep.uncertain_allocations:
        return []
    when = ("" if rep.uncertain_until_us is None else
            f" at or before {rep.uncertain_until_us / 1e6:.6f} s")
    why = f" ({_e(rep.uncertain_reason)})" if rep.uncertain_reason else ""
    rows = [[_e(g.module), _e("" if g.offset is None else f"0x{g.offset:x}"),
             _e(g.function or ""), f"{g.allocations:,}", f"{g.bytes:,}",
             _e(f"{g.min_size}..{g.max_size}"), _e("+".join(g.heaps))]
            for g in rep.uncertain_sites[:20]]
    out = [f"<h2>Uncertain: {plural(rep.uncertain_allocations, 'block', sep=True)}, "
           f"{plural(rep.uncertain_bytes, 'byte', sep=True)} set aside, not leaks</h2>",
           f'<p class="note">Still live at the end but allocated{_e(when)}, when free records '
           f"were lost{why}: one of the lost frees may have freed them. They are not counted "
           "as leaks; blocks allocated later are.</p>",
           _table(["module", "offset", "function", "blocks", "bytes", "sizes", "heaps"], rows,
                  {3, 4})]
    if len(rep.uncertain_sites) > 20:
        out.append(f'<p class="note">{len(rep.uncertain_sites) - 20} more call sites in the '
                   "leaks CSV (uncertain-site rows)</p>")
    return out


def render(data: ReportData) -> str:
    mon = data.doc.get("monitor", {}) or {}
    body: list[str] = []
    body.append("<h2>Memory</h2>")
    if data.t:
        body.append(memory_chart(data))
        body.append(rates_chart(data))
    else:
        body.append('<p class="note">no CSV rows: no time series</p>')
    body.append("<h2>Health</h2>")
    body.append(health_chart(data))
    body.append("<h2>Modules</h2>")
    if data.module_series and data.module_t:
        body.append(modules_over_time_chart(data))
    body.append(modules_chart(data))
    if data.leaks is not None and data.leaks.sites:
        fl = data.flame
        head = ["module", "offset", "function", "blocks", "bytes", "sizes", "heaps"]
        rows = [[_e(g.module), _e("" if g.offset is None else f"0x{g.offset:x}"),
                 _e(g.function or ""), f"{g.allocations:,}", f"{g.bytes:,}",
                 _e(f"{g.min_size}..{g.max_size}"), _e("+".join(g.heaps))]
                for g in data.leaks.sites[:LEAK_ROWS]]
        if fl is not None:  # the callers: the sampled stacks of the site's live blocks
            head.append("sampled stacks of its live blocks")
            for row, g in zip(rows, data.leaks.sites, strict=False):
                row.append(_stacks_cell(fl.site_stacks.get((g.module, g.offset), [])))
        body.append(f"<h2>Leaks: {plural(data.leaks.allocations, 'block', sep=True)}, "
                    f"{plural(data.leaks.bytes, 'byte', sep=True)} live at end, top call "
                    "sites</h2>")
        body.append(_table(head, rows, {3, 4}))
        if len(data.leaks.sites) > LEAK_ROWS:
            body.append(f'<p class="note">{len(data.leaks.sites) - LEAK_ROWS} more call sites '
                        "in the leaks CSV</p>")
    body += _uncertain_section(data)
    body += _flame_section(data)
    body.append("<h2>Allocation sizes</h2>")
    if data.hist:
        body.append(hist_chart(data))
    else:
        body.append('<p class="note">no allocation size classes in the stats JSON</p>')
    body.append("<h2>Largest allocations</h2>")
    if data.largest:
        rows = [[f"{x.t:.6f}", f"{x.size:,}", f"{x.dur_us:,}", x.tid or "", _e(x.heap),
                 _e(x.where)] for x in data.largest]
        body.append(_table(["time (s)", "bytes", "took (µs)", "thread", "heap", "caller"], rows,
                           {0, 1, 2, 3}))
    else:
        body.append('<p class="note">none</p>')
    body.append("<h2>Warnings and errors</h2>")
    if data.messages:
        rows = [[f"{t:.6f}", f'<span class="lvl-{_e(lvl)}">{_e(lvl)}</span>', _e(msg)]
                for t, lvl, msg in data.messages]
        body.append(_table(["time (s)", "level", "message"], rows, {0}))
        if data.messages_omitted:
            body.append(f'<p class="note">{data.messages_omitted} more in the log</p>')
    else:
        body.append('<p class="note">none</p>')
    for note in data.notes:
        body.append(f'<p class="note">{_e(note)}</p>')

    banner = ""
    if data.error:
        banner = (f'<p class="banner">The recording is damaged: {_e(data.error)}. '
                  "This report covers the intact part.</p>")
    zero = int(data.doc["timestamp"]) - round(float(data.doc["plugin"]["uptime_seconds"]) * 1e6)
    started = datetime.fromtimestamp(round(zero / 1e6), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    target = mon.get("target", "?")
    tpl = Template(resources.files(__package__).joinpath("template.html").read_text("utf-8"))
    return tpl.safe_substitute(
        title=_e(f"nvse-monitor report: {target}"),
        heading=_e(f"nvse-monitor report: {target} (PID {mon.get('pid', '?')})"),
        subtitle=_e(f"{mon.get('platform', '?')}/{mon.get('arch', '?')}, {mon.get('mode', '?')}, "
                    f"profile {mon.get('profile', '?')}; started {started}; from {data.kind} "
                    f"{data.source}; nvse-monitor {__version__}"),
        banner=banner, cards=_cards(data), body="\n".join(body),
        plotlyjs=get_plotlyjs().replace("</script", "<\\/script"),
    )
