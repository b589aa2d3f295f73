"""Offline commands: replay, status, info."""

from __future__ import annotations

from .cli import main  # noqa: F401
