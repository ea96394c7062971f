"""`kernex keys ...`: rotate and retire the control-plane keys that sign commands.

The ring lives in the PKI directory; running API processes notice the change within
KERNEX_COMMAND_REPUBLISH_INTERVAL_S and publish the new signed key set to the fleet.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from kernex.api.settings import COMMAND_KEY_TRANSITION_S
from kernex.broker.command_keys import CommandKeyRing, Ring
from kernex.broker.exceptions import PKIError
from kernex.broker.pki import FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.cli.broker import _errors_as_exit

app = typer.Typer(no_args_is_help=True)


def _ring() -> CommandKeyRing:
    pki = FleetPKI.from_settings(BrokerSettings())
    if not pki.is_initialized:
        raise PKIError(f"the fleet PKI in {pki.directory} is not initialized: run `kernex pki init`")
    return CommandKeyRing(pki)


def _show(ring: Ring) -> None:
    signer = ring.signer(datetime.now(UTC)).kid
    typer.echo(f"key set version {ring.version}")
    for key in ring.keys:
        mark = "signing" if key.kid == signer else f"signs from {key.signs_from.isoformat()}"
        typer.echo(f"{key.kid}\t{mark}")


@app.command("list")
def list_keys() -> None:
    """The command keys devices pin, and which one signs now."""
    with _errors_as_exit():
        _show(_ring().load())


@app.command("rotate")
def rotate(
    transition_s: Annotated[
        int,
        typer.Option("--transition-s", min=0, help="Seconds the current key keeps signing commands."),
    ] = COMMAND_KEY_TRANSITION_S,
) -> None:
    """Add a new command key: devices pin it at once, it signs after the transition."""
    with _errors_as_exit():
        ring, added = _ring().rotate(timedelta(seconds=transition_s))
        typer.echo(f"added {added.kid}, signing from {added.signs_from.isoformat()}", err=True)
        _show(ring)


@app.command("retire")
def retire(kid: str) -> None:
    """Drop a command key a newer one replaced; devices stop trusting it."""
    with _errors_as_exit():
        _show(_ring().retire(kid))
