"""Protocol versions: an old agent (no `v`, unknown fields) works with a new server; a message from a
newer protocol, or a server that no longer accepts this agent, is refused with a clear message.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from kernex.agent.exceptions import IncompatibleServerError
from kernex.agent.identity import load_or_create
from kernex.agent.registration import Registrar
from kernex.protocol import jws
from kernex.protocol.keys import KeyType, device_id_for, generate_private_key
from kernex.protocol.messages import RegistrationResponse, RejectReason, format_ts
from kernex.protocol.verify import ClockLimits, MessageRejected, SignedKind, verify_signed
from kernex.protocol.version import PROTOCOL_VERSION, IncompatibleVersionError, check_server

KEY = generate_private_key(KeyType.ED25519)
DEVICE = device_id_for(KEY.public_key())
CLOCK = ClockLimits(max_future_skew=timedelta(minutes=5), max_age=timedelta(days=1))


def _heartbeat(**claims: Any) -> bytes:
    body = {"device_id": DEVICE, "seq": 1, "ts": format_ts(datetime.now(UTC)), **claims}
    return jws.sign_claims(body, KEY, kid=DEVICE, typ=jws.TYP_HEARTBEAT).encode()


def _verify(token: bytes) -> Any:
    return verify_signed(
        token,
        kind=SignedKind.HEARTBEAT,
        device_id=DEVICE,
        public_key=KEY.public_key(),
        received_at=datetime.now(UTC),
        clock=CLOCK,
    )


def test_an_old_agent_without_a_version_and_a_newer_agents_extra_fields_are_accepted() -> None:
    old = _verify(_heartbeat(agent_version="0.0.9"))
    assert old.v == 1
    current = _verify(_heartbeat(v=PROTOCOL_VERSION, battery={"percent": 80}, new_thing=[1, 2]))
    assert current.v == PROTOCOL_VERSION
    assert current.seq == 1


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 100])
def test_a_message_of_an_unsupported_protocol_version_is_rejected_with_its_reason(version: int) -> None:
    with pytest.raises(MessageRejected) as rejected:
        _verify(_heartbeat(v=version))
    assert rejected.value.reason is RejectReason.UNSUPPORTED_VERSION
    assert rejected.value.detail == (
        f"message protocol version {version} is newer than this server's {PROTOCOL_VERSION}: "
        "upgrade the server before its agents"
    )


def test_a_registration_answer_from_before_versioning_is_version_1_and_compatible() -> None:
    legacy = {
        "device_id": DEVICE,
        "status": "active",
        "certificate": "pem",
        "ca_certificate": "pem",
        "mqtt": {"host": "h", "port": 8883, "topic_prefix": "kernex/v1"},
        "command_keys": [],
        "something_new": True,
    }
    response = RegistrationResponse.model_validate_json(json.dumps(legacy))
    assert (response.protocol_version, response.min_protocol_version) == (1, 1)
    check_server(response.protocol_version, response.min_protocol_version)
    with pytest.raises(IncompatibleVersionError, match="upgrade the agent"):
        check_server(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1)


async def test_an_agent_refuses_a_server_that_no_longer_accepts_its_protocol(tmp_path: Any) -> None:
    identity = load_or_create(tmp_path, KeyType.ED25519)

    def newer_server(request: httpx.Request) -> httpx.Response:
        # Fault injection: a future server that requires a newer agent protocol.
        return httpx.Response(
            201,
            json={
                "device_id": identity.device_id,
                "status": "active",
                "certificate": "pem",
                "ca_certificate": "pem",
                "mqtt": {"host": "h", "port": 8883, "topic_prefix": "kernex/v1"},
                "command_keys": [],
                "protocol_version": PROTOCOL_VERSION + 1,
                "min_protocol_version": PROTOCOL_VERSION + 1,
            },
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(newer_server)) as http:
        registrar = Registrar(http, "http://kernex.test")
        with pytest.raises(IncompatibleServerError) as refused:
            await registrar.register(identity)
    assert registrar.attempts == 1, "not retried: one side must be upgraded first"
    assert str(refused.value) == (
        f"registration refused by this agent: the server requires agent protocol {PROTOCOL_VERSION + 1} or "
        f"newer, and this agent speaks protocol {PROTOCOL_VERSION}: upgrade the agent (pip install -U kernex)"
    )
