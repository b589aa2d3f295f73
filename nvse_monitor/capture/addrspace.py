"""Address-space headroom (docs/fnv.md): what actually crashes a 32-bit game is running out of
address space or fragmenting it, not the heap counters. A small script (agent/addrspace.js)
loaded next to the agent samples the target's memory ranges about once a second; here: its
source and limits, and its messages turned into `stream.AddressSpace` messages, which the
session feeds to the pipeline and the recording like any other (the engine judges them, a
writer makes `<prefix>_addrspace.csv`).
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from typing import Any

from ..stream.messages import AddressSpace

DEFAULT_WARN_BYTES = 256 << 20  # ia32: under this largest free block, big allocations start failing
DEFAULT_INTERVAL_MS = 1000


def default_limit(arch: str, platform: str) -> int | None:
    """The user address space to count free blocks in: ia32 on Linux (under a 64-bit kernel)
    4 GiB; on Windows None = the script asks the system (2 GiB, 4 GiB when large-address-aware
    under WOW64); 64-bit targets: None (free space is not the limit there)."""
    if arch != "ia32":
        return None
    return None if platform == "windows" else 1 << 32


def script_source(limit: int | None, interval_ms: int = DEFAULT_INTERVAL_MS) -> str:
    js = resources.files("nvse_monitor.agent").joinpath("addrspace.js").read_text("utf-8")
    conf = json.dumps({"interval_ms": int(interval_ms), "limit": limit})
    return f"const ADDRSPACE = {conf};\n{js}"


def sample_from_payload(p: dict[str, Any], wall_clock_zero_us: int) -> AddressSpace:
    """The sampler's message as a stream message. The script stamps it with the wall clock
    (µs since the epoch): agent time is that minus the wall clock at agent time zero (the
    engine keeps stream time from going backwards). Raises KeyError/TypeError/ValueError."""

    def opt(k: str) -> int | None:
        v = p.get(k)
        return None if v is None else int(v)

    return AddressSpace(max(0, int(p["ts_us"]) - wall_clock_zero_us), int(p["mapped"]),
                        int(p["committed"]), int(p["reserved"]), opt("free"),
                        opt("largest_free"), opt("limit"), int(p.get("regions", 0)))


class Watch:
    """The sampler script in the target: its samples (stream.AddressSpace) go to `on_sample`,
    its failures (one line) to `on_error`, both called on Frida's thread."""

    def __init__(self, session: Any, limit: int | None, wall_clock_zero_us: int, on_sample: Any,
                 on_error: Any, interval_ms: int = DEFAULT_INTERVAL_MS) -> None:
        self._script = session.create_script(script_source(limit, interval_ms),
                                             name="nvse-monitor-addrspace")

        def on_message(message: dict[str, Any], _data: Any) -> None:
            p = message.get("payload") if message.get("type") == "send" else None
            if isinstance(p, dict) and p.get("type") == "addrspace":
                try:
                    sample = sample_from_payload(p, wall_clock_zero_us)
                except (KeyError, TypeError, ValueError) as e:
                    on_error(f"bad sample {p!r}: {e!r}"[:300])
                else:
                    on_sample(sample)
            elif isinstance(p, dict) and p.get("type") == "addrspace-error":
                on_error(str(p.get("message", "")))
            elif message.get("type") == "error":
                on_error(str(message.get("description", message)))

        self._script.on("message", on_message)
        self._script.load()

    def unload(self) -> None:
        """Stops the sampler (unloading clears its timer); the target may be gone already."""
        with contextlib.suppress(Exception):
            self._script.unload()
