"""What the commands domain owns for the app's lifetime: the signer, the publisher, the background tasks.

Carried by the deployments router as its lifespan (FastAPI merges it into the app's, after the
app's own resources exist): it unlocks the command key ring, starts the republisher (pending
commands out to the broker), the key set publisher (kernex.api.commands.keys) and the sweeper
(deployment timeouts, device liveness), and stops them before the app's engine is disposed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.api.commands.keys import CommandKeys
from kernex.api.commands.publisher import CommandPublisher
from kernex.api.commands.service import CommandSigner
from kernex.api.settings import ApiSettings
from kernex.api.state import AppState
from kernex.broker.command_keys import CommandKeyRing
from kernex.kit.logs import get_logger
from kernex.protocol.topics import Topics
from kernex.storage.sweeper import fail_overdue_targets, mark_silent_devices_offline

log = get_logger(__name__)


@dataclass(frozen=True)
class CommandRuntime:
    """The commands domain's long-lived resources."""

    keys: CommandKeys
    publisher: CommandPublisher
    topics: Topics

    @property
    def signer(self) -> CommandSigner:
        """The key commands are signed with now (the command key ring's current one)."""
        return self.keys.signer()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Unlock the key ring, start the republisher, key set publisher and sweeper; stop them on the way out."""
    state: AppState = app.state.kernex
    settings = state.settings
    topics = Topics(settings.topic_prefix)
    keys = CommandKeys(
        CommandKeyRing(state.pki),
        state.broker,
        topics.command_keys(),
        ttl=timedelta(seconds=settings.command_ttl_s),
        interval_s=settings.command_republish_interval_s,
    )
    await keys.load()
    publisher = CommandPublisher(state.engine, state.broker, topics, settings.command_republish_interval_s)
    app.state.commands = CommandRuntime(keys=keys, publisher=publisher, topics=topics)
    tasks = [
        asyncio.create_task(publisher.run(), name="command-republisher"),
        asyncio.create_task(keys.run(), name="command-key-set"),
        asyncio.create_task(sweep_forever(state.engine, settings), name="sweeper"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def sweep_once(engine: AsyncEngine, settings: ApiSettings, now: datetime) -> None:
    """Fail overdue deployment targets and mark silent devices offline."""
    failed = await fail_overdue_targets(engine, now)
    offline = await mark_silent_devices_offline(
        engine,
        now,
        missed_heartbeats=settings.offline_after_missed_heartbeats,
        default_interval_s=settings.default_heartbeat_interval_s,
    )
    if failed:
        log.info("deployment targets failed by the sweeper", targets=len(failed))
    if offline:
        log.info("silent devices marked offline", devices=len(offline))


async def sweep_forever(engine: AsyncEngine, settings: ApiSettings) -> None:
    """Sweep every interval; a database outage pauses it, never stops it."""
    while True:
        try:
            await sweep_once(engine, settings, datetime.now(UTC))
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            log.warning("sweep skipped: database unavailable", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(settings.sweep_interval_s)


def get_runtime(request: Request) -> CommandRuntime:
    """The commands domain's resources."""
    runtime: CommandRuntime = request.app.state.commands
    return runtime


CommandsDep = Annotated[CommandRuntime, Depends(get_runtime)]
