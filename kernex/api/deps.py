"""`Annotated` dependency aliases, so route signatures read like prose."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, Request
from sqlmodel.ext.asyncio.session import AsyncSession

from kernex.api.settings import ApiSettings
from kernex.api.state import AppState
from kernex.broker.pki import FleetPKI
from kernex.storage.exceptions import DatabaseUnavailableError


def get_state(request: Request) -> AppState:
    """The lifespan's resources."""
    state: AppState = request.app.state.kernex
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> ApiSettings:
    """The process settings."""
    return state.settings


def get_pki(state: StateDep) -> FleetPKI:
    """The fleet PKI."""
    return state.pki


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """A database session per request; connection failures become 503, not 500."""
    try:
        async with state.sessions() as session:
            yield session
    except (OSError, sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise DatabaseUnavailableError(f"database unavailable: {type(exc).__name__}") from None


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
PKIDep = Annotated[FleetPKI, Depends(get_pki)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
