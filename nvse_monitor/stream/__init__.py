"""Stream: what flows from capture to the engine, live or replayed.

`events` is the 56-byte record the agent writes, `messages` the host-side messages (Batch,
ModuleEvent, SessionMeta...), `recording` + `codec` the `.nvmrec` file that stores them
(docs/format.md), `synthetic` makes recordings without a target (tests, benchmarks).
"""
