"""Entry point of the `kernex` console script."""

from __future__ import annotations

import typer

from kernex.cli import agent, agent_ops, backup, broker, bundle, integrations, keys, operate, server, users

app = typer.Typer(
    name="kernex",
    help="Kernex: fleet management and over-the-air updates for Linux edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
agent_ops.register(agent.app)
app.add_typer(agent.app, name="agent", help="Run, check, install and inspect the device agent.")
app.command("simulate", help="Run N simulated devices (real keys, real mTLS) in one process.")(agent.simulate)
app.add_typer(broker.pki_app, name="pki", help="Manage the fleet PKI.")
app.add_typer(broker.broker_app, name="broker", help="Render and run the Mosquitto broker.")
app.add_typer(bundle.app, name="bundle", help="Build, sign and upload update bundles.")
app.add_typer(integrations.app, name="integrations", help="Read-only MQTT credentials for the fleet topics.")
app.add_typer(keys.app, name="keys", help="Rotate the control-plane keys that sign commands.")
server.register(app)
backup.register(app)
users.register(app)
operate.register(app)


def main() -> None:
    """Run the CLI."""
    app()
