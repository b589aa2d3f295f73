"""The `nvse-monitor` command line: a thin click shell around the pipeline and sessions."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nvse-monitor")
def main() -> None:
    """Monitor the memory allocator of Fallout New Vegas, its NVSE plugins, or any process."""


def _register() -> None:
    # Commands live in their own modules; each module adds its commands to `main`.
    from . import cli_live, cli_offline, cli_views  # noqa: F401


_register()
