"""The wire contract: JWS vectors, algorithm pinning, device ids, topics, schemas, device tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from kernex.protocol import devicetoken, jws
from kernex.protocol.exceptions import InvalidCSRError, MessageError, SignatureError, TopicError
from kernex.protocol.keys import (
    KeyType,
    build_csr,
    device_id_for,
    generate_private_key,
    load_csr,
    load_public_key_pem,
)
from kernex.protocol.messages import format_ts, parse_heartbeat, parse_status, utc_now
from kernex.protocol.topics import Channel, CommandKind, Topics

# DESIGN.md's vectors live in the shared folder beside the repository (as CI lays it out).
VECTORS_PATH = Path(
    os.environ.get(
        "KERNEX_TEST_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors" / "jws.json"
    )
)
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["cases"] if VECTORS_PATH.exists() else []


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_shared_vectors_are_present() -> None:
    assert len(VECTORS) >= 12, f"expected the DESIGN.md vectors at {VECTORS_PATH}"


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_jws_vectors(case: dict[str, Any]) -> None:
    key = load_public_key_pem(case["public_key_pem"])
    if case["valid"]:
        verified = jws.verify(case["jws"], key)
        assert json.loads(verified.payload) == case["claims"]
        assert parse_heartbeat(verified.payload).seq == case["claims"]["seq"]
        # Parsed once for its header (as ingest does), then verified: the same result.
        assert jws.verify(jws.parse(case["jws"]), key) == verified
    else:
        with pytest.raises(SignatureError):
            jws.verify(case["jws"], key)
        with pytest.raises(SignatureError):
            jws.verify(jws.parse(case["jws"]), key)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_sign_then_verify_round_trip_and_es256_is_raw_r_s(key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    token = jws.sign_claims({"a": 1}, key, kid="k", typ=jws.TYP_HEARTBEAT)
    verified = jws.verify(token, key.public_key())
    assert json.loads(verified.payload) == {"a": 1}
    assert verified.header["kid"] == "k"
    if key_type is KeyType.ECDSA_P256:
        signature = base64.urlsafe_b64decode(token.split(".")[2] + "==")
        assert len(signature) == 64, "ES256 must be raw r||s (RFC 7518 3.4), not DER"


def test_algorithm_is_pinned_to_the_key() -> None:
    ec_key = generate_private_key(KeyType.ECDSA_P256)
    rsa_key = generate_private_key(KeyType.RSA_4096)
    token = jws.sign_claims({"a": 1}, ec_key, kid="k", typ="t")
    with pytest.raises(SignatureError):
        jws.verify(token, rsa_key.public_key())
    # Key confusion: an HS256 token "signed" with the public key PEM as the HMAC secret.
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "kid": "k"}).encode())
    payload = _b64(b'{"a":1}')
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(SignatureError):
        jws.verify(f"{header}.{payload}.{_b64(mac)}", rsa_key.public_key())
    unsigned = f"{_b64(json.dumps({'alg': 'none'}).encode())}.{payload}."
    with pytest.raises(SignatureError):
        jws.verify(unsigned, ec_key.public_key())
    with pytest.raises(SignatureError):
        jws.verify("garbage", ec_key.public_key())


def test_device_id_is_derived_from_the_key_and_csr_proves_possession() -> None:
    key = generate_private_key(KeyType.ED25519)
    device_id = device_id_for(key.public_key())
    assert device_id == device_id_for(key.public_key())
    assert len(device_id) == 32
    assert all(c in "0123456789abcdef" for c in device_id)
    _, public = load_csr(build_csr(key, "any name"))
    assert device_id_for(public) == device_id
    with pytest.raises(InvalidCSRError):
        load_csr("not a csr")


def test_topics_build_and_parse() -> None:
    topics = Topics("acme/v1")
    assert topics.heartbeat("d1") == "acme/v1/devices/d1/heartbeat"
    assert topics.command("d1", CommandKind.DEPLOY) == "acme/v1/devices/d1/commands/deploy"
    assert topics.shared(Channel.HEARTBEAT, "g") == "$share/g/acme/v1/devices/+/heartbeat"
    parsed = topics.parse("acme/v1/devices/d1/commands/config")
    assert (parsed.device_id, parsed.channel, parsed.command_kind) == (
        "d1",
        Channel.COMMANDS,
        CommandKind.CONFIG,
    )
    assert topics.parse("acme/v1/devices/d1/status").channel is Channel.STATUS
    for bad in (
        "other/v1/devices/d1/heartbeat",
        "acme/v1/devices/d1",
        "acme/v1/devices/d1/heartbeat/extra",
        "acme/v1/devices//heartbeat",
        "acme/v1/devices/d1/commands/reboot",
        "acme/v1/devices/d1/unknown",
    ):
        with pytest.raises(TopicError):
            topics.parse(bad)
    for bad_prefix in ("", "/x", "x/", "a/+/b", "$SYS"):
        with pytest.raises(TopicError):
            Topics(bad_prefix)
    with pytest.raises(TopicError):
        topics.heartbeat("d1/../d2")


def test_heartbeat_schema_bounds_and_ignores_unknown_fields() -> None:
    base = {"device_id": "d", "seq": 1, "ts": format_ts(utc_now()), "future_field": {"x": 1}}
    assert parse_heartbeat(json.dumps(base).encode()).seq == 1
    for broken in (
        {**base, "seq": 2**63},
        {**base, "seq": -1},
        {**base, "seq": "1"},
        {**base, "ts": "2026-11-28T12:00:00"},  # no time zone
        {**base, "metrics": {"cpu_percent": -1}},
        {k: v for k, v in base.items() if k != "device_id"},
    ):
        with pytest.raises(MessageError):
            parse_heartbeat(json.dumps(broken).encode())
    for raw in (b"\xff", b"[]", b"{", b"1e999999", ("[" * 10_000 + "]" * 10_000).encode()):
        with pytest.raises(MessageError):
            parse_heartbeat(raw)
    assert parse_status(b'{"status":"offline"}').status == "offline"
    with pytest.raises(MessageError):
        parse_status(b'{"status":"maybe"}')


def test_device_tokens() -> None:
    key = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(key.public_key())
    token = devicetoken.issue(key, device_id)
    assert devicetoken.verify(token, lambda _id: key.public_key()) == device_id

    other = generate_private_key(KeyType.ECDSA_P256)
    with pytest.raises(SignatureError):
        devicetoken.verify(token, lambda _id: other.public_key())
    now = int(time.time())
    too_long = jwt.encode(
        {"iss": device_id, "sub": device_id, "aud": "kernex-api", "iat": now, "exp": now + 3600},
        key,
        algorithm="ES256",
        headers={"kid": device_id, "typ": devicetoken.DEVICE_TOKEN_TYP},
    )
    with pytest.raises(SignatureError, match="5 minutes"):
        devicetoken.verify(too_long, lambda _id: key.public_key())
    expired = jwt.encode(
        {"iss": device_id, "sub": device_id, "aud": "kernex-api", "iat": now - 600, "exp": now - 300},
        key,
        algorithm="ES256",
        headers={"kid": device_id, "typ": devicetoken.DEVICE_TOKEN_TYP},
    )
    with pytest.raises(SignatureError):
        devicetoken.verify(expired, lambda _id: key.public_key())
    wrong_audience = jwt.encode(
        {"iss": device_id, "sub": device_id, "aud": "operators", "iat": now, "exp": now + 60},
        key,
        algorithm="ES256",
        headers={"kid": device_id, "typ": devicetoken.DEVICE_TOKEN_TYP},
    )
    with pytest.raises(SignatureError):
        devicetoken.verify(wrong_audience, lambda _id: key.public_key())
    operator_like = jwt.encode({"sub": "admin", "aud": "kernex-api"}, "s" * 32, algorithm="HS256")
    with pytest.raises(SignatureError):
        devicetoken.verify(operator_like, lambda _id: key.public_key())
