"""`kernex agent check | status | install | uninstall`: operating the agent on a device.

Device side only (no server imports). Exit status: 0 fine, 1 a check failed or the operation
failed, 2 invalid settings (one line on stderr saying which).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from kernex.agent import systemd
from kernex.agent.check import Verdict, failed, run_checks
from kernex.agent.exceptions import AgentError
from kernex.agent.status import collect, render_text
from kernex.cli.agent import EXIT_REFUSED, ApiOption, ConfigOption, StateDirOption, load_settings

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
RootOption = Annotated[
    Path,
    typer.Option("--root", help="Install under this directory instead of / (no user, no systemctl)."),
]
VERDICT_MARKS = {Verdict.OK: "ok  ", Verdict.WARN: "WARN", Verdict.FAIL: "FAIL", Verdict.SKIP: "skip"}


def check(
    *,
    config: ConfigOption = None,
    api: ApiOption = None,
    state_dir: StateDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate the settings and test the API and broker: DNS, TLS, certificates, clock."""
    settings = load_settings(config=config, api_url=api, state_dir=state_dir)
    results = asyncio.run(run_checks(settings))
    if as_json:
        typer.echo(json.dumps({"ok": not failed(results), "checks": [asdict(r) for r in results]}, indent=2))
    else:
        width = max(len(result.name) for result in results)
        for result in results:
            typer.echo(f"{VERDICT_MARKS[result.verdict]}  {result.name:<{width}}  {result.message}")
    if failed(results):
        raise typer.Exit(EXIT_REFUSED)


def status(
    *, config: ConfigOption = None, state_dir: StateDirOption = None, as_json: JsonOption = False
) -> None:
    """Show the device id, admission, certificate, connection, heartbeats, bundles and config version."""
    settings = load_settings(config=config, state_dir=state_dir)
    report = collect(settings)
    typer.echo(report.model_dump_json(indent=2) if as_json else render_text(report))


def install(
    *,
    api: Annotated[
        str | None, typer.Option("--api", help="API URL written into a new config file.", show_default=False)
    ] = None,
    root: RootOption = Path("/"),
    kernex_path: Annotated[
        Path | None,
        typer.Option(
            "--kernex", help="Absolute path of the kernex program (default: this one).", show_default=False
        ),
    ] = None,
    read_write_path: Annotated[
        list[str] | None,
        typer.Option("--read-write-path", help="Extra writable path for bundle installs (repeatable)."),
    ] = None,
    start: Annotated[
        bool, typer.Option("--start/--no-start", help="Enable and start the service now.")
    ] = True,
) -> None:
    """Install the agent as a hardened systemd service (idempotent)."""
    if api is not None:
        load_settings(api_url=api)  # the same validation the agent applies, before anything is written
    exec_start = [str(kernex_path)] if kernex_path is not None else systemd.default_exec_start()
    try:
        outcomes = systemd.install(
            root,
            api_url=api,
            exec_start=exec_start,
            read_write_paths=tuple(read_write_path or ()),
            start=start,
        )
    except AgentError as exc:
        typer.echo(f"kernex: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    _report(outcomes)


def uninstall(
    *,
    root: RootOption = Path("/"),
    purge: Annotated[
        bool,
        typer.Option("--purge", help="Also remove the config file and the state dir (the device identity)."),
    ] = False,
) -> None:
    """Stop and remove the agent's systemd service (idempotent); keeps its identity unless --purge."""
    try:
        outcomes = systemd.uninstall(root, purge=purge)
    except AgentError as exc:
        typer.echo(f"kernex: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    _report(outcomes)


def _report(outcomes: list[systemd.Outcome]) -> None:
    for outcome in outcomes:
        note = f" ({outcome.note})" if outcome.note else ""
        typer.echo(f"{outcome.change.value:<9} {outcome.path}{note}")


def register(app: typer.Typer) -> None:
    """Add the commands to `kernex agent`."""
    app.command("check")(check)
    app.command("status")(status)
    app.command("install")(install)
    app.command("uninstall")(uninstall)
