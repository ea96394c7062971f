"""Publishing recorded commands: retained on the device's command topic, or cleared from it.

A command topic retains one message, so what matters per (device, kind) is that the broker ends
up holding the newest command (or nothing, once it is withdrawn). `sync_many` publishes the
newest, then reads again: if a newer command was recorded (or this one withdrawn) meanwhile, it
publishes again. Whoever publishes last therefore publishes the newest, even with several API
processes or overlapping calls in one, and no database lock is held while waiting for the
broker. It works on many topics per round trip (one read, concurrent publishes, one update),
so a deployment to 10,000 devices costs a few queries rather than 40,000.

`run` is the republisher: it publishes whatever is still pending (recorded while the broker was
down, or by a request that failed to publish) every interval, and at once after a reconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.api.broker_link import MAX_INFLIGHT, BrokerLink, BrokerUnavailableError
from kernex.api.commands.service import CommandState
from kernex.kit.chunks import chunks
from kernex.kit.logs import get_logger
from kernex.kit.pacer import Pacer
from kernex.protocol.topics import CommandKind, Topics
from kernex.storage.models import DeviceCommand

log = get_logger(__name__)

# A topic whose newest command keeps changing while it is published is left to the next pass
# rather than chased forever.
MAX_ROUNDS = 5
REPUBLISH_BATCH = 10_000  # topics per republisher pass (a whole large deployment); the rest follow
# Publishes awaiting their PUBACK at once: as many as the link keeps in flight, so the
# connection stays busy and a dead broker fails a bounded number of them.
PUBLISH_CONCURRENCY = MAX_INFLIGHT
# Ids per IN (...): under SQLite's and asyncpg's 32,767 bind parameters, with room to spare.
QUERY_CHUNK = 5_000

_COMMANDS: sa.Table = DeviceCommand.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_UNSENT = (CommandState.PENDING.value, CommandState.CLEARING.value)
# Once on the broker, by whether it was a clearing: (state it was in, state it goes to, time column).
_MARKS = {
    False: (CommandState.PENDING, CommandState.PUBLISHED, "published_at"),
    True: (CommandState.CLEARING, CommandState.CLEARED, "cleared_at"),
}


@dataclass(frozen=True)
class _Newest:
    id: str
    device_id: str
    kind: str
    state: str
    token: str

    @property
    def key(self) -> tuple[str, str]:
        return self.device_id, self.kind

    @property
    def clearing(self) -> bool:
        return self.state in {CommandState.CLEARING, CommandState.CLEARED}


class CommandPublisher:
    """Publishes the newest command of each (device, kind) topic, many topics per round trip."""

    def __init__(self, engine: AsyncEngine, broker: BrokerLink, topics: Topics, interval_s: float) -> None:
        self._engine = engine
        self._broker = broker
        self._topics = topics
        self._pace = Pacer(interval_s)

    def wake(self) -> None:
        """Ask the republisher for a pass now."""
        self._pace.wake()

    async def sync_topics(self, topics: Iterable[tuple[str, str]]) -> bool:
        """Publish these (device id, kind) topics; False if the broker was unavailable for any.

        Failures leave the commands pending for the republisher; they are not errors of the caller.
        """
        try:
            await self.sync_many(topics)
        except BrokerUnavailableError as exc:
            log.warning("commands left pending", error=str(exc))
            self.wake()
            return False
        return True

    async def sync_topic(self, device_id: str, kind: str) -> None:
        """Make the broker hold the newest command of this topic (or nothing, once withdrawn)."""
        await self.sync_many([(device_id, kind)])

    async def sync_many(self, topics: Iterable[tuple[str, str]]) -> None:
        """Make the broker hold the newest command of each topic (or nothing, once withdrawn).

        Each round reads the newest commands of all the topics in one query, publishes them
        concurrently, and marks the published ones in one statement per state; the next round
        re-reads the topics it published, and publishes again those whose newest command changed
        meanwhile. Raises BrokerUnavailableError (after marking what did go out) if any publish failed.
        """
        todo = list(dict.fromkeys(topics))
        sent: dict[tuple[str, str], tuple[str, str]] = {}  # topic -> (command id, state marked)
        for _ in range(MAX_ROUNDS):
            newest = await self._newest(todo)
            work = [
                command
                for key in todo
                if (command := newest.get(key)) is not None
                and (command.id, command.state) != sent.get(key)
                # A topic not yet published in this call is only sent if its newest is unsent.
                and (key in sent or command.state in _UNSENT)
            ]
            if not work:
                return
            published, failure = await self._publish(work)
            sent.update(await self._mark(published))
            if failure is not None:
                raise failure
            todo = [command.key for command in work]
        log.warning("command topics kept changing; the republisher will finish them", topics=len(todo))
        self.wake()

    async def _publish(self, work: list[_Newest]) -> tuple[list[_Newest], BrokerUnavailableError | None]:
        """Publish concurrently; the commands that went out, and the first failure if any did not."""
        semaphore = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(command: _Newest) -> None:
            async with semaphore:
                topic = self._topics.command(command.device_id, CommandKind(command.kind))
                payload = b"" if command.clearing else command.token.encode("ascii")
                await self._broker.publish(topic, payload, retain=True)

        results = await asyncio.gather(*(one(c) for c in work), return_exceptions=True)
        published = [c for c, r in zip(work, results, strict=True) if r is None]
        failures = [r for r in results if r is not None]
        for result in failures:
            if not isinstance(result, BrokerUnavailableError):
                raise result
        first = next((r for r in failures if isinstance(r, BrokerUnavailableError)), None)
        return published, first

    async def _newest(self, topics: list[tuple[str, str]]) -> dict[tuple[str, str], _Newest]:
        """The newest command of each topic that has one."""
        wanted = set(topics)
        found: dict[tuple[str, str], _Newest] = {}
        device_ids = sorted({device_id for device_id, _ in topics})
        async with self._engine.connect() as conn:
            for chunk in chunks(device_ids, QUERY_CHUNK):
                # The newest revision per topic comes from the (device_id, kind, revision) index
                # alone; only those rows are read whole (a signed token each), not the history.
                newest = (
                    sa.select(
                        _COMMANDS.c.device_id,
                        _COMMANDS.c.kind,
                        sa.func.max(_COMMANDS.c.revision).label("revision"),
                    )
                    .where(_COMMANDS.c.device_id.in_(chunk))
                    .group_by(_COMMANDS.c.device_id, _COMMANDS.c.kind)
                    .subquery()
                )
                rows = await conn.execute(
                    sa.select(
                        _COMMANDS.c.id,
                        _COMMANDS.c.device_id,
                        _COMMANDS.c.kind,
                        _COMMANDS.c.state,
                        _COMMANDS.c.token,
                    ).join(
                        newest,
                        sa.and_(
                            _COMMANDS.c.device_id == newest.c.device_id,
                            _COMMANDS.c.kind == newest.c.kind,
                            _COMMANDS.c.revision == newest.c.revision,
                        ),
                    )
                )
                for row in rows:
                    if (row.device_id, row.kind) in wanted:
                        command = _Newest(row.id, row.device_id, row.kind, row.state, row.token)
                        found[command.key] = command
        return found

    async def _mark(self, published: list[_Newest]) -> dict[tuple[str, str], tuple[str, str]]:
        """Record what went out; per topic, the (command id, state) it is now in."""
        now = datetime.now(UTC)
        marked: dict[tuple[str, str], tuple[str, str]] = {}
        async with self._engine.begin() as conn:
            for clearing, (before, after, stamp) in _MARKS.items():
                group = [c for c in published if c.clearing == clearing]
                for chunk in chunks([c.id for c in group], QUERY_CHUNK):
                    await conn.execute(
                        sa.update(_COMMANDS)
                        .where(_COMMANDS.c.id.in_(chunk), _COMMANDS.c.state == before.value)
                        .values({"state": after.value, stamp: now})
                    )
                marked.update((c.key, (c.id, after.value)) for c in group)
        return marked

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
        await self.sync_many(topics)
        if len(topics) == REPUBLISH_BATCH:
            self.wake()
        return len(topics)

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
