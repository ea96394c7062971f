"""Sends webhook deliveries from the outbox: claimed, signed, retried with backoff, logged.

Runs in every API process (the router's lifespan). Several processes share the work safely: a
delivery is claimed by a conditional UPDATE (`... WHERE claimed_until IS NULL OR claimed_until
< now`, one winner per row on both PostgreSQL and SQLite) that leases it for LEASE_S. A lease
that runs out (a process died mid-send) makes the delivery due again: at least once.

A failed attempt (connection error, timeout, or a non-2xx answer) is retried after
min(initial * 2^(attempts-1), max) seconds, times a random factor in [0.5, 1) so that failing
deliveries do not retry in lockstep; after webhook_max_attempts it is marked failed. Every
attempt records its status code and error in the delivery log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from kernex.api.settings import ApiSettings
from kernex.api.state import AppState
from kernex.api.webhooks.signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    SecretBox,
    SignatureError,
    sign,
)
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.storage.models import Webhook, WebhookDelivery
from kernex.storage.webhooks import DeliveryStatus

log = get_logger(__name__)

LEASE_S = 120  # longer than a send can take (timeout) with room for a slow database
CLAIM_BATCH = 50  # deliveries sent concurrently per round
ERROR_TEXT_MAX = 500  # of a failing answer's body, kept in last_error
DB_RETRY_INITIAL_S = 1.0
DB_RETRY_MAX_S = 30.0

_HOOKS: sa.Table = Webhook.__table__  # type: ignore[attr-defined]  # SQLModel sets it at class creation
_DELIVERIES: sa.Table = WebhookDelivery.__table__  # type: ignore[attr-defined]  # as above


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed delivery again, and when to give up."""

    max_attempts: int
    initial_s: float
    max_s: float

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt, after `attempts` failed ones (jittered)."""
        base: float = min(self.max_s, self.initial_s * 2.0 ** max(0, attempts - 1))
        return base * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not cryptography


@dataclass(frozen=True)
class _Claimed:
    id: str
    event_type: str
    body: str
    attempts: int
    url: str
    secret_encrypted: str


class WebhookDispatcher:
    """Claims due deliveries and sends them; `run()` until cancelled."""

    def __init__(
        self,
        engine: AsyncEngine,
        box: SecretBox,
        client: httpx.AsyncClient,
        policy: RetryPolicy,
        poll_interval_s: float,
    ) -> None:
        self._engine = engine
        self._box = box
        self._client = client
        self._policy = policy
        self._poll_interval_s = poll_interval_s

    async def run(self) -> None:
        """Send what is due, then poll; database errors are logged and retried with backoff."""
        backoff = Backoff(DB_RETRY_INITIAL_S, DB_RETRY_MAX_S)
        while True:
            try:
                sent = await self.dispatch_once()
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                delay = backoff.next_delay()
                log.warning("webhook dispatch failed; retrying", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            backoff = Backoff(DB_RETRY_INITIAL_S, DB_RETRY_MAX_S)
            if not sent:
                await asyncio.sleep(self._poll_interval_s)

    async def dispatch_once(self) -> int:
        """Claim and send one round of due deliveries; returns how many were attempted."""
        claimed = await self._claim(datetime.now(UTC))
        if claimed:
            await asyncio.gather(*(self._send(c) for c in claimed))
        return len(claimed)

    async def _claim(self, now: datetime) -> list[_Claimed]:
        due = sa.and_(
            _DELIVERIES.c.status == DeliveryStatus.PENDING,
            _DELIVERIES.c.next_attempt_at <= now,
            sa.or_(_DELIVERIES.c.claimed_until.is_(None), _DELIVERIES.c.claimed_until < now),
        )
        async with self._engine.begin() as conn:
            ids = (
                (
                    await conn.execute(
                        sa.select(_DELIVERIES.c.id)
                        .where(due)
                        .order_by(_DELIVERIES.c.next_attempt_at)
                        .limit(CLAIM_BATCH)
                    )
                )
                .scalars()
                .all()
            )
        claimed: list[_Claimed] = []
        lease = now + timedelta(seconds=LEASE_S)
        for delivery_id in ids:
            async with self._engine.begin() as conn:
                won = await conn.execute(
                    sa.update(_DELIVERIES)
                    .where(_DELIVERIES.c.id == delivery_id, due)
                    .values(claimed_until=lease)
                )
                if won.rowcount != 1:
                    continue  # another dispatcher took it
                row = (
                    await conn.execute(
                        sa.select(
                            _DELIVERIES.c.id,
                            _DELIVERIES.c.event_type,
                            _DELIVERIES.c.body,
                            _DELIVERIES.c.attempts,
                            _HOOKS.c.url,
                            _HOOKS.c.secret_encrypted,
                        )
                        .join(_HOOKS, _HOOKS.c.id == _DELIVERIES.c.webhook_id)
                        .where(_DELIVERIES.c.id == delivery_id)
                    )
                ).one_or_none()
            if row is not None:
                claimed.append(_Claimed(*row))
        return claimed

    async def _send(self, delivery: _Claimed) -> None:
        body = delivery.body.encode("utf-8")
        code: int | None = None
        error: str | None = None
        try:
            secret = self._box.decrypt(delivery.secret_encrypted)
            response = await self._client.post(
                delivery.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(secret, body),
                    DELIVERY_HEADER: delivery.id,
                    EVENT_HEADER: delivery.event_type,
                },
            )
            code = response.status_code
            if not response.is_success:
                error = f"HTTP {code}: {response.text[:ERROR_TEXT_MAX]}"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # InvalidURL is not an HTTPError: a URL httpx cannot use fails the attempt, logged.
            error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]
        except SignatureError as exc:
            error = str(exc)
        await self._record(delivery, code, error)

    async def _record(self, delivery: _Claimed, code: int | None, error: str | None) -> None:
        now = datetime.now(UTC)
        attempts = delivery.attempts + 1
        values: dict[str, object] = {
            "attempts": attempts,
            "last_status_code": code,
            "last_error": error,
            "claimed_until": None,
        }
        if error is None:
            values |= {"status": DeliveryStatus.SUCCEEDED, "delivered_at": now}
        elif attempts >= self._policy.max_attempts:
            values["status"] = DeliveryStatus.FAILED
            log.warning(
                "webhook delivery failed for good", delivery_id=delivery.id, attempts=attempts, error=error
            )
        else:
            values["next_attempt_at"] = now + timedelta(seconds=self._policy.delay(attempts))
            log.info(
                "webhook delivery failed; will retry", delivery_id=delivery.id, attempts=attempts, error=error
            )
        async with self._engine.begin() as conn:
            await conn.execute(sa.update(_DELIVERIES).where(_DELIVERIES.c.id == delivery.id).values(values))


def policy_from(settings: ApiSettings) -> RetryPolicy:
    """The retry policy the settings configure."""
    return RetryPolicy(
        max_attempts=settings.webhook_max_attempts,
        initial_s=settings.webhook_backoff_initial_s,
        max_s=settings.webhook_backoff_max_s,
    )


def secret_box(app: FastAPI) -> SecretBox:
    """The SecretBox the lifespan built."""
    box: SecretBox = app.state.webhook_box
    return box


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the secret box and run the dispatcher for the app's lifetime."""
    state: AppState = app.state.kernex
    settings = state.settings
    # Reading (or generating) the development key touches the disk: off the event loop.
    key = await asyncio.to_thread(settings.resolved_webhook_secret_key)
    box = SecretBox(key)
    app.state.webhook_box = box
    async with httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
        dispatcher = WebhookDispatcher(
            state.engine, box, client, policy_from(settings), settings.webhook_poll_interval_s
        )
        task = asyncio.create_task(dispatcher.run(), name="webhook-dispatcher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
