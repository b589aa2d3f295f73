"""Regenerates the committed synthetic fixtures (deterministic): python tests/make_fixtures.py

The fixtures are SYNTHETIC (nvse_monitor.stream.synthetic; meta mode "synthetic", target
"synthetic-workload"), not recordings of a real game.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from nvse_monitor.stream.messages import HookEvent, Module, ModuleEvent, SessionMeta, StreamMessage
from nvse_monitor.stream.recording import write_recording
from nvse_monitor.stream.synthetic import generate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
RPMALLOC = Module(
    "MemoryPoolNVSE_RPmalloc.dll", 0x6C000000, 0x00048000,
    r"C:\Games\FNV\Data\NVSE\Plugins\MemoryPoolNVSE_RPmalloc.dll",
)


def small() -> tuple[SessionMeta, list[StreamMessage]]:
    """~50k events of the default FNV-like mix, one clean session."""
    meta, msgs = generate(50_000, seed=1, rate_eps=200_000, idle_prob=2e-5)
    return meta, list(msgs)


def mixed() -> tuple[SessionMeta, list[StreamMessage]]:
    """Module load/unload, a hook that failed to install, two ring overflows (drops)."""
    controls = [
        (15_000, ModuleEvent(0, "add", RPMALLOC)),
        (15_000, HookEvent(0, -1, RPMALLOC.name, True, "module loaded: no hooks in it")),
        (52_000, ModuleEvent(0, "remove", RPMALLOC)),
    ]
    meta, msgs = generate(
        60_000,
        seed=2,
        failed_hooks=["calloc"],
        drops=[(20_000, 700), (41_000, 150)],
        controls=controls,
        rate_eps=150_000,
        idle_prob=5e-5,
    )
    return meta, list(msgs)


FIXTURE_MAKERS: dict[str, Callable[[], tuple[SessionMeta, list[StreamMessage]]]] = {
    "synthetic-small.nvmrec": small,
    "synthetic-mixed.nvmrec": mixed,
}


def main(out: Path = FIXTURES) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, make in FIXTURE_MAKERS.items():
        meta, msgs = make()
        w = write_recording(out / name, meta, msgs)
        size = (out / name).stat().st_size
        print(f"{out / name}: {w.records} records, {w.messages} messages, {size} bytes "
              f"({size / max(1, w.records):.2f} B/record)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES)
