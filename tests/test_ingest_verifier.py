"""The verifier alone: every rejection reason, in its order, without a broker or database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from kernex.ingest.keys import DeviceKey
from kernex.ingest.verifier import (
    RawMessage,
    Rejection,
    VerifiedEvent,
    VerifiedHeartbeat,
    VerifiedStatus,
    Verifier,
    VerifyLimits,
)
from kernex.protocol import jws
from kernex.protocol.keys import KeyType, PrivateKey, device_id_for
from kernex.protocol.messages import ConnectionStatus, RejectReason, format_ts
from kernex.protocol.topics import Topics
from kernex.storage.models import AdmissionState
from tests.fixtures.ingest import heartbeat_claims, new_key, signed_event, signed_heartbeat

TOPICS = Topics("kernex/v1")
LIMITS = VerifyLimits(
    max_payload_bytes=65_536, max_future_skew=timedelta(seconds=300), max_age=timedelta(seconds=86_400)
)
NOW = datetime.now(UTC)


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    """Pin the receive time to this test's start: fixtures sign messages with the real clock, so
    a NOW taken at import would drift past the skew limit in a long suite."""
    global NOW  # noqa: PLW0603 - the module's tests share one receive time, refreshed per test
    NOW = datetime.now(UTC)


class Fleet:
    """Registered devices for the key lookup."""

    def __init__(self) -> None:
        self.keys: dict[str, DeviceKey] = {}

    def add(self, key: PrivateKey, state: AdmissionState = AdmissionState.ACTIVE) -> str:
        device_id = device_id_for(key.public_key())
        self.keys[device_id] = DeviceKey(device_id, state, key.public_key())
        return device_id


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


def verify(topic: str, payload: bytes, fleet: Fleet, received_at: datetime | None = None):
    return Verifier(TOPICS, LIMITS).verify(RawMessage(topic, payload, received_at or NOW), fleet.keys.get)


def reason_of(verdict: object) -> RejectReason:
    assert isinstance(verdict, Rejection), f"expected a rejection, got {verdict!r}"
    return verdict.reason


@pytest.mark.parametrize("key_type", list(KeyType))
def test_valid_heartbeat_of_each_key_type_is_accepted(fleet: Fleet, key_type: KeyType) -> None:
    key = new_key(key_type)
    device_id = fleet.add(key)
    verdict = verify(TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 7), fleet)
    assert isinstance(verdict, VerifiedHeartbeat)
    assert verdict.device_id == device_id
    assert verdict.claims.seq == 7
    assert verdict.claims.metrics.cpu_percent == 12.5


def test_valid_event_is_accepted(fleet: Fleet) -> None:
    key = new_key()
    device_id = fleet.add(key)
    verdict = verify(TOPICS.events(device_id), signed_event(key, device_id, 3, percent=40), fleet)
    assert isinstance(verdict, VerifiedEvent)
    assert verdict.claims.data == {"percent": 40}


def test_topic_outside_the_tree_is_malformed(fleet: Fleet) -> None:
    verdict = verify("elsewhere/devices/x/heartbeat", b"{}", fleet)
    assert reason_of(verdict) is RejectReason.MALFORMED
    assert isinstance(verdict, Rejection)
    assert verdict.channel == "unknown"


def test_oversized_payload_is_too_large_before_anything_else(fleet: Fleet) -> None:
    # Even from an unknown device: size is checked before the database is consulted.
    verdict = verify(TOPICS.heartbeat("nobody"), b"x" * (LIMITS.max_payload_bytes + 1), fleet)
    assert reason_of(verdict) is RejectReason.TOO_LARGE


def test_unknown_device(fleet: Fleet) -> None:
    key = new_key()
    device_id = device_id_for(key.public_key())
    assert reason_of(verify(TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 1), fleet)) is (
        RejectReason.UNKNOWN_DEVICE
    )


@pytest.mark.parametrize("state", [AdmissionState.REVOKED, AdmissionState.REJECTED, AdmissionState.PENDING])
def test_device_not_admitted(fleet: Fleet, state: AdmissionState) -> None:
    key = new_key()
    device_id = fleet.add(key, state)
    verdict = verify(TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 1), fleet)
    assert reason_of(verdict) is RejectReason.REVOKED_DEVICE
    status = verify(TOPICS.status(device_id), b'{"status":"online"}', fleet)
    assert reason_of(status) is RejectReason.REVOKED_DEVICE


def test_kid_naming_another_device_is_topic_mismatch(fleet: Fleet) -> None:
    key, other = new_key(), new_key()
    device_id, other_id = fleet.add(key), fleet.add(other)
    # Another device's genuine heartbeat, republished on this device's topic.
    verdict = verify(TOPICS.heartbeat(device_id), signed_heartbeat(other, other_id, 1), fleet)
    assert reason_of(verdict) is RejectReason.TOPIC_MISMATCH


def test_claims_device_id_naming_another_device_is_topic_mismatch(fleet: Fleet) -> None:
    key, other = new_key(), new_key()
    device_id, other_id = fleet.add(key), fleet.add(other)
    # Signed by this device with the right kid, but the claims speak for another device.
    payload = signed_heartbeat(key, other_id, 1, kid=device_id)
    assert reason_of(verify(TOPICS.heartbeat(device_id), payload, fleet)) is RejectReason.TOPIC_MISMATCH


def test_forged_signature_is_bad_signature(fleet: Fleet) -> None:
    key, forger = new_key(), new_key()
    device_id = fleet.add(key)
    payload = signed_heartbeat(forger, device_id, 1)  # right kid and claims, wrong key
    assert reason_of(verify(TOPICS.heartbeat(device_id), payload, fleet)) is RejectReason.BAD_SIGNATURE


def test_tampered_claims_are_bad_signature(fleet: Fleet) -> None:
    key = new_key()
    device_id = fleet.add(key)
    header, _claims, signature = signed_heartbeat(key, device_id, 1).split(b".")
    other_claims = signed_heartbeat(key, device_id, 2).split(b".")[1]
    payload = b".".join([header, other_claims, signature])
    assert reason_of(verify(TOPICS.heartbeat(device_id), payload, fleet)) is RejectReason.BAD_SIGNATURE


def test_algorithm_other_than_the_keys_is_bad_signature(fleet: Fleet) -> None:
    ec_key = new_key(KeyType.ECDSA_P256)
    device_id = fleet.add(ec_key)
    ed_key = new_key(KeyType.ED25519)
    # Registered key is ECDSA; an EdDSA-signed message must not verify even with a valid signature.
    payload = signed_heartbeat(ed_key, device_id, 1)
    assert reason_of(verify(TOPICS.heartbeat(device_id), payload, fleet)) is RejectReason.BAD_SIGNATURE


def test_status_needs_no_signature_but_a_valid_schema(fleet: Fleet) -> None:
    device_id = fleet.add(new_key())
    ts = NOW - timedelta(minutes=5)
    verdict = verify(
        TOPICS.status(device_id), json.dumps({"status": "online", "ts": format_ts(ts)}).encode(), fleet
    )
    assert isinstance(verdict, VerifiedStatus)
    assert verdict.status is ConnectionStatus.ONLINE
    assert abs(verdict.ts - ts) < timedelta(milliseconds=1)
    will = verify(TOPICS.status(device_id), b'{"status":"offline"}', fleet)
    assert isinstance(will, VerifiedStatus)
    assert will.ts == NOW, "a status without ts (the Last Will) takes the receive time"
    assert (
        reason_of(verify(TOPICS.status(device_id), b'{"status":"sleeping"}', fleet)) is RejectReason.MALFORMED
    )
    future = json.dumps({"status": "online", "ts": format_ts(NOW + timedelta(hours=1))}).encode()
    assert reason_of(verify(TOPICS.status(device_id), future, fleet)) is RejectReason.CLOCK_SKEW


def _sign_raw(key: PrivateKey, device_id: str, claims_bytes: bytes) -> bytes:
    return jws.sign(claims_bytes, key, kid=device_id, typ=jws.TYP_HEARTBEAT).encode("ascii")


def _valid_claims(device_id: str) -> dict[str, object]:
    return heartbeat_claims(device_id, 1)


@pytest.mark.parametrize(
    "make_claims",
    [
        pytest.param(lambda d: b"not json at all", id="not-json"),
        pytest.param(lambda d: b'{"device_id": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(lambda d: b"[" * 20_000 + b"]" * 20_000, id="deeply-nested"),
        pytest.param(
            lambda d: json.dumps({**_valid_claims(d), "seq": 10**30}).encode(), id="seq-beyond-bigint"
        ),
        pytest.param(
            lambda d: json.dumps(_valid_claims(d)).replace('"seq": 1', '"seq": ' + "9" * 5000).encode(),
            id="huge-integer-literal",
        ),
        pytest.param(
            lambda d: (
                json.dumps(_valid_claims(d)).replace('"cpu_percent": 12.5', '"cpu_percent": 1e999').encode()
            ),
            id="huge-float",
        ),
        pytest.param(lambda d: json.dumps({**_valid_claims(d), "seq": -1}).encode(), id="negative-seq"),
        pytest.param(lambda d: json.dumps({**_valid_claims(d), "ts": "yesterday"}).encode(), id="bad-ts"),
        pytest.param(
            lambda d: json.dumps({**_valid_claims(d), "status": "ok\u0000"}).encode(), id="nul-in-text"
        ),
        pytest.param(
            lambda d: json.dumps({**_valid_claims(d), "ts": "0001-01-01T00:00:00+05:00"}).encode(),
            id="ts-not-convertible-to-utc",
        ),
    ],
)
def test_hostile_claims_are_malformed_never_an_exception(fleet: Fleet, make_claims) -> None:
    key = new_key()
    device_id = fleet.add(key)
    payload = _sign_raw(key, device_id, make_claims(device_id))
    assert reason_of(verify(TOPICS.heartbeat(device_id), payload, fleet)) is RejectReason.MALFORMED


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe\xfd", b"a.b.c", b"{}", b"[" * 30_000 + b"]" * 30_000, b"eyJ.eyJ.x"],
    ids=["empty", "invalid-utf8", "garbage-segments", "json", "nested", "truncated-b64"],
)
def test_payload_that_is_not_a_jws_is_malformed(fleet: Fleet, payload: bytes) -> None:
    device_id = fleet.add(new_key())
    assert reason_of(verify(TOPICS.heartbeat(device_id), payload, fleet)) is RejectReason.MALFORMED


def test_event_data_that_cannot_be_stored_is_malformed(fleet: Fleet) -> None:
    key = new_key()
    device_id = fleet.add(key)
    base = {"device_id": device_id, "seq": 1, "ts": format_ts(NOW), "type": "x"}
    for data in ('{"a": 1e999}', '{"a": "\\u0000"}', '{"a": [' + "9" * 100 + "]}"):
        claims = json.dumps(base)[:-1] + ', "data": ' + data + "}"
        payload = jws.sign(claims.encode(), key, kid=device_id, typ=jws.TYP_EVENT).encode()
        assert reason_of(verify(TOPICS.events(device_id), payload, fleet)) is RejectReason.MALFORMED, data


def test_message_signed_for_another_channel_is_malformed(fleet: Fleet) -> None:
    key = new_key()
    device_id = fleet.add(key)
    # A genuine heartbeat JWS replayed onto the events topic.
    payload = signed_heartbeat(key, device_id, 1)
    assert reason_of(verify(TOPICS.events(device_id), payload, fleet)) is RejectReason.MALFORMED


def test_clock_skew_bounds(fleet: Fleet) -> None:
    key = new_key()
    device_id = fleet.add(key)
    topic = TOPICS.heartbeat(device_id)
    hour_ahead = signed_heartbeat(key, device_id, 1, ts=NOW + timedelta(hours=1))
    assert reason_of(verify(topic, hour_ahead, fleet)) is RejectReason.CLOCK_SKEW
    two_days_old = signed_heartbeat(key, device_id, 2, ts=NOW - timedelta(days=2))
    assert reason_of(verify(topic, two_days_old, fleet)) is RejectReason.CLOCK_SKEW
    # Small drift ahead, and heartbeats buffered through a few hours offline, are accepted.
    slightly_ahead = signed_heartbeat(key, device_id, 3, ts=NOW + timedelta(seconds=60))
    assert isinstance(verify(topic, slightly_ahead, fleet), VerifiedHeartbeat)
    buffered = signed_heartbeat(key, device_id, 4, ts=NOW - timedelta(hours=5))
    assert isinstance(verify(topic, buffered, fleet), VerifiedHeartbeat)


def test_unloadable_registered_key_is_bad_signature(fleet: Fleet) -> None:
    key = new_key()
    device_id = device_id_for(key.public_key())
    fleet.keys[device_id] = DeviceKey(device_id, AdmissionState.ACTIVE, None)
    assert reason_of(verify(TOPICS.heartbeat(device_id), signed_heartbeat(key, device_id, 1), fleet)) is (
        RejectReason.BAD_SIGNATURE
    )


def test_command_topic_is_not_ingested(fleet: Fleet) -> None:
    device_id = fleet.add(new_key())
    assert reason_of(verify(f"{TOPICS.prefix}/devices/{device_id}/commands/deploy", b"{}", fleet)) is (
        RejectReason.MALFORMED
    )


def test_offline_status_counts_from_when_it_was_received(fleet: Fleet) -> None:
    device_id = fleet.add(new_key())
    # The agent's Last Will carries the time it connected, older than everything since.
    connected_at = NOW - timedelta(hours=2)
    will = json.dumps({"status": "offline", "ts": format_ts(connected_at)}).encode()
    verdict = verify(TOPICS.status(device_id), will, fleet)
    assert isinstance(verdict, VerifiedStatus)
    assert verdict.ts == NOW
    online = json.dumps({"status": "online", "ts": format_ts(connected_at)}).encode()
    verdict = verify(TOPICS.status(device_id), online, fleet)
    assert isinstance(verdict, VerifiedStatus)
    assert abs(verdict.ts - connected_at) < timedelta(milliseconds=1)
