"""Live commands: attach, spawn, profiles."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli import main
from .cli_offline import file_limit_options, limits_from
from .cli_views import metrics_options
from .pipeline import DEFAULT_OUT_DIR
from .writers import DEFAULT_PREFIX


def _ring_size(_ctx: Any, _param: Any, value: str | None) -> int | None:
    """Ring slots: a power of two, optionally with a K or M suffix (64K, 1M)."""
    if value is None:
        return None
    text = value.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    digits = text[:-1] if mult > 1 else text
    try:
        n = int(digits) * mult
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a number of slots (e.g. 262144, 256K, 1M)") from None
    if n < 1024 or n > (1 << 26) or n & (n - 1):
        raise click.BadParameter(f"{value!r}: must be a power of two from 1024 to 64M slots")
    return n


def _session_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--profile", "-p", help="Hook profile name or TOML path (default: chosen "
                     "from the target; see `nvse-monitor profiles`)."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                     default=DEFAULT_OUT_DIR, show_default=True,
                     help="Directory for the four monitoring files."),
        click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
                     help="File name prefix of the four files."),
        click.option("--record", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write a recording of the session (replay it later)."),
        click.option("--duration", type=click.FloatRange(min=0, min_open=True),
                     help="Stop after this many seconds (like Ctrl-C)."),
        click.option("--ring-size", callback=_ring_size,
                     help="Agent ring slots (power of two, 64 bytes each; default 128K)."),
        click.option("--force", is_flag=True,
                     help="Use --profile even if it names other executables."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    f = click.option("--top", is_flag=True, help="Show the live dashboard (docs/views.md) "
                     "instead of the status line.")(f)
    return file_limit_options(metrics_options(f))


def _run(kind: str, target: Any, **kw: Any) -> None:
    from .session import LiveSession, SessionError, SessionOptions
    from .targets import TargetError

    opts = SessionOptions(
        profile=kw["profile"],
        out_dir=kw["out_dir"],
        prefix=kw["prefix"],
        record=kw["record"],
        duration=kw["duration"],
        force=kw["force"],
        limits=limits_from(kw),
        metrics_port=kw["metrics_port"],
        metrics_address=kw["metrics_address"],
        top=kw["top"],
    )
    if kw.get("ring_size"):
        opts.ring_slots = kw["ring_size"]
    live = LiveSession(opts)
    try:
        result = live.run_attach(target) if kind == "attach" else live.run_spawn(list(target))
    except (TargetError, SessionError) as exc:
        click.echo(f"nvse-monitor: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("nvse-monitor: interrupted before monitoring started", err=True)
        sys.exit(130)
    end = result.end
    c = result.final_counters
    # The agent's exact call counts (the files count reallocs as free + alloc).
    tail = (f", {c.allocs:,} alloc calls, {c.reallocs:,} realloc calls, {c.frees:,} frees, "
            f"{c.dropped:,} dropped" if c is not None else "")
    how = "" if end.expected else f" (unexpected: {end.crash})" if end.crash else " (unexpected)"
    click.echo(
        f"nvse-monitor: session ended: {end.reason}{how}{tail}; "
        f"{result.records:,} events; files in {opts.out_dir}"
        + (f"; recording {opts.record}" if opts.record else ""),
        err=True,
    )
    for note in result.notes:
        click.echo(f"nvse-monitor: {note}", err=True)
    sys.exit(result.exit_code)


@main.command()
@click.argument("target")
@_session_options
def attach(target: str, **kw: Any) -> None:
    """Attach to a running process (name or PID) and monitor it until Ctrl-C, --duration, or
    its exit. The target keeps running unharmed when the monitor leaves."""
    _run("attach", target, **kw)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("program", nargs=-1, required=True, type=click.UNPROCESSED)
@_session_options
def spawn(program: tuple[str, ...], **kw: Any) -> None:
    """Start PROGRAM suspended, install the hooks, resume it and monitor it until it exits.

    Put `--` before the program so its options are not taken as ours:
    nvse-monitor spawn --out stats -- ./game --windowed
    """
    _run("spawn", program, **kw)


@main.command()
def profiles() -> None:
    """List the bundled hook profiles."""
    from .hookprofile import list_profiles

    rows = []
    for p in list_profiles():
        arch = ",".join(p.arch) if isinstance(p.arch, list | tuple) else str(p.arch)
        rows.append((p.name, p.platform, arch, p.description))
    if not rows:
        click.echo("no bundled profiles")
        return
    header = ("NAME", "PLATFORM", "ARCH", "DESCRIPTION")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, *rows]:
        cols = [v.ljust(w) for v, w in zip(r[:3], widths, strict=True)]
        click.echo("  ".join([*cols, r[3]]))
