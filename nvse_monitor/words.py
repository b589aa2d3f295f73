"""Counts in words for messages people read: `1 allocation`, `2 allocations`."""

from __future__ import annotations


def plural(n: int, noun: str, plural_form: str | None = None, *, sep: bool = False) -> str:
    """`n noun` with the noun in the plural unless n is 1; `sep`: thousands separators (CLI
    and dashboard; the log keeps plain digits as the spec's lines do)."""
    num = f"{n:,}" if sep else f"{n}"
    return f"{num} {noun if n == 1 else (plural_form or noun + 's')}"
