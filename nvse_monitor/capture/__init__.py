"""Capture: how records get from the agent's ring in the target to the host.

`ringlayout` holds the ring's shared layout, `shm` makes the mapping both sides map, `reader` is
the host thread that consumes records straight from it (docs/agent.md "Shared-memory transport").
"""
