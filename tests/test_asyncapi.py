"""docs/asyncapi.yaml: an AsyncAPI 3 document whose references resolve, whose operations and
channels fit together, and whose examples (and real Kernex messages) validate.

Real messages captured from a running ingest are validated in tests/test_fleet.py.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from kernex.protocol.commands import Command, ConfigBody, KeySet
from kernex.protocol.fleet import FleetChannel, rollout_topic
from kernex.protocol.messages import CommandKey
from kernex.protocol.topics import Channel, CommandKind, Topics
from tests.fixtures import asyncapi
from tests.fixtures.ingest import heartbeat_claims

ACTIONS = {"send", "receive"}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_document_is_asyncapi_3_and_every_reference_resolves() -> None:
    doc = asyncapi.load()
    assert doc["asyncapi"] == "3.0.0"
    assert {"title", "version"} <= doc["info"].keys()
    refs = list(_refs(doc))
    assert len(refs) > 50
    for ref in refs:
        asyncapi.resolve(ref)
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_operations_and_channels_fit_together() -> None:
    doc = asyncapi.load()
    for name, operation in doc["operations"].items():
        assert operation["action"] in ACTIONS, name
        channel_ref = operation["channel"]["$ref"]
        assert re.fullmatch(r"#/channels/[A-Za-z]+", channel_ref), name
        for message in operation["messages"]:
            assert message["$ref"].startswith(f"{channel_ref}/messages/"), name
    used = {op["channel"]["$ref"].rsplit("/", 1)[1] for op in doc["operations"].values()}
    assert used == doc["channels"].keys()
    for name, channel in doc["channels"].items():
        placeholders = set(re.findall(r"\{([^}]+)\}", channel["address"]))
        assert placeholders == set(channel.get("parameters", {})), name
        assert channel["messages"], name


def test_every_kernex_topic_is_documented() -> None:
    topics = Topics()
    device = "2f7c9b1ec0d44a8bb1e2f3a4c5d6e7f8"
    for channel in (Channel.HEARTBEAT, Channel.EVENTS, Channel.STATUS):
        asyncapi.channel_for(topics.device(device, channel))
    for kind in CommandKind:
        asyncapi.channel_for(topics.command(device, kind))
    asyncapi.channel_for(topics.command_keys())
    for fleet in FleetChannel:
        asyncapi.channel_for(topics.fleet("devices", device, fleet.value))
    asyncapi.channel_for(rollout_topic(topics, "5b0f2a41c3d84e2f9a6b7c8d9e0f1a2b"))
    with pytest.raises(AssertionError):
        asyncapi.channel_for(f"{topics.prefix}/devices/{device}/secrets")


def _examples() -> Iterator[tuple[str, dict[str, Any], Any]]:
    doc = asyncapi.load()
    for name, message in doc["components"]["messages"].items():
        for example in message.get("examples", []):
            yield f"message {name}/{example['name']}", message["payload"], example["payload"]
    for name, schema in doc["components"]["schemas"].items():
        for i, example in enumerate(schema.get("examples", [])):
            yield f"schema {name}[{i}]", schema, example


@pytest.mark.parametrize(
    ("where", "schema", "example"), list(_examples()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_example_validates(where: str, schema: dict[str, Any], example: Any) -> None:
    assert not asyncapi.errors(schema, example), where


def test_every_message_has_an_example_or_documented_claims() -> None:
    for name, message in asyncapi.load()["components"]["messages"].items():
        assert message.get("examples") or "x-kernex-claims" in message, name


def test_the_signed_heartbeat_example_decodes_to_valid_claims_header() -> None:
    example = asyncapi.load()["components"]["messages"]["SignedHeartbeat"]["examples"][0]["payload"]
    header_b64, payload_b64, _ = example.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    claims = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    assert header["alg"] == "ES256"
    assert header["kid"] == claims["device_id"]


def test_real_device_messages_validate_against_their_claims_schemas() -> None:
    schemas = asyncapi.load()["components"]["schemas"]
    device = "2f7c9b1ec0d44a8bb1e2f3a4c5d6e7f8"
    heartbeat = heartbeat_claims(device, 7)
    assert not asyncapi.errors(schemas["HeartbeatClaims"], heartbeat)
    assert asyncapi.errors(schemas["HeartbeatClaims"], {**heartbeat, "extra": 1})
    now = datetime.now(UTC)
    command = Command(
        command_id="c1",
        device_id=device,
        kind=CommandKind.CONFIG,
        revision=3,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        config=ConfigBody(version=2, values={"log_level": "DEBUG"}),
    )
    assert not asyncapi.errors(schemas["CommandClaims"], command.model_dump(mode="json"))
    key_set = KeySet(
        version=2,
        issued_at=now,
        keys=[CommandKey(kid="cp-1", alg="ES256", public_key_pem="-----BEGIN PUBLIC KEY-----\n")],
    )
    assert not asyncapi.errors(schemas["KeySetClaims"], key_set.model_dump(mode="json"))
    assert asyncapi.errors(schemas["KeySetClaims"], {**key_set.model_dump(mode="json"), "keys": []})
    status_topic = Topics().status(device)
    assert not asyncapi.message_errors(status_topic, {"status": "online", "ts": "2026-11-28T12:00:00Z"})
    assert asyncapi.message_errors(status_topic, {"status": "sleeping"})
