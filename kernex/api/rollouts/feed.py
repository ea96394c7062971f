"""Rollout progress for integrators: every recorded transition goes to the fleet topic
`<prefix>/fleet/rollouts/{deployment_id}` (retained) and to the webhooks taking `rollouts`.

Transitions are recorded by whatever steps a rollout (the engine, approve, cancel), inside its own
transaction. The feed sends the ones not sent yet (`published_at` is null) in id order, so none
of those paths needs a hook and a transition recorded while the broker or this process was down
goes out once they are back. Delivery is at least once: the MQTT publish comes before the commit
that marks the transition sent, so a crash in between sends it again; integrators deduplicate by
(deployment_id, transition_id). Webhook deliveries are written in that same commit (the outbox).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.broker_link import BrokerLink, BrokerUnavailableError
from kernex.kit.logs import get_logger
from kernex.kit.pacer import Pacer
from kernex.protocol.fleet import FLEET_QOS, FleetRollout, encode, rollout_topic
from kernex.protocol.topics import Topics
from kernex.storage.models import DeploymentTarget, Rollout, RolloutTransition
from kernex.storage.webhooks import enqueue_rollouts

log = get_logger(__name__)

# Integrators see a rollout step within this of its commit; an idle pass is one indexed query.
FEED_INTERVAL_S = 1.0
# Transitions sent per transaction: bounds one pass after a long broker outage.
BATCH = 100


class RolloutFeed:
    """Sends unsent rollout transitions; `run` is the background task, `wake` asks for a pass now."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        broker: BrokerLink,
        topics: Topics,
        interval_s: float = FEED_INTERVAL_S,
    ) -> None:
        self._sessions = sessions
        self._broker = broker
        self._topics = topics
        self._pace = Pacer(interval_s)

    def wake(self) -> None:
        """Ask for a pass now (a rollout just changed)."""
        self._pace.wake()

    async def run(self) -> None:
        """Send pending transitions each interval or when woken; an outage only delays them."""
        while True:
            self._pace.begin()
            try:
                while await self.send_pending() == BATCH:
                    pass  # a full batch: more may be waiting
            except BrokerUnavailableError as exc:
                log.info("rollout progress waits for the broker", error=str(exc))
            except (OSError, sa.exc.SQLAlchemyError) as exc:
                log.warning("rollout progress waits for the database", error=f"{type(exc).__name__}: {exc}")
            await self._pace.wait()

    async def send_pending(self) -> int:
        """Publish and mark sent up to BATCH unsent transitions, oldest first; how many."""
        async with self._sessions() as session:
            pending = list(
                (
                    await session.exec(
                        select(RolloutTransition)
                        .where(col(RolloutTransition.published_at).is_(None))
                        .order_by(col(RolloutTransition.id))
                        .limit(BATCH)
                        # Several API processes: each transition is taken by one of them.
                        .with_for_update(skip_locked=True)
                    )
                ).all()
            )
            if not pending:
                return 0
            messages = await _messages(session, pending)
            # In id order, so the retained message of each rollout is its latest step.
            for message in messages:
                await self._broker.publish(
                    rollout_topic(self._topics, message.deployment_id),
                    encode(message),
                    retain=True,
                    qos=FLEET_QOS,
                )
            await enqueue_rollouts(await session.connection(), messages)
            await session.exec(
                sa.update(RolloutTransition)
                .where(col(RolloutTransition.id).in_([t.id for t in pending]))
                .values(published_at=datetime.now(UTC))
            )
            await session.commit()
        log.info("rollout progress sent", transitions=len(messages))
        return len(messages)


async def _messages(session: AsyncSession, transitions: Sequence[RolloutTransition]) -> list[FleetRollout]:
    ids = sorted({t.deployment_id for t in transitions})
    rollouts = {
        r.deployment_id: r
        for r in (await session.exec(select(Rollout).where(col(Rollout.deployment_id).in_(ids)))).all()
    }
    counts: dict[str, dict[str, int]] = {}
    rows = await session.exec(
        select(DeploymentTarget.deployment_id, DeploymentTarget.status, func.count())
        .where(col(DeploymentTarget.deployment_id).in_(ids))
        .group_by(col(DeploymentTarget.deployment_id), col(DeploymentTarget.status))
    )
    for deployment_id, status, n in rows.all():
        counts.setdefault(deployment_id, {})[status] = n
    messages = []
    for t in transitions:
        rollout = rollouts.get(t.deployment_id)
        if rollout is None or t.id is None:
            continue  # the deployment was deleted with its rollout: nothing left to report
        messages.append(
            FleetRollout(
                deployment_id=t.deployment_id,
                transition_id=t.id,
                event=t.event,
                at=t.at,
                state=t.state,
                phase=t.phase,
                phases_total=len(rollout.strategy["phases"]),
                actor=t.actor,
                reason=t.reason,
                counts=counts.get(t.deployment_id, {}),
            )
        )
    return messages
