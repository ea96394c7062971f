"""`kernex pki ...` and `kernex broker ...` (owned by the broker work; placeholder wiring)."""

from __future__ import annotations

import typer

pki_app = typer.Typer(no_args_is_help=True)
broker_app = typer.Typer(no_args_is_help=True)
