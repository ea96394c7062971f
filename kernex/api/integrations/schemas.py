"""Bodies of `/api/v1/integrations`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from kernex.broker.integrators import NAME_PATTERN, Integrator


class IntegrationCreate(BaseModel):
    """A new integrator."""

    name: Annotated[
        str,
        Field(
            pattern=NAME_PATTERN.pattern,
            description="1 to 40 lowercase letters, digits or dashes; the MQTT username is integrator-<name>",
        ),
    ]


class IntegrationOut(BaseModel):
    """An integrator (never its key)."""

    name: str
    identity: str = Field(description="Certificate CN and MQTT username")
    serial: str = Field(description="Serial (hex) of its current certificate")
    created_at: datetime
    revoked_at: datetime | None
    active: bool

    @classmethod
    def of(cls, integrator: Integrator) -> IntegrationOut:
        """The registry's record as the API shows it."""
        return cls(
            name=integrator.name,
            identity=integrator.identity,
            serial=integrator.serial,
            created_at=datetime.fromisoformat(integrator.created_at),
            revoked_at=datetime.fromisoformat(integrator.revoked_at) if integrator.revoked_at else None,
            active=integrator.active,
        )


class BrokerApplied(BaseModel):
    """Whether the running broker took the change at once."""

    broker_reloaded: bool = Field(description="False: reload the broker's ACL and CRL yourself")
    errors: list[str] = Field(default_factory=list)


class IntegrationCreated(IntegrationOut, BrokerApplied):
    """The new credential: the private key is in this answer only."""

    certificate_pem: str
    private_key_pem: str
    ca_certificate_pem: str = Field(description="The fleet CA, to verify the broker")
    subscribe: str = Field(description="The topic filter the credential may read")


class IntegrationRevoked(IntegrationOut, BrokerApplied):
    """The revoked integrator."""


class IntegrationPage(BaseModel):
    """Every integrator, revoked ones included, by name."""

    items: list[IntegrationOut]
