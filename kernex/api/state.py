"""What the lifespan builds once and request handlers share."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.broker_link import BrokerLink
from kernex.api.ratelimit import RateLimits
from kernex.api.settings import ApiSettings
from kernex.broker.pki import FleetPKI


@dataclass(frozen=True)
class AppState:
    """Resources owned by the app's lifespan."""

    settings: ApiSettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    pki: FleetPKI
    broker: BrokerLink
    registry: CollectorRegistry
    # Resolved once at start: in development it is read from (or generated into) the data dir.
    jwt_secret: str
    limits: RateLimits
