"""Live commands: attach, spawn, profiles."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..capture.agent_host import DEFAULT_MAX_WAIT_MS, DEFAULT_SAMPLE_BYTES, MAX_SAMPLE_BYTES
from ..outputs.files import DEFAULT_PREFIX
from ..outputs.pipeline import DEFAULT_OUT_DIR
from ..words import plural
from . import UserError, main
from .offline import file_limit_options, limits_from
from .views import metrics_options


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
    # --help lists them in this order: what most sessions set first, the file caps and
    # /metrics last (the innermost decorators are listed last)
    f = file_limit_options(metrics_options(f))
    f = click.option("--top", is_flag=True, help="Show the live dashboard (docs/views.md) "
                     "instead of the status line.")(f)
    opts = [
        click.option("--profile", "-p", help="Hook profile name or TOML path (default: chosen "
                     "from the target; see `nvse-monitor profiles`). FalloutNV.exe: "
                     "fnv-1.4.0.525; fnv-1.4.0.525-noscrap turns the scrap heap off, "
                     "fnv-1.4.0.525-win32 turns kernel32 Heap*/Virtual* hooks on."),
        click.option("--out", "out_dir", type=click.Path(path_type=Path),
                     help="Directory for the four monitoring files (default: the game's "
                     f"Data/NVSE/Plugins for FalloutNV.exe, else ./{DEFAULT_OUT_DIR})."),
        click.option("--duration", type=click.FloatRange(min=0, min_open=True),
                     help="Stop after this many seconds (like Ctrl-C)."),
        click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
                     help="File name prefix of the four files."),
        click.option("--record", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also write a recording of the session (replay it later)."),
        click.option("--ring-size", callback=_ring_size,
                     help="Agent ring slots (power of two, 64 bytes each; default 512K on 64-bit "
                     "targets, 128K on 32-bit ones, where address space is scarce)."),
        click.option("--on-full", type=click.Choice(["wait", "drop"]), default="wait",
                     show_default=True, help="When the agent's ring is full: the allocating "
                     "thread waits for the monitor to catch up (lossless), or its event is "
                     "dropped (counted; blocks whose fate it decided are marked uncertain)."),
        click.option("--max-wait-ms", type=click.IntRange(min=0, max=60000),
                     default=DEFAULT_MAX_WAIT_MS, show_default=True,
                     help="--on-full wait: the longest one call waits for a free slot before "
                     "its event is dropped (counted)."),
        click.option("--sample-bytes", type=click.IntRange(min=0, max=MAX_SAMPLE_BYTES),
                     default=DEFAULT_SAMPLE_BYTES, show_default=True,
                     help="Record the stack of about one allocating call per this many bytes "
                     "allocated (Poisson sampling, like heapprofd; exact counts are not "
                     "sampled); 0 = off (no sampling code in the target)."),
        click.option("--addrspace-warn-mb", type=click.FloatRange(min=0), default=256,
                     show_default=True, help="32-bit targets: sample the address space about "
                     "once a second (<prefix>_addrspace.csv) and warn when its largest free "
                     "block falls under this many MiB; 0 = do not sample."),
        click.option("--symbols-every", type=click.FloatRange(min=0), default=2.0,
                     show_default=True, metavar="SECONDS",
                     help="Ask the agent for the function names of the call sites shown "
                     "(leaks, largest allocations) this often, and once at stop; 0 = never "
                     "(call sites stay module+offset). docs/symbols.md."),
        click.option("--force", is_flag=True,
                     help="Use --profile even if it names other executables or another "
                     "executable version."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _run(kind: str, target: Any, spawn: dict[str, Any] | None = None, **kw: Any) -> None:
    from ..capture.session import LiveSession, SessionError, SessionOptions
    from ..capture.targets import TargetError

    opts = SessionOptions(
        **(spawn or {}),
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
        on_full=kw["on_full"],
        max_wait_ms=kw["max_wait_ms"],
        symbols_interval_s=kw["symbols_every"],
        sample_bytes=kw["sample_bytes"],
    )
    opts.addrspace_warn_bytes = int(kw["addrspace_warn_mb"] * 2**20)
    if kw.get("ring_size"):
        opts.ring_slots = kw["ring_size"]
    live = LiveSession(opts)
    try:
        result = live.run_attach(target) if kind == "attach" else live.run_spawn(list(target))
    except (TargetError, SessionError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("nvse-monitor: interrupted before monitoring started", err=True)
        sys.exit(130)
    end = result.end
    c = result.final_counters
    # The agent's exact call counts (the files count reallocs as free + alloc).
    tail = (f", {plural(c.allocs, 'alloc call', sep=True)}, "
            f"{plural(c.reallocs, 'realloc call', sep=True)}, {plural(c.frees, 'free', sep=True)}, "
            f"{c.dropped:,} dropped" if c is not None else "")
    if c is not None and c.stalls:  # --on-full wait: calls that waited for a ring slot
        tail += f", {c.stalls:,} stalls ({c.stall_us:,} µs, longest {c.stall_max_us:,} µs)"
    how = "" if end.expected else f" (unexpected: {end.crash})" if end.crash else " (unexpected)"
    click.echo(
        f"nvse-monitor: session ended: {end.reason}{how}{tail}; "
        f"{plural(result.records, 'event', sep=True)}; files in {live.out_dir}"
        + (f"; recording {opts.record}" if opts.record else ""),
        err=True,
    )
    for note in result.notes:
        click.echo(f"nvse-monitor: {note}", err=True)
    _leave(result.exit_code, target_gone=end.reason in TARGET_GONE)


# Session ends after which the target process no longer exists.
TARGET_GONE = ("target-exited", "process-terminated")


def _leave(code: int, target_gone: bool) -> None:
    """Exit once the session is over and every file is final and closed. Frida's own teardown at
    interpreter exit was seen to block for good after a child-gated `launch` whose target had
    exited; then the process leaves without it (`os._exit`). Never while the target lives on:
    cutting Frida's helper off in the middle of its unload made such a target crash (1 in 20).
    In-process callers (click's test runner: stdout without a file descriptor) get SystemExit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout.fileno()
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        sys.exit(code)
    if target_gone:
        os._exit(code)
    sys.exit(code)


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
@click.option("--follow-child", is_flag=True, help="Monitor the child PROGRAM starts (a "
              "launcher such as nvse_loader.exe, which is followed without asking), not PROGRAM.")
@click.option("--child-name", metavar="NAME", help="With --follow-child: the child's executable "
              "name (default: the first child that runs a program).")
def spawn(program: tuple[str, ...], follow_child: bool, child_name: str | None,
          **kw: Any) -> None:
    """Start PROGRAM suspended, install the hooks, resume it and monitor it until it exits.

    Put `--` before the program so its options are not taken as ours:
    nvse-monitor spawn --out stats -- ./game --windowed
    """
    _run("spawn", program, {"follow_child": follow_child or child_name is not None,
                            "child_name": child_name}, **kw)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("game_dir", type=click.Path(exists=True, path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_session_options
def launch(game_dir: Path, args: tuple[str, ...], **kw: Any) -> None:
    """Start Fallout New Vegas from GAME_DIR (or its nvse_loader.exe / FalloutNV.exe) and
    monitor it from its first allocation.

    Through nvse_loader.exe when the game directory has one (the monitor follows the loader to
    the FalloutNV.exe it starts), else, or for a 4GB-patched FalloutNV.exe, the game directly;
    in the game directory, with SteamAppID/SteamGameId=22380. Game arguments go after `--`.
    (`spawn -- FalloutNV.exe` starts exactly that executable.)
    """
    from ..capture import fnv

    try:
        plan = fnv.plan_launch(game_dir, args, large_address_aware=_large_address_aware(game_dir),
                               game_as_dir=True)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"nvse-monitor: launching {plan.argv[0]} ({plan.reason})", err=True)
    _run("spawn", list(plan.argv), {
        "spawn_cwd": plan.cwd, "spawn_env": plan.env, "follow_child": plan.gate_children,
        "child_name": plan.child_name}, **kw)


def _large_address_aware(target: Path) -> bool | None:
    """Whether the game executable at/in `target` is 4GB patched (None: unknown, not a PE)."""
    from ..capture import fnv, pe

    gd = fnv.game_dir_at(target) if target.is_dir() else fnv.find_game_dir(target, max_up=0)
    exe = gd.game_exe if gd is not None else None
    if exe is None or not pe.is_pe(exe):
        return None
    try:
        return pe.read_pe_version(exe).large_address_aware
    except pe.PeError:
        return None


@main.command()
def profiles() -> None:
    """List the bundled hook profiles."""
    from ..capture.hookprofile import list_profiles

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
