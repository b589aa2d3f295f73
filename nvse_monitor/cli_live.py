"""Live commands: attach, spawn, profiles."""

from __future__ import annotations

from .cli import main  # noqa: F401
