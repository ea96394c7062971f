"""`kernex db`, `kernex api`, `kernex ingest` and `kernex up`.

Server packages are imported inside the commands, so a device without the `server` extra can
still run `kernex agent`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from kernex.kit import logs
from kernex.kit.signals import until_signal
from kernex.protocol.exceptions import KernexError

UP_HEARTBEAT_INTERVAL_S = 5  # quick start: devices visibly alive within seconds, not a minute
CHILD_STOP_TIMEOUT_S = 15  # ingest flushes and acknowledges its last batch before exiting

db_app = typer.Typer(no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"kernex: {message}", err=True)
    return typer.Exit(1)


def _server_missing(exc: ImportError) -> typer.Exit:
    return _fail(f"server components are not installed ({exc.name}): pip install 'kernex[server]'")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (safe to run on every start)."""
    try:
        from kernex.storage.exceptions import MigrationError  # noqa: PLC0415 - server extra
        from kernex.storage.migrate import upgrade  # noqa: PLC0415 - server extra
        from kernex.storage.settings import StorageSettings  # noqa: PLC0415 - server extra
    except ImportError as exc:
        raise _server_missing(exc) from None
    settings = StorageSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        upgrade(settings.resolved_database_url)
    except MigrationError as exc:
        raise _fail(str(exc)) from None
    typer.echo("database is at the latest schema")


def api(
    host: Annotated[str | None, typer.Option(help="Bind address (KERNEX_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (KERNEX_API_PORT)")] = None,
) -> None:
    """Serve the REST API."""
    try:
        import uvicorn  # noqa: PLC0415 - server extra

        from kernex.api.app import create_app  # noqa: PLC0415 - server extra
        from kernex.api.settings import ApiSettings  # noqa: PLC0415 - server extra
    except ImportError as exc:
        raise _server_missing(exc) from None
    overrides = {k: v for k, v in {"api_host": host, "api_port": port}.items() if v is not None}
    try:
        settings = ApiSettings(**overrides)  # type: ignore[arg-type] # pydantic-settings takes field names
    except ValueError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    logs.configure(settings.log_level, settings.log_format_in_effect)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
    )
    uvicorn.Server(config).run()


def ingest() -> None:
    """Run an ingest worker: verify device messages and persist them in batches."""
    try:
        from kernex.ingest.settings import IngestSettings  # noqa: PLC0415 - server extra
        from kernex.ingest.worker import run_ingest  # noqa: PLC0415 - server extra
    except ImportError as exc:
        raise _server_missing(exc) from None
    try:
        settings = IngestSettings()
    except ValueError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    logs.configure(settings.log_level, settings.log_format_in_effect)
    asyncio.run(until_signal(run_ingest(settings), "kernex-ingest"))


def up(
    devices: Annotated[int, typer.Option(min=0, max=1000, help="Simulated devices to run")] = 3,
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    mqtt_port: Annotated[int, typer.Option(help="Mosquitto TLS port")] = 8883,
    interval: Annotated[int, typer.Option(min=1, help="Simulated devices' heartbeat interval (s)")] = (
        UP_HEARTBEAT_INTERVAL_S
    ),
) -> None:
    """Run the whole platform locally: Mosquitto, ingest, API and N simulated devices."""
    try:
        from kernex.api.settings import ApiSettings  # noqa: PLC0415 - server extra
        from kernex.broker.config import render  # noqa: PLC0415 - server extra
        from kernex.broker.pki import FleetPKI  # noqa: PLC0415 - server extra
        from kernex.broker.process import MosquittoProcess  # noqa: PLC0415 - server extra
        from kernex.cli.users import first_run_admin  # noqa: PLC0415 - server extra
        from kernex.storage.migrate import upgrade  # noqa: PLC0415 - server extra
    except ImportError as exc:
        raise _server_missing(exc) from None
    os.environ["KERNEX_MQTT_PORT"] = str(mqtt_port)
    os.environ["KERNEX_API_PORT"] = str(port)
    try:
        settings = ApiSettings()
    except ValueError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    logs.configure(settings.log_level, settings.log_format_in_effect)
    data_dir = settings.data_dir.resolve()
    os.environ["KERNEX_DATA_DIR"] = str(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    api_url = f"http://{settings.api_host}:{port}"
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        pki = FleetPKI.from_settings(settings)
        pki.init()
        upgrade(settings.resolved_database_url)
        # First run: an admin with a generated password, printed here once (stdout, never the log).
        password = first_run_admin(settings.resolved_database_url)
        if password is not None:
            typer.echo(f"Kernex: first admin created: username admin, password {password} (shown once)")
        broker = MosquittoProcess.for_rendered(
            render(settings, pki, data_dir / "broker", port=mqtt_port), pki
        )
        with broker:
            typer.echo(f"Kernex: data in {data_dir}; Mosquitto on port {mqtt_port} (log: {broker.log_path})")
            try:
                children.append(("ingest", _spawn("ingest")))
                children.append(("api", _spawn("api")))
                if devices:
                    simulate = ["--devices", str(devices), "--api", api_url, "--interval", str(interval)]
                    state_dir = str(data_dir / "simulated-devices")
                    children.append(("devices", _spawn("simulate", *simulate, "--state-dir", state_dir)))
                typer.echo(f"API: {api_url}/docs    devices: {api_url}/api/v1/devices    Ctrl-C stops")
                _wait_for_first_exit(children)
            finally:
                _stop(children)
    except KernexError as exc:
        raise _fail(str(exc)) from None


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "kernex", *args])  # noqa: S603 - our own CLI


def _wait_for_first_exit(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """Block until Ctrl-C/SIGTERM or until a child dies (then report it and stop the rest)."""
    stop = False

    def _on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stop:
            for name, proc in children:
                if proc.poll() is not None:
                    typer.echo(f"kernex: {name} exited with code {proc.returncode}; stopping", err=True)
                    return
            time.sleep(0.5)
    except KeyboardInterrupt:
        return


def _stop(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    # Devices first (so they go offline cleanly), then the API, then ingest flushes last.
    # SIGTERM, not SIGINT: a child started from a background shell ignores SIGINT.
    for _name, proc in reversed(children):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
    for _name, proc in reversed(children):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def register(app: typer.Typer) -> None:
    """Add the server commands to the root app."""
    app.add_typer(db_app, name="db", help="Manage the database schema.")
    app.command("api")(api)
    app.command("ingest")(ingest)
    app.command("up")(up)
