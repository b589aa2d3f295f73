"""`nvse-monitor top`: a live terminal dashboard (rich) of a running session.

Two sources, one dashboard: a live session's Pipeline (`attach/spawn --top`: the engine's state
between feeds via Pipeline.snapshot_now) or an output directory another session is writing (the
stats JSON, replaced atomically, and the log's tail). Either way the dashboard samples its
source on its own thread at ~2 Hz and never sees single events, so the session's consumer
thread only pays for one snapshot (a few dict copies) per refresh.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..engine import leaks as leaks_mod
from ..outputs.files import FilePaths
from ..words import plural

SPARK = "▁▂▃▄▅▆▇█"
MIB = 1 << 20
STATUS_STYLE = {"ACTIVE": "bold green", "DEGRADED": "bold yellow", "ERROR": "bold red",
                "SHUTDOWN": "bold blue", "INITIALIZING": "cyan", "UNINITIALIZED": "dim"}
LEVEL_STYLE = {"WARN": "yellow", "ERROR": "red", "CRITICAL": "bold red"}


def sparkline(values: list[float], width: int) -> str:
    """The last `width` values as block characters, scaled 0..max (flat memory looks flat)."""
    vals = values[-width:]
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in vals)


def mb(n: float) -> str:
    """Bytes in binary units, as the report says them (MiB = 2^20 bytes)."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):,.2f} GiB"
    return f"{n / MIB:,.2f} MiB" if n >= MIB else f"{n / 1024:,.1f} KiB"


def fit(shown: list[int], room: int, floor: int = 2) -> list[int]:
    """Rows per list (wanted counts in `shown`) so that their sum fits `room`: the longest
    gives up rows first, none under `floor` unless nothing else can."""
    rows = list(shown)
    while sum(rows) > max(room, 0):
        i = max(range(len(rows)), key=lambda k: rows[k])
        if rows[i] <= floor and all(r <= floor for r in rows):
            floor = 0
            continue
        rows[i] -= 1
    return rows


class LogTail:
    """The last warning/error lines of a log file, read incrementally (new bytes only)."""

    def __init__(self, path: Path, keep: int = 8) -> None:
        self.path = path
        self.lines: deque[str] = deque(maxlen=keep)
        self._pos = 0
        self._ino: int | None = None
        self._rest = b""

    def poll(self) -> list[str]:
        try:
            st = os.stat(self.path)
            if st.st_ino != self._ino or st.st_size < self._pos:  # new session or rotated
                self._ino, self._pos, self._rest = st.st_ino, 0, b""
                self.lines.clear()
            if st.st_size > self._pos:
                with open(self.path, "rb") as f:
                    f.seek(self._pos)
                    data = f.read(min(st.st_size - self._pos, 4 << 20))
                self._pos += len(data)
                chunk = self._rest + data
                *complete, self._rest = chunk.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace")
                    if any(f"] [{lvl}] " in line for lvl in LEVEL_STYLE):
                        self.lines.append(line)
        except OSError:
            pass
        return list(self.lines)


class DirSource:
    """An output directory another session is writing."""

    def __init__(self, directory: Path | str, prefix: str) -> None:
        self.paths = FilePaths.of(directory, prefix)
        self.leaks_path = leaks_mod.leaks_path(directory, prefix)
        self.request = leaks_mod.request_path(directory, prefix)
        self.tail = LogTail(self.paths.log)
        self.label = str(directory)
        self.problem = ""
        self.ended = False  # the session's JSON says SHUTDOWN: its leaks CSV is final
        self._asked = False  # a request of ours is waiting for the session's answer
        self._leaks: leaks_mod.LeakReport | None = None

    def poll(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.paths.json.read_text(encoding="utf-8"))
            self.problem = ""
            self.ended = str(doc.get("plugin", {}).get("status", "")).upper() == "SHUTDOWN"
            return doc
        except FileNotFoundError:
            self.problem = f"waiting for {self.paths.json}"
        except (OSError, ValueError) as e:
            self.problem = f"cannot read {self.paths.json}: {e}"
        return None

    def warnings(self) -> list[str]:
        return self.tail.poll()

    def leaks(self) -> leaks_mod.LeakReport | None:
        """The blocks live now, from the session writing the directory: this drops a request
        file (`<prefix>_leaks.request`) that the session answers within ~0.5 s by writing the
        leaks CSV; until then the previous answer (None at first). Once the session has ended,
        its final leaks CSV."""
        if self.ended:
            self.close()
        elif self._asked:
            if self.request.exists():
                return self._leaks  # not answered yet
            self._asked = False
        else:
            try:
                self.request.touch()
                self._asked = True
                return self._leaks
            except OSError:  # e.g. a read-only directory: whatever CSV is there
                pass
        self._leaks = self._read() or self._leaks
        return self._leaks

    @property
    def leaks_wait(self) -> str:
        """What the leak panel says before the first answer."""
        if self.ended:
            return f"no leak report in {self.leaks_path.name}"
        return (f"asked the session for the blocks live now ({self.request.name}); waiting for "
                f"{self.leaks_path.name}")

    def _read(self) -> leaks_mod.LeakReport | None:
        try:
            return leaks_mod.read_csv(self.leaks_path)
        except (OSError, ValueError, KeyError):
            return None

    def close(self) -> None:
        """Take back a request nobody answered (leave the directory as it was)."""
        if self._asked:
            self._asked = False
            with contextlib.suppress(OSError):
                self.request.unlink()


def _plain(doc: dict[str, Any]) -> dict[str, Any]:
    """A spec_document with its Fixed floats as floats (they are one level down, in the spec's
    sections; the monitor section is plain values already)."""
    from ..outputs.json import Fixed

    def value(v: Any) -> Any:
        return round(v.value, v.places) if isinstance(v, Fixed) else v

    return {k: ({kk: value(vv) for kk, vv in v.items()} if isinstance(v, dict) and k != "monitor"
                else v) for k, v in doc.items()}


class PipelineSource:
    """A live session's pipeline (attach/spawn --top)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.tail = LogTail(pipeline.paths.log)
        self.label = str(pipeline.paths.log.parent)
        self.problem = ""

    def poll(self) -> dict[str, Any] | None:
        from ..outputs.json import spec_document

        snap = self.pipeline.snapshot_now()
        if snap is None:
            return None
        # the JSON file's document as Python values, without encoding and parsing it again
        return _plain(spec_document(snap, self.pipeline.meta.wall_clock_zero_us))

    def warnings(self) -> list[str]:
        return self.tail.poll()

    def leaks(self) -> leaks_mod.LeakReport | None:
        return self.pipeline.leaks_now()


class Dashboard:
    """Samples a source and renders one frame (pure rendering: testable with a recording
    Console)."""

    def __init__(self, source: Any, history: int = 240) -> None:
        self.source = source
        self.doc: dict[str, Any] | None = None
        self.mem: deque[float] = deque(maxlen=history)
        self.samples: deque[tuple[int, int, int]] = deque(maxlen=8)  # (timestamp, allocs, frees)
        self.warn: list[str] = []
        self.show_leaks = False
        self.by_function = False  # the leak panel groups call sites by function (key f)
        self.leak_report: leaks_mod.LeakReport | None = None
        self._leaks_at = 0.0
        self.rates = (0.0, 0.0)

    def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        doc = self.source.poll()
        if doc is not None:
            self.doc = doc
            ms = doc["memory_stats"]
            ts = int(doc.get("timestamp", 0))
            if not self.samples or ts > self.samples[-1][0]:
                self.samples.append((ts, ms["total_allocations"], ms["total_frees"]))
                self.mem.append(ms["current_bytes_allocated"])
            if len(self.samples) >= 2:
                # over the last ~2 samples' span: per-second rates of the stream's own time
                t0, a0, f0 = self.samples[-2]
                t1, a1, f1 = self.samples[-1]
                dt = (t1 - t0) / 1e6
                if dt > 0:
                    self.rates = ((a1 - a0) / dt, (f1 - f0) / dt)
            else:
                perf = doc.get("performance", {})
                self.rates = (perf.get("allocations_per_second", 0.0),
                              perf.get("frees_per_second", 0.0))
        self.warn = self.source.warnings()
        if self.show_leaks and (self.leak_report is None or now - self._leaks_at > 5.0):
            self.leak_report = self.source.leaks()
            self._leaks_at = now

    def toggle_leaks(self) -> None:
        self.show_leaks = not self.show_leaks
        self.leak_report = None

    def toggle_functions(self) -> None:
        """Top functions: the leak panel's live blocks by their caller's function."""
        if not self.show_leaks:
            self.toggle_leaks()
            self.by_function = True
        else:
            self.by_function = not self.by_function

    def render(self, width: int = 100, height: int | None = None) -> RenderableType:
        """One frame for a terminal `width` columns wide (80 is enough for every figure) and,
        when given, `height` rows high (modules, warnings and leaks give up rows to fit)."""
        doc = self.doc
        if doc is None:
            return Panel(Text(self.source.problem or "waiting for the first snapshot...",
                              style="dim"), title="nvse-monitor top")
        plugin, ms = doc["plugin"], doc["memory_stats"]
        mon = doc.get("monitor", {}) or {}
        status = str(plugin.get("status", "?")).upper()
        ended = status == "SHUTDOWN"
        # status first: the line is never cut before what matters most
        head = Text()
        head.append(status, STATUS_STYLE.get(status, ""))
        head.append("  ")
        head.append("HEALTHY" if plugin.get("is_healthy") else "UNHEALTHY",
                    "green" if plugin.get("is_healthy") else "bold red")
        head.append(f"  uptime {plugin.get('uptime_seconds', 0):,.1f} s")
        causes = mon.get("degradation_causes") or []
        if causes:
            head.append(f"  ({', '.join(causes)})", "yellow")
        head.append(f"\n{mon.get('target', '?')} (PID {mon.get('pid', '?')}, "
                    f"{mon.get('arch', '?')}), profile {mon.get('profile', '?')}", "dim")

        # activity and memory in one grid: 73 columns at most for 10-digit rates and 11-digit
        # totals, so an 80-column terminal shows every figure whole
        act = Table.grid(padding=(0, 2))
        for justify in ("left", "right") * 3:
            act.add_column(justify=justify, no_wrap=True, style="bold" if justify == "left"
                           else "")
        if ended:  # the last snapshots' rates mean nothing once it is over: averages
            up = float(plugin.get("uptime_seconds") or 0)
            a_rate = ms["total_allocations"] / up if up > 0 else 0.0
            f_rate = ms["total_frees"] / up if up > 0 else 0.0
        else:
            a_rate, f_rate = self.rates
        drops = int(mon.get("dropped_events", 0))
        act.add_row("allocs/s", f"{a_rate:,.0f}", "allocations", f"{ms['total_allocations']:,}",
                    "current", mb(ms["current_bytes_allocated"]))
        act.add_row("frees/s", f"{f_rate:,.0f}", "frees", f"{ms['total_frees']:,}",
                    "peak", mb(ms["peak_bytes_allocated"]))
        act.add_row("failures", f"{ms['allocation_failures']:,}", "live blocks",
                    f"{ms['current_allocations']:,}", "", "")
        act.add_row(Text("dropped", style="bold red" if drops else "bold"), f"{drops:,}",
                    "untracked frees", f"{int(mon.get('untracked_frees', 0)):,}", "", "")
        spark_w = max(10, min(60, width - 20))
        spark = Text("history  ", style="bold")
        spark.append(sparkline(list(self.mem), spark_w), style="cyan")
        title = ("activity (session ended: rates are averages over its uptime)" if ended
                 else "activity")

        live = sorted((mon.get("modules_live_bytes") or {}).items(), key=lambda kv: -kv[1])
        wanted = [max(1, min(6, len(live))), max(1, min(6, len(self.warn)))]
        if self.show_leaks:
            rep = self.leak_report
            n = (len(leaks_mod.by_function(rep.sites)) if self.by_function else len(rep.sites)) \
                if rep is not None else 1
            wanted.append(max(1, min(8, n)))
        # rows: outer border 2, head (2 or more when wrapped), activity 7, the ring line 0 or 1,
        # module title+header 2, warnings border 2, keys 1; the leak panel's border and header 3
        # (+1 for its uncertain blocks)
        ring = ring_line(mon)
        uncertain = self.show_leaks and bool(getattr(self.leak_report, "uncertain_allocations",
                                                     0))
        fixed = (14 + _lines(head, width - 4) + (ring is not None)
                 + (3 + uncertain if self.show_leaks else 0))
        rows = fit(wanted, (height or 10_000) - fixed)

        mods = Table(title="modules holding bytes at the end" if ended
                     else "modules holding live bytes", title_justify="left", expand=True,
                     box=None, show_edge=False)
        mods.add_column("module", overflow="ellipsis", no_wrap=True)
        mods.add_column("live", justify="right", no_wrap=True)
        mods.add_column("share", justify="right", no_wrap=True)
        total = sum(v for _, v in live) or 1
        for name, v in live[:rows[0]]:
            mods.add_row(name, mb(v), f"{100 * v / total:.0f}%")
        if not live:
            mods.add_row(Text("none", style="dim"), "", "")

        wlines: list[RenderableType] = []
        for line in self.warn[-rows[1]:] if rows[1] else []:
            lvl = next((lv for lv in LEVEL_STYLE if f"] [{lv}] " in line), "WARN")
            msg = line.split("] ", 3)[-1] if line.count("] ") >= 3 else line
            t = Text(no_wrap=True, overflow="ellipsis")
            t.append(f"{line[12:20]}  ", "dim")  # the time of day: the date is today's
            t.append(msg, LEVEL_STYLE[lvl])
            wlines.append(t)
        warn = Group(*wlines) if wlines else Text("no warnings", style="dim")

        parts: list[RenderableType] = [head, Panel(Group(act, spark), title=title)]
        if ring is not None:  # the agent's ring: policy, stalls, lost frees (issue 13)
            parts.append(ring)
        parts += [mods, Panel(warn, title="last warnings")]
        if self.show_leaks:
            parts.append(self._leak_panel(ended, rows[2]))
        parts.append(Text("l: leak report   f: top functions   q: quit", style="dim"))
        return Panel(Group(*parts), title=f"nvse-monitor top: {self.source.label}")

    def _leak_panel(self, ended: bool, rows: int = 8) -> RenderableType:
        rep = self.leak_report
        if rep is None:
            why = getattr(self.source, "leaks_wait", "computing the leak report...")
            return Panel(Text(why, style="dim"), title="leaks")
        t = Table(box=None, expand=True)
        t.add_column("function" if self.by_function else "call site", overflow="ellipsis",
                     no_wrap=True)
        t.add_column("blocks", justify="right", no_wrap=True)
        t.add_column("bytes", justify="right", no_wrap=True)
        if self.by_function:  # exact: every call site lies in one function
            funcs = leaks_mod.by_function(rep.sites)
            for f in funcs[:rows]:
                t.add_row(f.label, f"{f.allocations:,}", f"{f.bytes:,}")
            groups = f"{plural(len(funcs), 'function')}"
        else:
            for g in rep.sites[:rows]:
                t.add_row(g.where, f"{g.allocations:,}", f"{g.bytes:,}")
            groups = f"{plural(len(rep.sites), 'site')}"
        when = "live at the end" if ended else "live now"
        title = (f"{when} by {'function' if self.by_function else 'call site'}: "
                 f"{plural(rep.allocations, 'block', sep=True)}, {mb(rep.bytes)} in {groups}")
        if rep.uncertain_allocations:  # blocks allocated before lost frees: not leaks
            note = Text(f"set aside: {plural(rep.uncertain_allocations, 'block', sep=True)}, "
                        f"{mb(rep.uncertain_bytes)} allocated before lost frees (uncertain)",
                        style="yellow", no_wrap=True, overflow="ellipsis")
            return Panel(Group(t, note), title=title)
        return Panel(t, title=title)


def _lines(text: Text, width: int) -> int:
    """Rows `text` takes when wrapped to `width` columns."""
    con = Console(file=io.StringIO(), width=max(width, 10))
    return len(con.render_lines(text, con.options, pad=False))


def us_text(us: int) -> str:
    """µs as a short duration: 850 µs, 84.2 ms, 1.23 s."""
    if us < 1000:
        return f"{us} µs"
    return f"{us / 1e3:,.1f} ms" if us < 1_000_000 else f"{us / 1e6:,.2f} s"


def ring_line(mon: dict[str, Any]) -> Text | None:
    """One line on the agent's ring (issue 13): policy, stalls, lost frees, invalid records.
    None for a session that has nothing to say (an older JSON, no policy and no stalls)."""
    stalls = int(mon.get("stalls") or 0)
    lost = int(mon.get("dropped_frees") or 0)
    policy = mon.get("on_full")
    if policy is None and not stalls and not lost:
        return None
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("ring ", "bold")
    t.append(f"{policy or '?'}  ")
    t.append(f"stalls {stalls:,}", "yellow" if stalls else "")
    if stalls:
        t.append(f" ({us_text(int(mon.get('stall_total_us') or 0))}, longest "
                 f"{us_text(int(mon.get('stall_max_us') or 0))})")
    t.append("  ")
    t.append(f"lost frees {lost:,}", "bold red" if lost else "")
    bad = int((mon.get("agent_counters") or {}).get("unknown_records") or 0)
    if bad:
        t.append(f"  invalid {bad:,}", "bold red")
    return t


class _Keys:
    """Single key presses from a terminal's stdin (cbreak mode), on a daemon thread."""

    def __init__(self, on_key: Callable[[str], None]) -> None:
        self.on_key = on_key
        self._stop = threading.Event()
        self._old: Any = None
        self._fd = -1

    def start(self) -> _Keys:
        try:
            import termios
            import tty

            if not sys.stdin.isatty():
                return self
            self._fd = sys.stdin.fileno()
            self._old = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        except (ImportError, OSError, ValueError):
            return self
        threading.Thread(target=self._run, name="nvse-monitor-keys", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], 0.2)
                if ready:
                    ch = os.read(self._fd, 1).decode(errors="ignore")
                    if ch:
                        self.on_key(ch)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._old is not None:
            import termios

            with contextlib.suppress(OSError, ValueError):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._old)
            self._old = None


def run_dashboard(source: Any, interval: float = 0.5, console: Console | None = None,
                  stop: threading.Event | None = None,
                  on_quit: Callable[[], None] | None = None,
                  functions: bool = False) -> Dashboard:
    """Refresh the dashboard every `interval` s until `stop` is set or q is pressed
    (`functions`: start with the top functions)."""
    console = console or Console()
    dash = Dashboard(source)
    if functions:
        dash.toggle_functions()
    stop = stop or threading.Event()

    def key(ch: str) -> None:
        if ch in "qQ":
            stop.set()
            if on_quit is not None:
                on_quit()
        elif ch in "lL":
            dash.toggle_leaks()
        elif ch in "fF":
            dash.toggle_functions()

    keys = _Keys(key).start() if console.is_terminal else None
    try:
        dash.poll()
        with Live(dash.render(console.width, console.height), console=console, auto_refresh=False,
                  screen=console.is_terminal, transient=False) as live:
            while not stop.wait(interval):
                dash.poll()
                live.update(dash.render(console.width, console.height), refresh=True)
    finally:
        if keys is not None:
            keys.stop()
        close = getattr(source, "close", None)
        if close is not None:
            close()
    if console.is_terminal:  # the alternate screen is gone: leave the last frame visible
        console.print(dash.render(console.width, console.height))
    return dash


class LiveDashboard:
    """`attach/spawn --top`: the dashboard on its own thread for a live session's pipeline."""

    def __init__(self, pipeline: Any, on_quit: Callable[[], None] | None = None,
                 interval: float = 0.5, console: Console | None = None) -> None:
        self.source = PipelineSource(pipeline)
        self.on_quit = on_quit
        self.interval = interval
        self.console = console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> LiveDashboard:
        def run() -> None:
            try:
                run_dashboard(self.source, self.interval, self.console, self._stop,
                              self.on_quit)
            except Exception as exc:  # noqa: BLE001 - a broken terminal must not end the session
                self.error = exc

        self._thread = threading.Thread(target=run, name="nvse-monitor-top", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
