"""`kernex agent run` and `kernex simulate`: the device side of the CLI.

Imports only the agent (no server code), so these commands work on a device that installed
Kernex without the `server` extra. CLI options override `KERNEX_AGENT_*` settings, which override
the config file (`--config`, see kernex.agent.settings). `check`, `status`, `install` and
`uninstall` live in kernex.cli.agent_ops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from kernex.agent.agent import Agent
from kernex.agent.exceptions import AgentError
from kernex.agent.http import api_client
from kernex.agent.settings import AgentSettings, ConfigFileError
from kernex.agent.simulator import Simulator
from kernex.agent.status import StatusReporter
from kernex.kit.logs import configure, get_logger
from kernex.kit.signals import until_signal
from kernex.protocol.keys import KeyType

SIMULATOR_STATE_DIR = Path(".kernex-simulator")  # keeps simulated keys apart from a real agent's
EXIT_REFUSED = 1  # the agent cannot run: registration refused, unusable key or state
EXIT_USAGE = 2  # invalid settings, as for invalid command-line options

app = typer.Typer(no_args_is_help=True)
log = get_logger(__name__)

ApiOption = Annotated[
    str | None,
    typer.Option("--api", help="Control-plane URL (env KERNEX_AGENT_API_URL).", show_default=False),
]
StateDirOption = Annotated[Path | None, typer.Option("--state-dir", help="Where keys and state live.")]
KeyTypeOption = Annotated[
    KeyType | None, typer.Option("--key-type", help="Key type for a new device key.", show_default=False)
]
IntervalOption = Annotated[
    float | None, typer.Option("--interval", min=1.0, help="Seconds between heartbeats.", show_default=False)
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML config file (env KERNEX_AGENT_CONFIG; default /etc/kernex/agent.toml when it exists).",
        show_default=False,
    ),
]


@app.command("run")
def run(  # keyword-only: Typer passes options by name
    *,
    api: ApiOption = None,
    state_dir: StateDirOption = None,
    key_type: KeyTypeOption = None,
    interval: IntervalOption = None,
    name: Annotated[str | None, typer.Option("--name", help="A display name for the device.")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the device agent until Ctrl-C or SIGTERM."""
    settings = _settings(
        config=config,
        api_url=api,
        state_dir=state_dir,
        key_type=key_type,
        heartbeat_interval_s=interval,
        name=name,
    )
    _run_until_signalled(_run_agent(settings))


async def _run_agent(settings: AgentSettings) -> None:
    """The agent with the API client its settings describe, and its status file kept current."""
    async with await asyncio.to_thread(api_client, settings) as http:
        agent = Agent(settings, http=http)
        reporter = asyncio.create_task(StatusReporter(settings.state_dir, lambda: agent.stats).run())
        try:
            await agent.run()
        finally:
            reporter.cancel()
            # Cancelled on purpose: it writes its "stopped" snapshot and ends; other errors propagate.
            with contextlib.suppress(asyncio.CancelledError):
                await reporter


def simulate(  # keyword-only: Typer passes options by name
    *,
    devices: Annotated[int, typer.Option("--devices", min=1, help="How many devices to simulate.")] = 10,
    api: ApiOption = None,
    state_dir: StateDirOption = None,
    key_type: KeyTypeOption = None,
    interval: IntervalOption = None,
    config: ConfigOption = None,
) -> None:
    """Run N simulated devices (real keys, real mTLS), each under <state-dir>/device-NNNN."""
    settings = _settings(
        config=config, api_url=api, state_dir=state_dir, key_type=key_type, heartbeat_interval_s=interval
    )
    if "state_dir" not in settings.model_fields_set:
        settings = settings.model_copy(update={"state_dir": SIMULATOR_STATE_DIR})
    _run_until_signalled(Simulator(settings, devices).run())


def _settings(**overrides: Any) -> AgentSettings:
    settings = load_settings(**overrides)
    configure(settings.log_level, settings.log_format)
    return settings


def load_settings(**overrides: Any) -> AgentSettings:
    """Settings from options (None: not given), environment and config file; invalid: one line, exit 2."""
    try:
        return AgentSettings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        typer.echo(f"kernex: invalid setting {where}: {first['msg']}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except ConfigFileError as exc:
        typer.echo(f"kernex: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _run_until_signalled(work: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(until_signal(work, "kernex-agent"))
    except AgentError as exc:
        # Expected refusals are one log line, not a traceback.
        log.error("agent stopped", error=str(exc))  # noqa: TRY400 - expected: one line, no traceback
        raise typer.Exit(EXIT_REFUSED) from None
