"""`nvse-monitor report`: one self-contained HTML report from a recording or an output directory
(docs/views.md). data.py gathers, html.py draws (plotly, bundled into the page)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import ReportData, ReportError, from_directory, from_recording


@dataclass
class ReportResult:
    path: Path
    size: int  # bytes written
    error: str | None  # a damaged recording: the report covers its intact part
    data: ReportData


def build_report(source: Path | str, output: Path | str, prefix: str = "MemoryPoolNVSE"
                 ) -> ReportResult:
    """Raises ReportError / recording.RecordingError (nothing written then)."""
    from ...outputs.fileio import atomic_write_text
    from .html import render

    source, output = Path(source), Path(output)
    data = from_directory(source, prefix) if source.is_dir() else from_recording(source, prefix)
    text = render(data)
    try:
        atomic_write_text(output, text)
    except OSError as e:
        raise ReportError(f"cannot write {output}: {e.strerror or e}") from None
    return ReportResult(output, len(text.encode("utf-8")), data.error, data)


__all__ = ["ReportData", "ReportError", "ReportResult", "build_report"]
