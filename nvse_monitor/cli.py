"""The `nvse-monitor` command line: a thin click shell around the pipeline and sessions."""

from __future__ import annotations

import sys

import click

from . import __version__


def _utf8_when_redirected() -> None:
    """On Windows a redirected stdout/stderr gets the ANSI code page (cp1252), which cannot
    encode the dashboard's block characters: `top --once > file` would die on them. Text that
    goes to a file or pipe is written as UTF-8 instead; a console keeps its own encoding."""
    if sys.platform != "win32":
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure") and not stream.isatty():
            stream.reconfigure(encoding="utf-8", errors="replace")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nvse-monitor")
def main() -> None:
    """Monitor the memory allocator of Fallout New Vegas, its NVSE plugins, or any process."""
    _utf8_when_redirected()


def _register() -> None:
    # Commands live in their own modules; each module adds its commands to `main`.
    from . import cli_live, cli_offline, cli_views  # noqa: F401


_register()
