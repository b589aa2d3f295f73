"""Capture: how records get from the agent's hooks in the target to the host, and the live
session that drives it.

- `agent_host` loads the agent (agent/) with a `hookprofile` profile; `ringlayout` holds the
  ring's shared layout, `shm` makes the mapping both sides map, `reader` is the host thread
  that consumes records straight from it (docs/agent.md "Shared-memory transport").
- `session.LiveSession` attaches or spawns (`targets`), starts the agent and feeds the queued
  stream messages to the pipeline until the end; its parts: `consumer` (run loop, stopping),
  `children` (--follow-child), `ending` (how it ended), `banner`, `options`, `queue_items`.
- Beside the agent: `addrspace` (the address-space sampler script), `symbolizer` (function
  names of call sites). FNV specifics: `fnv` (game directory, launch plan, banner), `pe`
  (version resources).
"""
