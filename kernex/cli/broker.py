"""`kernex pki ...` and `kernex broker ...`: the fleet PKI and the Mosquitto broker."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from pydantic import ValidationError

from kernex.broker.config import RenderedBroker, render
from kernex.broker.pki import SERVICE_IDENTITIES, FleetPKI, broker_hosts_for
from kernex.broker.process import MosquittoProcess
from kernex.broker.settings import BrokerSettings
from kernex.kit.logs import configure
from kernex.protocol.exceptions import KernexError

pki_app = typer.Typer(no_args_is_help=True)
broker_app = typer.Typer(no_args_is_help=True)

PortOption = Annotated[
    int | None, typer.Option("--port", min=1, max=65535, help="TLS port (default: KERNEX_MQTT_PORT).")
]
HostsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        help="Extra broker host name or IP for the broker certificate (repeatable); "
        "localhost, 127.0.0.1, KERNEX_MQTT_HOST and KERNEX_MQTT_PUBLIC_HOST are always included.",
    ),
]


@contextmanager
def _errors_as_exit() -> Iterator[None]:
    """Known failures become one line on stderr and exit status 1, without a traceback."""
    try:
        yield
    except KernexError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        typer.echo(f"error: invalid settings: {where}: {first['msg']}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        raise typer.Exit(1) from None


def _prepare(settings: BrokerSettings, hosts: list[str] | None) -> FleetPKI:
    pki = FleetPKI.from_settings(settings)
    if pki.init(broker_hosts_for(settings, hosts or ())):
        typer.echo(f"fleet PKI created or renewed in {pki.directory}", err=True)
    return pki


def _render(
    settings: BrokerSettings, port: int | None, out: Path | None, hosts: list[str] | None
) -> tuple[FleetPKI, RenderedBroker]:
    """Initialise the PKI if needed (zero-setup first run) and render the broker's files."""
    pki = _prepare(settings, hosts)
    rendered = render(
        settings,
        pki,
        out or settings.data_dir / "broker",
        port=port,
        bind_address=settings.broker_bind_address,
    )
    return pki, rendered


@pki_app.command("init")
def pki_init(host: HostsOption = None) -> None:
    """Create the fleet CA, broker and service certificates and the command-signing key (idempotent)."""
    with _errors_as_exit():
        settings = BrokerSettings()
        pki = FleetPKI.from_settings(settings)
        created = pki.init(broker_hosts_for(settings, host or ()))
        typer.echo(
            f"fleet PKI {'created or renewed' if created else 'already initialized'} in {pki.directory}"
        )
        typer.echo(f"  CA certificate:     {pki.ca_cert_path}")
        typer.echo(f"  broker certificate: {pki.broker_cert_path}")
        typer.echo(f"  broker key:         {pki.broker_key_path}")
        for name in SERVICE_IDENTITIES:
            typer.echo(f"  {name + ':':<19} {pki.service_cert_path(name)}")
        typer.echo(f"  command key id:     {pki.command_key_id}")


@broker_app.command("config")
def broker_config(
    port: PortOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: <data dir>/broker).")
    ] = None,
    host: HostsOption = None,
) -> None:
    """Render mosquitto.conf and the ACL; prints the config path."""
    with _errors_as_exit():
        _, rendered = _render(BrokerSettings(), port, out, host)
        typer.echo(str(rendered.conf_path))


@broker_app.command("run")
def broker_run(port: PortOption = None, host: HostsOption = None) -> None:
    """Render the config and run Mosquitto in the foreground until Ctrl-C."""
    with _errors_as_exit():
        settings = BrokerSettings()
        configure(settings.log_level, settings.log_format_in_effect)
        pki, rendered = _render(settings, port, None, host)
        with (
            MosquittoProcess.for_rendered(rendered, pki, inherit_output=True) as proc,
            _forward_signals(proc),
        ):
            typer.echo(
                f"mosquitto running on {rendered.bind_address}:{rendered.port} (pid {proc.pid}); "
                "Ctrl-C stops it",
                err=True,
            )
            try:
                status = proc.wait()
            except KeyboardInterrupt:
                return  # leaving the with-block stops Mosquitto in order
        typer.echo(f"error: mosquitto exited with status {status}", err=True)
        raise typer.Exit(1)


@contextmanager
def _forward_signals(proc: MosquittoProcess) -> Iterator[None]:
    """SIGTERM stops the broker in order (as Ctrl-C does); SIGHUP is passed on as a reload."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        raise KeyboardInterrupt

    def on_hup(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        proc.reload()

    previous_term = signal.signal(signal.SIGTERM, on_term)
    previous_hup = signal.signal(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGHUP, previous_hup)
