"""Engine: stream messages in, outputs out; pure (time only from events, no I/O), so a replay
gives byte-identical files (docs/engine.md).

`engine.Engine` drives it; `classify` (caller -> module), `tracking` (live blocks), `samples`
(sampled stacks), `leaks`, `health` (the six-state machine), `modmap` and `sitename` are its
parts.
"""

from .engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
