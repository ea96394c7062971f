"""Creating, listing and revoking integrators: the broker's registry (kernex.broker.integrators),
shared with `kernex integrations`, then the running broker brought up to date.

The registry and the CRL are files in the PKI directory: the work runs off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kernex.api.errors import ConflictError, NotFoundError
from kernex.api.settings import ApiSettings
from kernex.broker.exceptions import BrokerError
from kernex.broker.integrators import (
    Integrator,
    IntegratorNotFoundError,
    IntegratorRegistry,
    IssuedIntegrator,
    apply,
)
from kernex.broker.pki import FleetPKI
from kernex.kit.logs import get_logger
from kernex.protocol.topics import Topics

log = get_logger(__name__)


class IntegrationNotFoundError(NotFoundError):
    """No integrator has that name."""

    code = "integration_not_found"


class IntegrationExistsError(ConflictError):
    """An active integrator already has that name (revoke it first to issue a new credential)."""

    code = "integration_exists"


@dataclass(frozen=True)
class BrokerOutcome:
    """Whether the running broker re-read the ACL and CRL, and what went wrong if not."""

    reloaded: bool
    errors: tuple[str, ...]


def _apply(settings: ApiSettings, registry: IntegratorRegistry) -> BrokerOutcome:
    try:
        applied = apply(settings.resolved_broker_dir, Topics(settings.topic_prefix), registry)
    except (BrokerError, OSError) as exc:
        log.warning("broker not updated for an integrator change", error=str(exc))
        return BrokerOutcome(reloaded=False, errors=(f"broker update: {exc}",))
    if applied.reloaded_pid is None:
        log.warning(
            "no Mosquitto run by Kernex to reload: reload the broker's ACL and CRL yourself",
            broker_dir=str(settings.resolved_broker_dir),
        )
    return BrokerOutcome(reloaded=applied.reloaded_pid is not None, errors=())


async def create(pki: FleetPKI, settings: ApiSettings, name: str) -> tuple[IssuedIntegrator, BrokerOutcome]:
    """Issue a credential for a new (or revoked) name and let the broker know."""
    registry = IntegratorRegistry(pki)

    def work() -> tuple[IssuedIntegrator, BrokerOutcome]:
        current = next((i for i in registry.all() if i.name == name), None)
        if current is not None and current.active:
            raise IntegrationExistsError(f"integrator {name!r} exists and is active")
        issued = registry.issue(name)
        return issued, _apply(settings, registry)

    return await asyncio.to_thread(work)


async def list_integrations(pki: FleetPKI) -> list[Integrator]:
    """Every integrator, revoked ones included."""
    return await asyncio.to_thread(IntegratorRegistry(pki).all)


async def revoke(pki: FleetPKI, settings: ApiSettings, name: str) -> tuple[Integrator, BrokerOutcome]:
    """Revoke (ACL and CRL) and let the broker know; revoking twice answers the revoked record."""
    registry = IntegratorRegistry(pki)

    def work() -> tuple[Integrator, BrokerOutcome]:
        try:
            revoked = registry.revoke(name)
        except IntegratorNotFoundError as exc:
            raise IntegrationNotFoundError(str(exc)) from None
        return revoked, _apply(settings, registry)

    return await asyncio.to_thread(work)
