"""The `kernex` command: the composition root that wires the parts together.

Server commands import their packages lazily, so `kernex agent ...` works on a device that
installed Kernex without the `server` extra.
"""
