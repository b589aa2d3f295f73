"""The `nvse-monitor` command line: a thin click shell around the pipeline and sessions.

Every error a user can cause ends in one line on stderr in one style,
`nvse-monitor: error: <what is wrong>`, and exit code 2 (click's own usage errors included:
they name the command and point to its --help instead of printing the usage block).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import __version__, hostmem, native

PROG = "nvse-monitor"


def _utf8_when_redirected() -> None:
    """On Windows a redirected stdout/stderr gets the ANSI code page (cp1252), which cannot
    encode the dashboard's block characters: `top --once > file` would die on them. Text that
    goes to a file or pipe is written as UTF-8 instead; a console keeps its own encoding."""
    if sys.platform != "win32":
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure") and not stream.isatty():
            stream.reconfigure(encoding="utf-8", errors="replace")


def error_line(message: str) -> str:
    """The one style of every error line (docs/cli.md)."""
    return f"{PROG}: error: {message}"


class UserError(click.ClickException):
    """A one-line error for bad input (no traceback), exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(error_line(self.format_message()), err=True)


def _usage_message(e: click.UsageError) -> str:
    """Click's message on one line, prefixed by the command and followed by where help is."""
    msg = " ".join(e.format_message().split())
    ctx = e.ctx
    if ctx is None:
        return f"{msg} (see `{PROG} --help`)"
    names = []  # the subcommand's name (the root's differs with `python -m`)
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    sub = " ".join(reversed(names))
    path = f"{PROG} {sub}" if sub else PROG
    where = f"{sub}: " if sub else ""
    return f"{where}{msg} (see `{path} --help`)"


class _Cli(click.Group):
    def main(self, args: Any = None, prog_name: str | None = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            click.echo(error_line(_usage_message(e)), err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C outside a command's own handling
            click.echo(f"{PROG}: interrupted", err=True)
            sys.exit(130)
        # without standalone mode click returns --help/--version's exit code, else the
        # command's return value (None)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG,
                      message=f"%(prog)s, version %(version)s\nhost kernels: {native.STATUS}")
def main() -> None:
    """Monitor the memory allocator of Fallout New Vegas, its NVSE plugins, or any process."""
    _utf8_when_redirected()
    hostmem.tune()  # our own process's malloc: batch arrays reuse the heap (hostmem.py)


def _register() -> None:
    # Commands live in their own modules; each module adds its commands to `main`.
    from . import live, offline, views  # noqa: F401


_register()
