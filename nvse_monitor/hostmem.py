"""The monitor's own malloc settings (glibc): a batch's big arrays reuse the heap.

Every batch makes arrays of a few MiB: the reader's take, and the engine's per-event columns.
By default glibc serves such arrays with mmap and gives them back on free. Its threshold adapts
only up to a point, and it trims a heap whose free top passes twice that threshold. So the next
batch's arrays are fresh pages, which the kernel zeroes on first write. On the tight loop the
reader spent ~40 % of its CPU there (docs/engine.md "The tight loop, live").

We serve arrays up to 32 MiB (glibc's upper limit on 64-bit) from the heap, and keep up to
256 MiB free in it. The tight loop then cost ~3 ns a call less (-5 %; 30 and 40 alternating
runs), and the reader's CPU fell by 14–20 %. The price: after a burst the monitor holds its
peak memory, plus up to 256 MiB free, instead of giving it back.

This changes our process only: the target's allocator is untouched. Set
NVSE_MONITOR_MALLOC=default to keep glibc's own settings. Elsewhere (Windows, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
ENV = "NVSE_MONITOR_MALLOC"

_done: str | None = None


def tune() -> str:
    """Apply the settings once per process. Returns what was done: "tuned",
    "default (NVSE_MONITOR_MALLOC)", or "default (<why not>)"."""
    global _done
    if _done is not None:
        return _done
    if os.environ.get(ENV, "").strip().lower() == "default":
        _done = f"default ({ENV})"
    elif not sys.platform.startswith("linux"):
        _done = "default (not glibc)"
    else:
        try:
            libc = ctypes.CDLL(None)
            ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            _done = "tuned" if ok else "default (mallopt refused)"
        except (OSError, AttributeError):
            _done = "default (no mallopt)"
    return _done
