"""Signed commands: only pinned keys, only this device, only while fresh, one body per kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from kernex.protocol import jws
from kernex.protocol.commands import Command, ConfigBody, DeployBody, sign_command, verify_command
from kernex.protocol.exceptions import SignatureError
from kernex.protocol.keys import KeyType, generate_private_key
from kernex.protocol.topics import CommandKind

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def deploy_command(**overrides: object) -> Command:
    fields: dict[str, object] = {
        "command_id": "c1",
        "device_id": "dev-a",
        "kind": CommandKind.DEPLOY,
        "revision": 3,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(days=1),
        "deploy": DeployBody(
            deployment_id="d1",
            bundle_id="b1",
            name="app",
            version="1.0.0",
            sha256="a" * 64,
            size=10,
            download_path="/api/v1/bundles/b1/download",
        ),
    }
    fields.update(overrides)
    return Command.model_validate(fields)


def test_round_trip_and_refusals() -> None:
    key = generate_private_key(KeyType.ECDSA_P256)
    token = sign_command(deploy_command(), key, "cp-1")
    pinned = {"cp-1": key.public_key()}
    assert verify_command(token, pinned, device_id="dev-a", now=NOW).revision == 3
    with pytest.raises(SignatureError, match="does not trust"):
        verify_command(token, {"cp-2": key.public_key()}, device_id="dev-a", now=NOW)
    with pytest.raises(SignatureError, match="addressed"):
        verify_command(token, pinned, device_id="dev-b", now=NOW)
    with pytest.raises(SignatureError, match="expired"):
        verify_command(token, pinned, device_id="dev-a", now=NOW + timedelta(days=2))
    forger = generate_private_key(KeyType.ECDSA_P256)
    with pytest.raises(SignatureError):
        verify_command(sign_command(deploy_command(), forger, "cp-1"), pinned, device_id="dev-a", now=NOW)
    heartbeat_typed = jws.sign_claims({"a": 1}, key, kid="cp-1", typ=jws.TYP_HEARTBEAT)
    with pytest.raises(SignatureError, match="not a command"):
        verify_command(heartbeat_typed, pinned, device_id="dev-a", now=NOW)


def test_body_must_match_kind() -> None:
    with pytest.raises(ValidationError):
        deploy_command(kind=CommandKind.CONFIG)
    with pytest.raises(ValidationError):
        deploy_command(config=ConfigBody(version=1, values={}))
    with pytest.raises(ValidationError):
        deploy_command(expires_at=NOW)
    with pytest.raises(ValidationError):
        deploy_command(
            deploy={
                "deployment_id": "d",
                "bundle_id": "b",
                "name": "n",
                "version": "1",
                "sha256": "a" * 64,
                "size": 1,
                "download_path": "https://evil/x",
            }
        )
