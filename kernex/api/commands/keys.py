"""The command key ring as the API uses it: which key signs now, and the key set on the broker.

The ring lives in the PKI directory (kernex.broker.command_keys), shared with the CLI and other
API processes. This process keeps its keys decrypted in memory, reloads them when the ring file
changes (checked every pass of `run`), picks the signer by time (a rotated key signs once its
transition is over), and publishes the ring's signed key set retained on
`{prefix}/control/command-keys` whenever the version it last published is not the ring's, or
the broker connection was re-established (a broker without persistence forgets retained
messages when it restarts).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from kernex.api.broker_link import BrokerLink, BrokerUnavailableError
from kernex.api.commands.service import CommandSigner
from kernex.api.errors import ConflictError, NotFoundError
from kernex.broker.command_keys import CommandKeyRing, Ring, RingKey
from kernex.broker.exceptions import PKIError
from kernex.kit.logs import get_logger
from kernex.kit.pacer import Pacer
from kernex.protocol.keys import PrivateKey

log = get_logger(__name__)


class CommandKeyNotFoundError(NotFoundError):
    """No key of the command key ring has this kid."""

    code = "command_key_not_found"


class CommandKeyConflictError(ConflictError):
    """The ring cannot change that way (full, or the key still signs)."""

    code = "command_key_conflict"


class CommandKeys:
    """Signs with the ring's current key; keeps the key set published."""

    def __init__(
        self, ring: CommandKeyRing, broker: BrokerLink, topic: str, *, ttl: timedelta, interval_s: float
    ) -> None:
        self._ring_store = ring
        self._broker = broker
        self._topic = topic
        self._ttl = ttl
        self._ring: Ring | None = None
        self._keys: dict[str, PrivateKey] = {}
        self._stamp: float | None = None
        self._published: tuple[int, int] | None = None  # (ring version, broker connection) last published
        self._pace = Pacer(interval_s)

    @property
    def ring(self) -> Ring:
        """The ring as last loaded."""
        if self._ring is None:
            raise RuntimeError("CommandKeys.load() was not awaited")  # a wiring bug, not a user error
        return self._ring

    def signer(self, now: datetime | None = None) -> CommandSigner:
        """The key commands are signed with now."""
        current = self.ring.signer(now or datetime.now(UTC))
        return CommandSigner(key=self._keys[current.kid], key_id=current.kid, ttl=self._ttl)

    async def load(self) -> None:
        """Read the ring and decrypt its keys (the passphrase KDF runs off the event loop)."""
        stamp = self._ring_store.stamp()
        ring = await asyncio.to_thread(self._ring_store.load)
        keys = await asyncio.to_thread(
            lambda: {k.kid: self._ring_store.private_key(k.kid) for k in ring.keys}
        )
        self._ring, self._keys, self._stamp = ring, keys, stamp

    async def rotate(self, transition: timedelta) -> RingKey:
        """Add a key that signs after the transition; its key set goes out at once."""
        try:
            _, added = await asyncio.to_thread(self._ring_store.rotate, transition)
        except PKIError as exc:
            raise CommandKeyConflictError(str(exc)) from None
        await self.load()
        self._pace.wake()
        return added

    async def retire(self, kid: str) -> Ring:
        """Drop a superseded key; the smaller key set goes out at once."""
        if all(k.kid != kid for k in self.ring.keys):
            await self.load()  # the CLI may have changed the ring since
            if all(k.kid != kid for k in self.ring.keys):
                raise CommandKeyNotFoundError(f"no command key {kid!r} in the ring")
        try:
            await asyncio.to_thread(self._ring_store.retire, kid)
        except PKIError as exc:
            raise CommandKeyConflictError(str(exc)) from None
        await self.load()
        self._pace.wake()
        return self.ring

    async def publish_once(self) -> bool:
        """Publish the key set if the broker lacks this version; True if it published."""
        if self._ring_store.stamp() != self._stamp:
            await self.load()
        ring = self.ring
        wanted = (ring.version, self._broker.connects)
        if ring.token is None or wanted == self._published:
            return False
        await self._broker.publish(self._topic, ring.token.encode("ascii"), retain=True)
        self._published = wanted
        log.info("command key set published", version=ring.version, keys=[k.kid for k in ring.keys])
        return True

    async def run(self) -> None:
        """Keep the broker's key set current: on every wake, every interval, after every reconnect."""
        while True:
            await self._broker.wait_connected()
            self._pace.begin()
            try:
                await self.publish_once()
            except BrokerUnavailableError as exc:
                log.warning("command key set not published: broker unavailable", error=str(exc))
            except PKIError as exc:
                # A ring file damaged by hand: keep signing with the keys loaded, say so every pass.
                log.error("command key ring unreadable", error=str(exc))  # noqa: TRY400 - the message says it all
            await self._pace.wait()
