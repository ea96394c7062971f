"""A cache of device public keys, and the admission states read fresh, from the devices table.

Verifying a message needs its device's key and state; a database round trip per message would
cap ingest at the database's query rate. Keys (parsed PEM) live `ttl_s`. Admission states are
read again on every lookup, which ingest makes once per batch: one indexed query for the
batch's devices (ids and states only), so a message received after a revocation committed is
refused, whichever database and however many workers (docs/revocation.md). Unknown ids are
cached for a shorter time: a flood of messages naming a device that does not exist costs one
query per id per `negative_ttl_s`, not one per message. Lookups are async (the event loop's
database driver), never on paho's network thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.kit.chunks import chunks
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.keys import PublicKey, load_public_key_pem
from kernex.storage.models import AdmissionState, Device

log = get_logger(__name__)

# An unknown id may become known (registration) but cannot publish before it has a certificate,
# so a short negative lifetime loses nothing and still caps the queries a flood can cause.
NEGATIVE_TTL_S = 5.0
# SQL IN lists stay well below SQLite's 32766-parameter limit and Postgres' planner comfort zone.
LOOKUP_CHUNK = 500


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """What verification needs to know about a device."""

    device_id: str
    state: AdmissionState
    # None when the stored PEM cannot be loaded: nothing from this device can verify.
    public_key: PublicKey | None


@dataclass(slots=True)
class _Entry:
    key: DeviceKey | None
    expires_at: float


class KeyCache:
    """Device id → DeviceKey (or None for unknown), refreshed from the database after a TTL."""

    def __init__(
        self,
        engine: AsyncEngine,
        ttl_s: float,
        negative_ttl_s: float = NEGATIVE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._negative_ttl_s = min(negative_ttl_s, ttl_s)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def invalidate(self, device_id: str | None = None) -> None:
        """Forget one device, or everything."""
        if device_id is None:
            self._entries.clear()
        else:
            self._entries.pop(device_id, None)

    async def get_many(self, device_ids: Iterable[str]) -> dict[str, DeviceKey | None]:
        """The keys of these devices (None for unknown ones), querying only the stale or missing."""
        now = self._clock()
        found: dict[str, DeviceKey | None] = {}
        missing: list[str] = []
        for device_id in dict.fromkeys(device_ids):
            entry = self._entries.get(device_id)
            if entry is not None and entry.expires_at > now:
                found[device_id] = entry.key
            else:
                missing.append(device_id)
        known = [device_id for device_id, key in found.items() if key is not None]
        if known:
            states = await self._states(known)
            for device_id in known:
                cached = found[device_id]
                assert cached is not None
                state = states.get(device_id)
                if state is None:
                    # Deleted since it was cached: unknown from now on.
                    self._entries.pop(device_id, None)
                    found[device_id] = None
                elif state is not cached.state:
                    fresh = DeviceKey(device_id, state, cached.public_key)
                    self._entries[device_id].key = fresh
                    found[device_id] = fresh
                    log.info("device state changed", device_id=device_id, state=state.value)
        if missing:
            loaded = await self._load(missing)
            now = self._clock()
            self._evict_expired(now)
            for device_id in missing:
                key = loaded.get(device_id)
                ttl = self._ttl_s if key is not None else self._negative_ttl_s
                self._entries[device_id] = _Entry(key, now + ttl)
                found[device_id] = key
        return found

    async def get(self, device_id: str) -> DeviceKey | None:
        """One device's key, or None if the device is unknown."""
        return (await self.get_many([device_id]))[device_id]

    def _evict_expired(self, now: float) -> None:
        # Bounded by the number of distinct ids seen within one TTL; a sweep on each load keeps
        # an attacker cycling through random ids from growing the dict without limit.
        stale = [k for k, e in self._entries.items() if e.expires_at <= now]
        for device_id in stale:
            del self._entries[device_id]

    async def _states(self, device_ids: list[str]) -> dict[str, AdmissionState]:
        table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
        result: dict[str, AdmissionState] = {}
        async with self._engine.connect() as conn:
            for chunk in chunks(device_ids, LOOKUP_CHUNK):
                rows = await conn.execute(sa.select(table.c.id, table.c.state).where(table.c.id.in_(chunk)))
                for device_id, state in rows:
                    result[device_id] = _state(device_id, state)
        return result

    async def _load(self, device_ids: list[str]) -> dict[str, DeviceKey]:
        table = Device.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
        columns = (table.c.id, table.c.state, table.c.public_key_pem)
        result: dict[str, DeviceKey] = {}
        async with self._engine.connect() as conn:
            for chunk in chunks(device_ids, LOOKUP_CHUNK):
                rows = await conn.execute(sa.select(*columns).where(table.c.id.in_(chunk)))
                for device_id, state, pem in rows:
                    result[device_id] = DeviceKey(
                        device_id, _state(device_id, state), _public_key(device_id, pem)
                    )
        return result


def _state(device_id: str, value: str) -> AdmissionState:
    try:
        return AdmissionState(value)
    except ValueError:
        # A state this version does not know is not an admission: refuse rather than guess.
        log.warning("unknown device state; treating it as revoked", device_id=device_id, state=value)
        return AdmissionState.REVOKED


def _public_key(device_id: str, pem: str) -> PublicKey | None:
    try:
        return load_public_key_pem(pem)
    except InvalidKeyError as exc:
        log.error("stored public key does not load", device_id=device_id, error=str(exc))  # noqa: TRY400 - the error is the key's, not a traceback's
        return None
