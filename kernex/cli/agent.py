"""`kernex agent ...` and `kernex simulate` (owned by the agent work; placeholder wiring)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


def simulate() -> None:
    """Filled in by the agent work."""
    raise typer.Exit(2)
