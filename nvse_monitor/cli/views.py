"""Views for people: `report` (HTML) and `top` (terminal dashboard), and the --metrics-port
options the session and replay commands share (docs/views.md)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..outputs.files import DEFAULT_PREFIX
from ..outputs.pipeline import DEFAULT_OUT_DIR
from . import UserError, main


def metrics_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--metrics-port / --metrics-address (attach, spawn, replay). prometheus_client is only
    imported when a port is given (CLI start-up stays fast)."""
    f = click.option("--metrics-address", default="127.0.0.1", show_default=True,
                     help="Address /metrics listens on (keep it local unless you mean it).")(f)
    return click.option("--metrics-port", type=click.IntRange(0, 65535),
                        help="Serve OpenMetrics on http://ADDRESS:PORT/metrics while running "
                        "(0: any free port; the URL is printed).")(f)


def start_metrics(port: int | None, address: str, err: Any = None) -> Any:
    """A bound MetricsServer (attach() it to the pipeline later), or None without a port.
    Raises UserError when the address cannot be bound."""
    if port is None:
        return None
    from ..views.metrics import MetricsServer

    try:
        server = MetricsServer(port=port, address=address).start()
    except OSError as e:
        raise UserError(f"cannot serve metrics on {address}:{port}: {e.strerror or e}") from None
    if err is None:
        click.echo(f"nvse-monitor: metrics on {server.url}", err=True)
    else:
        print(f"nvse-monitor: metrics on {server.url}", file=err, flush=True)
    return server


@main.command("report")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default="nvse-monitor-report.html", show_default=True, help="HTML file to write.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="File name prefix (SOURCE is an output directory).")
def report_cmd(source: Path, output: Path, prefix: str) -> None:
    """One self-contained HTML report (charts included, opens offline) from SOURCE: a recording
    (replayed through the engine, nothing else written) or an output directory."""
    from ..stream.recording import RecordingError
    from ..views.report import ReportError, build_report

    try:
        result = build_report(source, output, prefix)
    except (ReportError, RecordingError) as e:
        raise UserError(str(e)) from None
    click.echo(f"report written to {output} ({result.size / 2**20:.1f} MiB)")
    if result.error:
        raise UserError(result.error)


@main.command("top")
@click.argument("directory", required=False, default=str(DEFAULT_OUT_DIR),
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="File name prefix of the monitoring files.")
@click.option("--interval", type=click.FloatRange(0.1, 10), default=0.5, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--functions", is_flag=True, help="Start with the top functions: live blocks and "
              "bytes by the function of their call site (key f).")
def top_cmd(directory: Path, prefix: str, interval: float, once: bool, functions: bool) -> None:
    """Live dashboard of the session writing DIRECTORY (default ./nvse-monitor-out): status,
    rates, memory with a sparkline, modules, drops, last warnings. Keys: l leak report (by call
    site), f top functions, q quit.

    --once: one frame on stdout; exit 0, or 3 when DIRECTORY has no stats JSON yet, 2 when
    it does not exist."""
    from ..views.top import DirSource, run_dashboard

    src = DirSource(directory, prefix)
    if once:
        from rich.console import Console

        from ..views.top import Dashboard

        if not directory.is_dir():  # live, top waits for a session to make it; once cannot
            raise UserError(f"{directory}: no such directory")
        dash = Dashboard(src)
        if functions:
            dash.toggle_functions()
        dash.poll()
        con = Console()  # a pipe: 80 columns (or $COLUMNS), which the frame fits
        con.print(dash.render(con.width, con.height if con.is_terminal else None))
        if dash.doc is None:  # nothing to show: like `status`, UNKNOWN
            sys.exit(3)
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_dashboard(src, interval=interval, functions=functions)
    sys.exit(0)
