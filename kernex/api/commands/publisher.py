"""Publishing recorded commands: retained on the device's command topic, or cleared from it.

A command topic retains one message, so what matters per (device, kind) is that the broker ends
up holding the newest command (or nothing, once it is withdrawn). `sync_topic` publishes the
newest, then reads again: if a newer command was recorded (or this one withdrawn) meanwhile, it
publishes again. Whoever publishes last therefore publishes the newest, even with several API
processes, and no database lock is held while waiting for the broker.

`run` is the republisher: it publishes whatever is still pending (recorded while the broker was
down, or by a request that failed to publish) every interval, and at once after a reconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.api.broker_link import BrokerLink, BrokerUnavailableError
from kernex.api.commands.service import CommandState
from kernex.kit.logs import get_logger
from kernex.kit.pacer import Pacer
from kernex.protocol.topics import CommandKind, Topics
from kernex.storage.models import DeviceCommand

log = get_logger(__name__)

# A topic whose newest command keeps changing while it is published is left to the next pass
# rather than chased forever.
MAX_ROUNDS = 5
REPUBLISH_BATCH = 500  # topics per republisher pass; the rest follow in the next
INLINE_CONCURRENCY = 16  # publishes in flight at once for one request's commands

_COMMANDS: sa.Table = DeviceCommand.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_UNSENT = (CommandState.PENDING.value, CommandState.CLEARING.value)


@dataclass(frozen=True)
class _Newest:
    id: str
    state: str
    token: str


@dataclass
class _TopicLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class CommandPublisher:
    """Publishes the newest command of each (device, kind) topic."""

    def __init__(self, engine: AsyncEngine, broker: BrokerLink, topics: Topics, interval_s: float) -> None:
        self._engine = engine
        self._broker = broker
        self._topics = topics
        self._pace = Pacer(interval_s)
        # One lock per topic being published, so this process publishes a topic one at a time;
        # dropped when no one holds or waits for it, so the map stays as small as the work in flight.
        self._locks: dict[tuple[str, str], _TopicLock] = {}

    def wake(self) -> None:
        """Ask the republisher for a pass now."""
        self._pace.wake()

    async def sync_topics(self, topics: Iterable[tuple[str, str]]) -> bool:
        """Publish these (device id, kind) topics; False if the broker was unavailable for any.

        Failures leave the commands pending for the republisher; they are not errors of the caller.
        """
        semaphore = asyncio.Semaphore(INLINE_CONCURRENCY)

        async def one(device_id: str, kind: str) -> bool:
            async with semaphore:
                try:
                    await self.sync_topic(device_id, kind)
                except BrokerUnavailableError as exc:
                    log.warning("command left pending", device_id=device_id, kind=kind, error=str(exc))
                    return False
                return True

        results = await asyncio.gather(*(one(d, k) for d, k in dict.fromkeys(topics)))
        if not all(results):
            self.wake()
        return all(results)

    async def sync_topic(self, device_id: str, kind: str) -> None:
        """Make the broker hold the newest command of this topic (or nothing, once withdrawn)."""
        key = (device_id, kind)
        entry = self._locks.setdefault(key, _TopicLock())
        entry.users += 1
        try:
            async with entry.lock:
                await self._sync(device_id, kind)
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[key]

    async def _sync(self, device_id: str, kind: str) -> None:
        topic = self._topics.command(device_id, CommandKind(kind))
        sent: tuple[str, str] | None = None  # (command id, state it was marked) after our publish
        for _ in range(MAX_ROUNDS):
            newest = await self._newest(device_id, kind)
            if newest is None or (newest.id, newest.state) == sent:
                return
            if sent is None and newest.state not in _UNSENT:
                return  # already on the broker as it should be
            clearing = newest.state in {CommandState.CLEARING, CommandState.CLEARED}
            await self._broker.publish(topic, b"" if clearing else newest.token.encode("ascii"), retain=True)
            sent = await self._mark(newest, clearing=clearing)
        log.warning("command topic kept changing; the republisher will finish it", topic=topic)
        self.wake()

    async def _newest(self, device_id: str, kind: str) -> _Newest | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(_COMMANDS.c.id, _COMMANDS.c.state, _COMMANDS.c.token)
                    .where(_COMMANDS.c.device_id == device_id, _COMMANDS.c.kind == kind)
                    .order_by(_COMMANDS.c.revision.desc())
                    .limit(1)
                )
            ).first()
        return _Newest(row.id, row.state, row.token) if row is not None else None

    async def _mark(self, newest: _Newest, *, clearing: bool) -> tuple[str, str]:
        now = datetime.now(UTC)
        if clearing:
            before, after, values = CommandState.CLEARING, CommandState.CLEARED, {"cleared_at": now}
        else:
            before, after, values = CommandState.PENDING, CommandState.PUBLISHED, {"published_at": now}
        async with self._engine.begin() as conn:
            await conn.execute(
                sa.update(_COMMANDS)
                .where(_COMMANDS.c.id == newest.id, _COMMANDS.c.state == before.value)
                .values(state=after.value, **values)
            )
        return newest.id, after.value

    async def publish_pending(self) -> int:
        """One republisher pass: publish topics whose newest command is unsent; returns how many."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(_COMMANDS.c.device_id, _COMMANDS.c.kind)
                .where(_COMMANDS.c.state.in_(_UNSENT))
                .distinct()
                .limit(REPUBLISH_BATCH)
            )
            topics = [(r.device_id, r.kind) for r in rows]
        done = 0
        for device_id, kind in topics:
            await self.sync_topic(device_id, kind)
            done += 1
        if len(topics) == REPUBLISH_BATCH:
            self.wake()
        return done

    async def run(self) -> None:
        """The republisher: a pass on every wake, every interval, and at once after a reconnect."""
        while True:
            await self._broker.wait_connected()
            self._pace.begin()
            try:
                published = await self.publish_pending()
            except BrokerUnavailableError as exc:
                log.warning("republishing paused: broker unavailable", error=str(exc))
                # Back to waiting for the connection: the next pass runs as soon as it is up.
                await asyncio.sleep(min(self._pace.interval_s, 1.0))
                continue
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("republishing paused: database unavailable", error=f"{type(exc).__name__}: {exc}")
            else:
                if published:
                    log.info("pending commands published", topics=published)
            await self._pace.wait()
