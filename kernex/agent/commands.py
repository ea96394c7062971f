"""Signed commands, from MQTT (retained, `commands/{kind}`) or from the HTTP fallback's answer.

Every command goes through the same gate, in this order: an empty payload is a retained command
being withdrawn (nothing to execute; a deploy command still waiting is dropped); the JWS must be
signed by a control-plane key pinned at registration, addressed to this device and not expired
(kernex.protocol.commands.verify_command); its kind must be the topic's; its revision must be
above the last one of its kind this device took up. Every refusal is logged with its reason. A
deploy command that passes the gate but is refused by the device (an older version without
`rollback`, a bundle that fails verification) is reported as a `deployment` event with stage
`refused`; the others cannot be reported on trustworthily (their claims are not known to be
the platform's).

Messages are queued by the receiver and handled in this module's own task, so a slow state
write never holds up the MQTT connection. Handling starts once the deployer has recovered what
a previous run left.

The pinned keys change through signed key sets (`{prefix}/control/command-keys`, retained): a
set signed by a pinned key and newer than the pinned version replaces the pinned keys, and is
persisted before it is used. A command signed by a key not (yet) pinned is kept aside, the
newest per kind, and handled again once a key set is taken up: after a rotation the retained
key set and a command signed by the new key may arrive in either order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple

from kernex.agent.config import Configurator
from kernex.agent.deploy import Deployer
from kernex.agent.state import PinnedKeys, StateStore
from kernex.kit.logs import get_logger
from kernex.protocol import jws
from kernex.protocol.commands import Command, verify_command, verify_key_set
from kernex.protocol.exceptions import InvalidKeyError, MessageError, SignatureError, StaleKeySetError
from kernex.protocol.keys import PublicKey, load_public_key_pem
from kernex.protocol.messages import CommandKey, RegistrationResponse, utc_now
from kernex.protocol.topics import CommandKind

# Commands arrive at most one per kind per (re)connect or fallback request; a backlog this long
# means something floods the device, and the oldest are dropped (the newest matter).
INBOX_SIZE = 64

log = get_logger(__name__)


class Refusal(StrEnum):
    """Why a command was not executed (the `reason` of the log line)."""

    FORGED = "forged"  # not a command, or not signed by a pinned control-plane key
    MALFORMED = "malformed"  # not a JWS, or signed claims that are not a valid command
    NOT_ADDRESSED = "not_addressed"  # for another device
    EXPIRED = "expired"
    WRONG_TOPIC = "wrong_topic"  # a command of one kind on another kind's topic
    STALE = "stale"  # a revision below the last one of its kind this device took up


class KeySetRefusal(StrEnum):
    """Why a command key set was not taken up (the `reason` of the log line)."""

    FORGED = "forged"  # not a key set, or not signed by a pinned key
    MALFORMED = "malformed"  # signed claims that are not a valid key set, or an unusable key in it
    STALE = "stale"  # not newer than the pinned set: a replayed or rolled-back set


class Source(StrEnum):
    """Where a command came from."""

    MQTT = "mqtt"
    HTTP = "http"


def pinned_command_keys(keys: Sequence[CommandKey]) -> dict[str, PublicKey]:
    """The control-plane keys pinned at registration (RegistrationResponse.command_keys), by kid."""
    pinned: dict[str, PublicKey] = {}
    for key in keys:
        try:
            pinned[key.kid] = load_public_key_pem(key.public_key_pem)
        except InvalidKeyError as exc:
            # A control-plane fault, said loudly; commands signed by the other keys still verify.
            log.error("a pinned command key is unusable: ignoring it", kid=key.kid, error=str(exc))  # noqa: TRY400 - no traceback to show
    return pinned


def initial_keys(registration: RegistrationResponse, taken: PinnedKeys | None) -> PinnedKeys:
    """The keys to pin at start: the newest of the registration's and the last key set taken up."""
    if taken is not None and taken.version >= registration.command_keys_version:
        return taken
    return PinnedKeys(version=registration.command_keys_version, keys=registration.command_keys)


class _Inbound(NamedTuple):
    kind: CommandKind | None
    payload: bytes
    source: Source
    key_set: bool = False


def classify(token: bytes, pinned: Mapping[str, PublicKey], device_id: str) -> Refusal:
    """Why verify_command refused a token: only to name the reason in the log, never to trust it."""
    try:
        parsed = jws.parse(token)
    except SignatureError:
        return Refusal.MALFORMED
    kid = parsed.header.get("kid")
    if parsed.header.get("typ") != jws.TYP_COMMAND or not isinstance(kid, str) or kid not in pinned:
        return Refusal.FORGED
    try:
        claims = json.loads(jws.verify(parsed, pinned[kid]).payload)
    except SignatureError:
        return Refusal.FORGED
    except ValueError:
        return Refusal.MALFORMED
    if not isinstance(claims, dict):
        reason = Refusal.MALFORMED
    elif claims.get("device_id") != device_id:
        reason = Refusal.NOT_ADDRESSED
    else:
        reason = Refusal.EXPIRED
    return reason


def _signed_by_unknown_command_key(token: bytes, pinned: Mapping[str, PublicKey]) -> bool:
    try:
        header = jws.unverified_header(token)
    except SignatureError:
        return False
    kid = header.get("kid")
    return header.get("typ") == jws.TYP_COMMAND and isinstance(kid, str) and kid not in pinned


class CommandHandler:
    """Verifies commands and hands them to the deployer or the configurator; `run()` is its task."""

    def __init__(
        self,
        *,
        device_id: str,
        pinned: Mapping[str, PublicKey],
        store: StateStore,
        key_set_version: int = 0,
        deployer: Deployer,
        configurator: Configurator,
    ) -> None:
        self._device_id = device_id
        self._pinned = dict(pinned)
        self._store = store
        self._deployer = deployer
        self._configurator = configurator
        self._inbox: asyncio.Queue[_Inbound] = asyncio.Queue(INBOX_SIZE)
        # Commands signed by a key not pinned, the newest per topic kind: a key set may vouch for it.
        self._unknown_key: dict[CommandKind | None, _Inbound] = {}
        self.key_set_version = key_set_version
        self.refused: dict[Refusal, int] = dict.fromkeys(Refusal, 0)  # counters, for tests and status
        self.key_sets_refused: dict[KeySetRefusal, int] = dict.fromkeys(KeySetRefusal, 0)
        self.executed = 0  # config commands applied plus deploy commands queued
        self.handled = 0  # messages handled, whatever came of them

    def submit(self, kind: CommandKind | None, payload: bytes, source: Source) -> None:
        """Queue a received command (never blocks); `kind` is the topic's, None from the HTTP fallback."""
        self._put(_Inbound(kind, payload, source))

    def submit_key_set(self, payload: bytes, source: Source) -> None:
        """Queue a received command key set (never blocks)."""
        self._put(_Inbound(None, payload, source, key_set=True))

    def _put(self, inbound: _Inbound) -> None:
        if self._inbox.full():
            dropped = self._inbox.get_nowait()
            log.warning("command backlog full: dropped the oldest", kind=dropped.kind, source=dropped.source)
        self._inbox.put_nowait(inbound)

    async def run(self) -> None:
        """Settle the previous run's deploy, then handle commands until cancelled."""
        await self._deployer.recover()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._deployer.run(), name="deploys")
            tasks.create_task(self._handle_inbox(), name="commands")

    async def _handle_inbox(self) -> None:
        while True:
            inbound = await self._inbox.get()
            if inbound.key_set:
                await self.handle_key_set(inbound.payload, inbound.source)
            else:
                await self.handle(inbound.kind, inbound.payload, inbound.source)
            self.handled += 1

    async def handle_key_set(self, payload: bytes, source: Source) -> None:
        """Take up a signed key set newer than the pinned one, then retry commands it may vouch for."""
        if not payload:
            return  # a cleared retained key set: keep the keys pinned
        try:
            key_set, keys = verify_key_set(payload, self._pinned, current_version=self.key_set_version)
        except StaleKeySetError as exc:
            if exc.version == self.key_set_version:
                # The retained set comes again on every connect: taken up already.
                log.debug("command key set already pinned", version=exc.version)
            else:
                self._refuse_key_set(KeySetRefusal.STALE, source, str(exc))
            return
        except SignatureError as exc:
            self._refuse_key_set(KeySetRefusal.FORGED, source, str(exc))
            return
        except MessageError as exc:
            self._refuse_key_set(KeySetRefusal.MALFORMED, source, str(exc))
            return
        # On disk first: a restart must never fall back to keys this set retired.
        await self._store.update(command_keys=PinnedKeys(version=key_set.version, keys=key_set.keys))
        self._pinned = keys
        self.key_set_version = key_set.version
        log.info("command key set taken up", version=key_set.version, kids=sorted(keys), source=source.value)
        waiting, self._unknown_key = list(self._unknown_key.values()), {}
        for inbound in waiting:
            await self.handle(inbound.kind, inbound.payload, inbound.source)

    def _refuse_key_set(self, reason: KeySetRefusal, source: Source, error: str) -> None:
        self.key_sets_refused[reason] += 1
        log.warning("command key set refused", reason=reason.value, source=source.value, error=error)

    async def handle(self, kind: CommandKind | None, payload: bytes, source: Source) -> None:
        """Verify one command and execute it (config) or queue it (deploy)."""
        if not payload:
            # An empty retained message: the platform withdrew the command (a cancelled deployment).
            log.info("command withdrawn", kind=kind.value if kind else None)
            if kind is CommandKind.DEPLOY:
                self._deployer.withdraw()
            return
        command = self._verify(kind, payload, source)
        if command is None:
            return
        taken = self._store.state.revisions.get(command.kind.value, 0)
        if command.revision <= taken:
            if command.revision < taken:
                self._refuse(Refusal.STALE, source, kind=command.kind, command_id=command.command_id)
            else:
                # The retained command is delivered again on every connect: it was executed once.
                log.debug(
                    "command already executed", command_id=command.command_id, revision=command.revision
                )
            return
        if command.kind is CommandKind.CONFIG:
            self.executed += 1
            await self._configurator.apply(command)
        elif self._deployer.offer(command):
            self.executed += 1
        else:
            log.debug(
                "deploy command already queued", command_id=command.command_id, revision=command.revision
            )

    def _verify(self, kind: CommandKind | None, payload: bytes, source: Source) -> Command | None:
        try:
            command = verify_command(payload, self._pinned, device_id=self._device_id, now=utc_now())
        except SignatureError as exc:
            self._refuse(classify(payload, self._pinned, self._device_id), source, kind=kind, error=str(exc))
            if _signed_by_unknown_command_key(payload, self._pinned):
                self._unknown_key[kind] = _Inbound(kind, payload, source)
            return None
        except MessageError as exc:
            self._refuse(Refusal.MALFORMED, source, kind=kind, error=str(exc))
            return None
        if kind is not None and command.kind is not kind:
            self._refuse(Refusal.WRONG_TOPIC, source, kind=kind, command_id=command.command_id)
            return None
        return command

    def _refuse(
        self,
        reason: Refusal,
        source: Source,
        *,
        kind: CommandKind | None,
        command_id: str | None = None,
        error: str | None = None,
    ) -> None:
        self.refused[reason] += 1
        log.warning(
            "command refused",
            reason=reason.value,
            source=source.value,
            kind=kind.value if kind else None,
            command_id=command_id,
            error=error,
        )
