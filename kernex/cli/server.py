"""`kernex db`, `kernex api`, `kernex ingest` and `kernex up`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the server commands to the root app."""
    del app
