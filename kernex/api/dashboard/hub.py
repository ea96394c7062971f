"""The live feed behind the dashboard: one database poller per API process, fanned out to streams.

Why polling the database: the API never imports ingest (DESIGN.md), and every state change the
dashboard shows — a device's status and last heartbeat, a deployment target's progress — is a
row that ingest, the HTTP fallback or the sweeper writes. Reading those rows every
`interval_s` sees exactly what the REST routes answer, whichever process wrote them and
whichever database runs. One poller serves every open stream of the process, so the database
cost is one small set of queries per interval, not one per viewer. (The verified fleet topics
ingest republishes could feed this later without changing the stream's events.)

Each poll is diffed against the previous one; the changes of one poll form a numbered batch.
The hub keeps the last `history` batches, so a stream that reconnects after a blip with its
last batch id (`Last-Event-ID`) gets exactly what it missed; if that batch is gone, or the
hub restarted in between (a new epoch), the stream says `resync` and the client re-fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kernex.kit.logs import get_logger
from kernex.storage.models import Deployment, DeploymentTarget, Device

log = get_logger(__name__)

POLL_INTERVAL_S = 1.0  # "live" to a person watching, and one cheap query set a second per process
HISTORY_BATCHES = 300  # a few minutes of busy polls: longer blips re-fetch instead of replaying
IDLE_STOP_S = 60.0  # streams reconnect every STREAM_MAX_S; the poller outlives those gaps
# Above these, a batch tells clients to re-fetch instead of listing every change (a fleet-wide
# burst, say): one page load is cheaper than thousands of events to every viewer.
MAX_ITEMS_PER_EVENT = 500
MAX_TRACKED_DEVICES = 20_000
RECENT_DEPLOYMENTS = 100  # status changes are followed on the newest deployments
MAX_TRACKED_TARGETS = 20_000
ACTIVE_DEPLOYMENT_STATUSES = ("pending", "in_progress")

_DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_DEPLOYMENTS: sa.Table = Deployment.__table__  # type: ignore[attr-defined]  # as above
_TARGETS: sa.Table = DeploymentTarget.__table__  # type: ignore[attr-defined]  # as above

Event = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Batch:
    """The changes one poll found."""

    seq: int
    events: list[Event]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class _Snapshot:
    """What the previous poll saw, keyed by row; the diff base for the next one."""

    devices: dict[Hashable, tuple[Any, ...]]
    deployments: dict[Hashable, tuple[Any, ...]]
    targets: dict[Hashable, tuple[Any, ...]]
    stats: dict[str, int]
    watched: frozenset[str]  # active deployments: their targets are followed


def _diff(
    old: dict[Hashable, tuple[Any, ...]], new: dict[Hashable, tuple[Any, ...]]
) -> tuple[list[Hashable], list[Hashable]]:
    changed = [key for key, row in new.items() if old.get(key) != row]
    removed = [key for key in old if key not in new]
    return changed, removed


class EventHub:
    """Polls the database while someone listens and keeps the recent change batches."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        interval_s: float = POLL_INTERVAL_S,
        history: int = HISTORY_BATCHES,
        idle_stop_s: float = IDLE_STOP_S,
    ) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._idle_stop_s = idle_stop_s
        self._history: deque[Batch] = deque(maxlen=history)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._listeners = 0
        self._snapshot: _Snapshot | None = None
        self._seq = 0
        self.epoch = ""

    @property
    def cursor(self) -> str:
        """The id of the newest batch: where a stream that starts now stands."""
        return f"{self.epoch}.{self._seq}"

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[None]:
        """Count a stream as listening; the first one starts the poller, which then has a baseline."""
        self._listeners += 1
        try:
            if self._task is None or self._task.done():
                self._ready.clear()
                self._task = asyncio.create_task(self._run(), name="dashboard-events")
            # The first poll is the baseline: a client that re-fetches after `hello` then misses
            # nothing, since every later change arrives as an event.
            await self._ready.wait()
            yield
        finally:
            self._listeners -= 1

    def since(self, cursor: str | None) -> list[Batch] | None:
        """The batches after `cursor`, or None when they cannot be replayed (re-fetch instead)."""
        if not cursor:
            return None
        epoch, _, seq_text = cursor.partition(".")
        if epoch != self.epoch or not seq_text.isdigit():
            return None
        seq = int(seq_text)
        if seq > self._seq:
            return None
        oldest = self._history[0].seq if self._history else self._seq + 1
        if seq < oldest - 1:
            return None
        return [batch for batch in self._history if batch.seq > seq]

    async def wait(self, after: int, within_s: float) -> list[Batch] | None:
        """The batches after seq `after` once there are any (None on a gap), [] after `within_s`."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._seq > after), within_s)
        if self._seq <= after:
            return []
        return self.since(f"{self.epoch}.{after}")

    async def stop(self) -> None:
        """Stop polling (the app is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        # A new epoch per start: cursors from before an idle stop cannot be replayed.
        self.epoch = secrets.token_hex(4)
        self._seq = 0
        self._history.clear()
        self._snapshot = None
        idle_for = 0.0
        try:
            while True:
                try:
                    await self._poll()
                except Exception as exc:  # noqa: BLE001 - a database blip must not end the feed
                    log.warning("dashboard events poll failed", error=f"{type(exc).__name__}: {exc}")
                self._ready.set()
                idle_for = idle_for + self._interval_s if self._listeners == 0 else 0.0
                if idle_for >= self._idle_stop_s:
                    return
                await asyncio.sleep(self._interval_s)
        finally:
            self._ready.set()  # never leave a listener waiting on a poller that stopped

    async def _poll(self) -> None:
        async with self._engine.connect() as conn:
            snapshot = await _read(conn, self._snapshot)
        previous, self._snapshot = self._snapshot, snapshot
        if previous is None:
            return
        events = _events(previous, snapshot)
        if not events:
            return
        async with self._changed:
            self._seq += 1
            self._history.append(Batch(seq=self._seq, events=events))
            self._changed.notify_all()


async def _read(conn: AsyncConnection, previous: _Snapshot | None) -> _Snapshot:
    d = _DEVICES.c
    rows = await conn.execute(
        sa.select(
            d.id,
            d.name,
            d.status,
            d.state,
            d.last_seen_at,
            d.health,
            d.bundle_version,
            d.config_version,
            # A config_applied event moves these before the next heartbeat (maybe a minute away).
            d.config_applied_version,
            d.config_error,
        )
        .order_by(d.id)
        .limit(MAX_TRACKED_DEVICES)
    )
    devices: dict[Hashable, tuple[Any, ...]] = {row[0]: tuple(row) for row in rows}
    by_status: dict[str, int] = dict(
        (await conn.execute(sa.select(d.status, sa.func.count()).group_by(d.status))).all()
    )

    p = _DEPLOYMENTS.c
    recent = await conn.execute(
        sa.select(p.id, p.status, p.finished_at, p.cancelled_at)
        .order_by(p.created_at.desc())
        .limit(RECENT_DEPLOYMENTS)
    )
    deployment_rows = {row[0]: tuple(row) for row in recent}
    active_count = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(_DEPLOYMENTS)
            .where(p.status.in_(ACTIVE_DEPLOYMENT_STATUSES))
        )
    ).scalar_one()
    active = frozenset(str(i) for i, row in deployment_rows.items() if row[1] in ACTIVE_DEPLOYMENT_STATUSES)
    # Deployments active last time are read once more, so their final target states are seen.
    watched = active | (previous.watched if previous else frozenset())
    targets: dict[Hashable, tuple[Any, ...]] = {}
    counts: dict[str, dict[str, int]] = {}
    if watched:
        t = _TARGETS.c
        target_rows = await conn.execute(
            sa.select(t.deployment_id, t.device_id, t.status, t.error, t.updated_at)
            .where(t.deployment_id.in_(sorted(watched)))
            .limit(MAX_TRACKED_TARGETS)
        )
        for target in target_rows:
            targets[(target[0], target[1])] = tuple(target)
            per = counts.setdefault(target[0], {})
            per[target[2]] = per.get(target[2], 0) + 1
    deployments: dict[Hashable, tuple[Any, ...]] = {}
    for key, row in deployment_rows.items():
        # Counts are part of the row only while followed; afterwards they no longer change.
        old = previous.deployments.get(key) if previous else None
        tally = counts.get(str(key)) if key in watched else (old[-1] if old else None)
        deployments[key] = (*row, tally)
    stats = {
        "total": sum(by_status.values()),
        "online": by_status.get("online", 0),
        "offline": by_status.get("offline", 0),
        "unknown": by_status.get("unknown", 0),
        "active_deployments": int(active_count),
    }
    return _Snapshot(devices=devices, deployments=deployments, targets=targets, stats=stats, watched=active)


def _events(old: _Snapshot, new: _Snapshot) -> list[Event]:
    events: list[Event] = []
    if old.stats != new.stats:
        events.append(("stats", dict(new.stats)))

    changed, removed = _diff(old.devices, new.devices)
    if len(changed) + len(removed) > MAX_ITEMS_PER_EVENT:
        return [("resync", {"reason": "many devices changed at once"})]
    if changed or removed:
        items: list[dict[str, Any]] = [
            {
                "id": row[0],
                "name": row[1],
                "status": row[2],
                "state": row[3],
                "last_seen_at": _iso(row[4]),
                "health": row[5],
                "bundle_version": row[6],
                "config_version": row[7],
                "config_applied_version": row[8],
                "config_error": row[9],
            }
            for row in (new.devices[key] for key in changed)
        ]
        items += [{"id": key, "removed": True} for key in removed]
        events.append(("devices", {"items": items}))

    # Deployments falling out of the newest-N window are not "removed": only changes are sent.
    changed, _ = _diff(old.deployments, new.deployments)
    if changed:
        items = []
        for key in changed:
            row = new.deployments[key]
            tally: dict[str, int] | None = row[4]
            item: dict[str, Any] = {"id": row[0], "status": row[1], "finished_at": _iso(row[2])}
            item["cancelled_at"] = _iso(row[3])
            if tally is not None:
                item |= {"counts": tally, "total": sum(tally.values())}
            items.append(item)
        events.append(("deployments", {"items": items}))

    # Targets of deployments no longer followed drop out of the snapshot: not a removal either.
    changed, _ = _diff(old.targets, new.targets)
    if len(changed) > MAX_ITEMS_PER_EVENT:
        return [*events[:1], ("resync", {"reason": "many deployment targets changed at once"})]
    if changed:
        events.append(
            (
                "targets",
                {
                    "items": [
                        {
                            "deployment_id": row[0],
                            "device_id": row[1],
                            "status": row[2],
                            "error": row[3],
                            "updated_at": _iso(row[4]),
                        }
                        for row in (new.targets[key] for key in changed)
                    ]
                },
            )
        )
    return events
