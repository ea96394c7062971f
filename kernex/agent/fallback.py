"""The HTTP fallback: when MQTT has been unreachable for a while, send the outbox over HTTPS.

`POST {api}/api/v1/devices/{id}/heartbeat` and `.../events` take the same compact JWS the device
would publish (`application/jose`, with the device's own short-lived JWT); the heartbeat's answer
lists the signed commands the device has yet to finish, which go through the same gate as MQTT
ones (kernex.agent.commands). The connection loop keeps trying MQTT meanwhile; once it connects,
the fallback stops and the MQTT publisher carries on from the same outbox. One sender at a time
holds the outbox (`send_lock`), so every message is sent once, in seq order, by one path or the
other; a message whose sending failed goes back to its place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from kernex.agent.commands import CommandHandler, Source
from kernex.agent.config import LiveSettings
from kernex.agent.http import request_slot
from kernex.agent.identity import Identity
from kernex.agent.outbox import Outbox, OutgoingMessage
from kernex.agent.wakeup import Wakeup
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol import devicetoken

HEARTBEAT_PATH = "/api/v1/devices/{device_id}/heartbeat"
EVENTS_PATH = "/api/v1/devices/{device_id}/events"
JOSE_MEDIA_TYPE = "application/jose"  # RFC 7515 section 9.2.1: a compact JWS
RETRY_INITIAL_S = 1.0  # like the MQTT reconnect: from a second ...
RETRY_MAX_S = 60.0  # ... to a minute, with full jitter
# The platform will never take these as they are (malformed, too large, failed verification):
# sending them again cannot help, so they are dropped (and logged). 401/403/404 are not among
# them: a device the platform does not accept right now may be accepted later.
REFUSED_FOR_GOOD = frozenset(
    {
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        HTTPStatus.UNPROCESSABLE_ENTITY,
    }
)
ERROR_BODY_LOG_CHARS = 300

log = get_logger(__name__)


class _HeartbeatAnswer(BaseModel):
    """What the heartbeat route answers (docs/protocol.md); unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")

    stored: bool = True
    commands: list[str] = []
    command_key_set: str | None = None  # absent from older servers and before any rotation


class _Result(Enum):
    SENT = "sent"  # the platform has it (or refused it for good): next message
    RETRY = "retry"  # keep it, wait, try again


@dataclass
class MqttLink:
    """The MQTT connection's state as the fallback sees it; the connection loop updates it."""

    connected: bool = False
    down_since: float = 0.0  # loop time the connection was last lost (or the agent started)


class HttpFallback:
    """Sends the outbox over HTTPS while MQTT is down for longer than `after_s`; `run()` is its task."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        api_url: str,
        identity: Identity,
        outbox: Outbox,
        link: MqttLink,
        send_lock: asyncio.Lock,
        commands: CommandHandler,
        live: LiveSettings,
        after_s: float,
        heartbeat_topic: str,
        events_topic: str,
        wakeup: Wakeup,
        backoff: Backoff | None = None,
    ) -> None:
        self._http = http
        self._identity = identity
        self._outbox = outbox
        self._link = link
        self._send_lock = send_lock
        self._commands = commands
        self._live = live
        self._after_s = after_s
        self._routes = {
            heartbeat_topic: api_url + HEARTBEAT_PATH.format(device_id=identity.device_id),
            events_topic: api_url + EVENTS_PATH.format(device_id=identity.device_id),
        }
        self._heartbeat_topic = heartbeat_topic
        self._backoff = backoff or Backoff(initial_s=RETRY_INITIAL_S, max_s=RETRY_MAX_S)
        # Rung when a message is queued or the MQTT connection comes or goes.
        self.wakeup = wakeup
        self.active = False
        self.sent = 0  # messages the platform took over HTTPS, for tests and status displays
        self.dropped = 0  # messages it refused for good

    async def run(self) -> None:
        """Until cancelled: wait for MQTT to stay down `after_s`, then send over HTTPS until it is back."""
        loop = asyncio.get_running_loop()
        while True:
            while self._link.connected or loop.time() < self._link.down_since + self._after_s:
                wait = None if self._link.connected else self._link.down_since + self._after_s - loop.time()
                await self.wakeup.wait(wait)
            self.active = True
            log.warning(
                "MQTT unreachable: sending heartbeats and events over HTTPS",
                down_for_s=round(loop.time() - self._link.down_since, 1),
                buffered=len(self._outbox),
            )
            try:
                await self._send_while_down()
            finally:
                self.active = False
            log.info("MQTT connected again: leaving the HTTP fallback", sent_over_https=self.sent)

    async def _send_while_down(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._link.connected:
            async with self._send_lock:
                retry_in = await self._send_all()
            if retry_in is None:
                self._backoff.reset()
                await self.wakeup.wait(None)
                continue
            # Wait out the delay (new messages do not shorten it); MQTT coming back does.
            deadline = loop.time() + retry_in
            while not self._link.connected and (remaining := deadline - loop.time()) > 0:
                await self.wakeup.wait(remaining)

    async def _send_all(self) -> float | None:
        """Send queued messages oldest first while MQTT is down; None when done, or the retry delay."""
        while not self._link.connected:
            message = self._outbox.take_first(lambda _message: True)
            if message is None:
                return None
            try:
                result, retry_after = await self._send(message)
            except BaseException:
                self._outbox.put_back(message)
                raise
            if result is _Result.RETRY:
                self._outbox.put_back(message)
                delay = self._backoff.next_delay()
                return min(max(delay, retry_after), RETRY_MAX_S) if retry_after is not None else delay
        return None

    async def _send(self, message: OutgoingMessage) -> tuple[_Result, float | None]:
        url = self._routes.get(message.topic)
        if url is None:
            # Only heartbeats and events are queued; anything else is a programming error, said loudly.
            log.error("no HTTP route for a queued message: dropped", topic=message.topic, seq=message.seq)
            self.dropped += 1
            return _Result.SENT, None
        try:
            async with request_slot(self._http):
                token = await asyncio.to_thread(
                    devicetoken.issue, self._identity.key, self._identity.device_id
                )
                reply = await self._http.post(
                    url,
                    content=message.payload,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": JOSE_MEDIA_TYPE},
                    timeout=self._live.api_timeout_s,
                )
        except httpx.TransportError as exc:
            log.warning("HTTP fallback: send failed", seq=message.seq, error=f"{type(exc).__name__}: {exc}")
            return _Result.RETRY, None
        if reply.is_success:
            self.sent += 1
            message.delivered()
            if message.topic == self._heartbeat_topic:
                self._take_commands(reply)
            return _Result.SENT, None
        detail = reply.text.strip()[:ERROR_BODY_LOG_CHARS] or reply.reason_phrase
        if reply.status_code in REFUSED_FOR_GOOD:
            self.dropped += 1
            log.warning(
                "HTTP fallback: the platform refused a message for good: dropped",
                seq=message.seq,
                status=reply.status_code,
                error=detail,
            )
            return _Result.SENT, None
        log.warning(
            "HTTP fallback: not accepted, retrying", seq=message.seq, status=reply.status_code, error=detail
        )
        return _Result.RETRY, _retry_after(reply.headers.get("retry-after"))

    def _take_commands(self, reply: httpx.Response) -> None:
        try:
            answer = _HeartbeatAnswer.model_validate_json(reply.content)
        except ValidationError as exc:
            log.warning("HTTP fallback: the heartbeat's answer is malformed", errors=exc.error_count())
            return
        if answer.command_key_set:
            # First: the commands may be signed by a key only this set introduces.
            self._commands.submit_key_set(answer.command_key_set.encode("utf-8"), Source.HTTP)
        for token in answer.commands:
            self._commands.submit(None, token.encode("utf-8"), Source.HTTP)


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: an HTTP date needs a trustworthy clock, which a device may lack.
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
