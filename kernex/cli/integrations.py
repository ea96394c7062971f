"""`kernex integrations ...`: read-only MQTT credentials for the verified fleet topics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kernex.broker.exceptions import BrokerConfigError
from kernex.broker.integrators import IntegratorRegistry, apply
from kernex.broker.pki import FleetPKI
from kernex.broker.settings import BrokerSettings
from kernex.cli.broker import _errors_as_exit
from kernex.protocol.fleet import fleet_filter
from kernex.protocol.topics import Topics

app = typer.Typer(no_args_is_help=True)

BrokerDirOption = Annotated[
    Path | None,
    typer.Option(
        "--broker-dir",
        help="The rendered broker directory whose ACL to update (default: <data dir>/broker).",
    ),
]


def _registry(settings: BrokerSettings) -> IntegratorRegistry:
    pki = FleetPKI.from_settings(settings)
    if not pki.is_initialized:
        raise BrokerConfigError(f"the fleet PKI in {pki.directory} is not initialized: run `kernex pki init`")
    return IntegratorRegistry(pki)


def _apply(settings: BrokerSettings, registry: IntegratorRegistry, broker_dir: Path | None) -> None:
    """Rewrite the rendered ACL (if the broker was rendered) and reload a running broker."""
    target = broker_dir or settings.data_dir / "broker"
    applied = apply(target, Topics(settings.topic_prefix), registry)
    if applied.acl_path is None:
        typer.echo(
            f"no rendered broker in {target}: the ACL is written when the broker is rendered", err=True
        )
    elif applied.reloaded_pid is None:
        typer.echo(
            f"ACL updated in {applied.acl_path}; no running broker found: it applies at the next start",
            err=True,
        )
    else:
        typer.echo(
            f"ACL updated in {applied.acl_path}; broker (pid {applied.reloaded_pid}) reloaded", err=True
        )


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits and dashes.")],
    out: Annotated[
        Path, typer.Option("--out", help="Where to write <identity>.crt and <identity>.key.")
    ] = Path(),
    broker_dir: BrokerDirOption = None,
) -> None:
    """Issue an integrator certificate that may only read the fleet topics."""
    with _errors_as_exit():
        settings = BrokerSettings()
        registry = _registry(settings)
        integrator, cert_path, key_path = registry.create(name, out.resolve())
        _apply(settings, registry, broker_dir)
        typer.echo(f"integrator {integrator.name}: MQTT username {integrator.identity}")
        typer.echo(f"certificate: {cert_path}")
        typer.echo(f"key:         {key_path}")
        typer.echo(f"subscribe to {fleet_filter(Topics(settings.topic_prefix))} (read-only)")


@app.command("list")
def list_integrators() -> None:
    """List integrators, revoked ones included."""
    with _errors_as_exit():
        for i in _registry(BrokerSettings()).all():
            state = "active" if i.active else f"revoked {i.revoked_at}"
            typer.echo(f"{i.name}\t{i.identity}\tserial {i.serial}\t{state}")


@app.command("revoke")
def revoke(name: str, broker_dir: BrokerDirOption = None) -> None:
    """Take an integrator out of the ACL, put its certificate in the CRL, reload the broker."""
    with _errors_as_exit():
        settings = BrokerSettings()
        registry = _registry(settings)
        registry.revoke(name)
        _apply(settings, registry, broker_dir)
        typer.echo(f"integrator {name} revoked")
