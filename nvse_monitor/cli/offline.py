"""Offline commands: replay, status, info."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import click

from ..outputs import status as status_file
from ..outputs.files import DEFAULT_PREFIX, FileLimits, FilePaths, OutputDirError
from ..outputs.pipeline import DEFAULT_OUT_DIR, replay
from ..words import plural
from . import UserError, main
from .views import metrics_options, start_metrics


def file_limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--log-max-mb / --csv-max-mb / --keep-rotated (shared by replay, attach and spawn)."""
    d = FileLimits()
    opts = [
        click.option("--log-max-mb", type=click.FloatRange(min=0), default=d.log_max_bytes / 2**20,
                     show_default=True, help="Rotate the log past this size (0: no cap)."),
        click.option("--csv-max-mb", type=click.FloatRange(min=0), default=d.csv_max_bytes / 2**20,
                     show_default=True, help="Rotate the CSV past this size (0: no cap)."),
        click.option("--keep-rotated", type=click.IntRange(min=0, max=100), default=d.backups,
                     show_default=True, help="Rotated files kept per file (<name>.1 newest)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def limits_from(kw: dict[str, Any]) -> FileLimits:
    return FileLimits(log_max_bytes=int(kw.pop("log_max_mb") * 2**20),
                      csv_max_bytes=int(kw.pop("csv_max_mb") * 2**20),
                      backups=kw.pop("keep_rotated"))


# Nagios plugin convention, which monitoring tools already understand.
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def status_exit_code(status: str | None, health: str | None) -> int:
    """ACTIVE: 0 if healthy else 1; DEGRADED 1; ERROR 2; SHUTDOWN (a finished session): 0 if it
    ended healthy else 2; INITIALIZING/UNINITIALIZED or anything unreadable: 3 (cannot tell yet)."""
    healthy = {"HEALTHY": True, "UNHEALTHY": False}.get(health or "")
    if healthy is None:
        return UNKNOWN
    if status == "ACTIVE":
        return OK if healthy else WARNING
    if status == "DEGRADED":
        return WARNING
    if status == "ERROR":
        return CRITICAL
    if status == "SHUTDOWN":
        return OK if healthy else CRITICAL
    return UNKNOWN


@main.command()
@click.argument("directory", required=False, default=str(DEFAULT_OUT_DIR),
                type=click.Path(path_type=Path))
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="File name prefix of the monitoring files.")
def status(directory: Path, prefix: str) -> None:
    """Print the status file in DIRECTORY (default: ./nvse-monitor-out).

    Exit code (Nagios): 0 ACTIVE and healthy (or SHUTDOWN healthy), 1 DEGRADED or ACTIVE but
    unhealthy, 2 ERROR (or SHUTDOWN unhealthy: e.g. an interrupted replay), 3 missing,
    unreadable or still starting. When unhealthy, a last line gives the JSON's last error.
    """
    path = FilePaths.of(directory, prefix).status
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        click.echo(f"UNKNOWN: cannot read {path}: {e.strerror or e}", err=True)
        sys.exit(UNKNOWN)
    except UnicodeDecodeError:
        click.echo(f"UNKNOWN: {path} is not a status file (not UTF-8 text)", err=True)
        sys.exit(UNKNOWN)
    click.echo(text, nl=not text.endswith("\n"))
    fields = status_file.parse(text)
    code = status_exit_code(fields.get("Status"), fields.get("Health"))
    if fields.get("Health") == "UNHEALTHY" and (why := _last_error(directory, prefix)):
        click.echo(f"Last Error: {why}")  # what the status file has no line for (the JSON's)
    if code == UNKNOWN and "Status" not in fields:
        click.echo(f"UNKNOWN: {path} has no 'Status:' line", err=True)
    sys.exit(code)


def files_pattern(out_dir: PurePath, prefix: str) -> str:
    """`DIR/PREFIX_*` with the platform's separator throughout (`out\\MemoryPoolNVSE_*` on
    Windows, not `out\\x/MemoryPoolNVSE_*`)."""
    return str(out_dir / f"{prefix}_*")


def _last_error(directory: Path, prefix: str) -> str | None:
    """The stats JSON's health.last_error ("none" and unreadable: None)."""
    import json

    try:
        doc = json.loads(FilePaths.of(directory, prefix).json.read_text(encoding="utf-8"))
        why = str(doc["health"]["last_error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if why == "none" else why


@main.command("replay")
@click.argument("recording", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path),
              default=str(DEFAULT_OUT_DIR), show_default=True,
              help="Directory for the four monitoring files (created if needed).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="File name prefix of the monitoring files.")
@click.option("--realtime", is_flag=True, help="Pace the replay by the events' own time.")
@file_limit_options
@metrics_options
def replay_cmd(recording: Path, out_dir: Path, prefix: str, realtime: bool, **kw: Any) -> None:
    """Write the four monitoring files from RECORDING.

    A damaged recording: the files are written for its intact part, one line names the file
    and byte offset, exit code 2. Ctrl-C: the files say the replay was interrupted (ERROR, then
    SHUTDOWN unhealthy, no leak report), exit code 130.
    """
    from ..outputs.pipeline import keep_freed_memory
    from ..stream.recording import RecordingError

    keep_freed_memory()
    bar = None
    stderr = sys.stderr
    if stderr.isatty():
        try:
            size = recording.stat().st_size
        except OSError:
            size = 0
        bar = click.progressbar(length=max(size, 1), label="replaying", file=stderr)
    done = 0
    metrics = None

    def progress(offset: int) -> None:
        nonlocal done
        if bar is not None and offset > done:
            bar.update(offset - done)
            done = offset

    try:
        if bar is not None:
            bar.__enter__()
        try:
            metrics = start_metrics(kw.pop("metrics_port"), kw.pop("metrics_address"))
            result = replay(recording, out_dir, prefix, progress=progress, realtime=realtime,
                            limits=limits_from(kw), on_start=metrics and metrics.attach)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
            if metrics is not None:
                metrics.stop()
    except (RecordingError, OutputDirError) as e:
        raise UserError(str(e)) from None
    final = result.final
    state = f"{final.status.value}, {'healthy' if final.is_healthy else 'unhealthy'}" if final \
        else "no snapshot"
    if result.interrupted:
        click.echo(f"nvse-monitor: replay interrupted: {result.interrupted}; the files in "
                   f"{out_dir} say so and cover only that part ({state}, no leak report)",
                   err=True)
        sys.exit(130)  # like a shell's status for a command ended by SIGINT
    events = plural(result.events, "event", sep=True)
    click.echo(f"{events} replayed into {files_pattern(out_dir, prefix)} ({state})")
    if result.error:
        raise UserError(result.error)


@main.command("info")
@click.argument("recording", type=click.Path(dir_okay=False, path_type=Path))
def info_cmd(recording: Path) -> None:
    """Summarise RECORDING: header, hooks, module map, counts per kind, time span, and whether
    it ended cleanly. A damaged recording: what is intact is printed, then one line naming the
    file and byte offset on stderr, exit code 2."""
    from ..stream.recording import RecordingError
    from ..stream.recording import info as recording_info

    try:
        summary = recording_info(recording)
    except RecordingError as e:
        raise UserError(str(e)) from None
    for line in summary.lines():
        click.echo(line)
    if summary.error:
        raise UserError(summary.error)
