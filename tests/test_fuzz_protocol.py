"""Property-based fuzzing (hypothesis) of what devices send: the JWS parser, the heartbeat, event
and status parsers, and ingest's verifier end to end.

The property: hostile bytes never crash the code with anything but its documented error
(SignatureError, MessageError, MessageRejected), and the verifier never raises at all, it
returns a Rejection with a reason. A crash here would be a poison message in ingest.
"""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernex.ingest.keys import DeviceKey
from kernex.ingest.verifier import RawMessage, Rejection, Verifier, VerifyLimits
from kernex.protocol import jws
from kernex.protocol.exceptions import MessageError, SignatureError
from kernex.protocol.keys import KeyType, device_id_for, generate_private_key
from kernex.protocol.messages import (
    RejectReason,
    format_ts,
    parse_event,
    parse_heartbeat,
    parse_status,
    utc_now,
)
from kernex.protocol.topics import Topics
from kernex.protocol.verify import ClockLimits, MessageRejected, SignedKind, verify_signed
from kernex.storage.models import AdmissionState

FUZZ = settings(
    max_examples=300,
    deadline=None,  # signature checks on a loaded 2-core host
    suppress_health_check=[HealthCheck.too_slow],
)
KEY = generate_private_key(KeyType.ECDSA_P256)
DEVICE_ID = device_id_for(KEY.public_key())
OTHER = generate_private_key(KeyType.ED25519)
TOPICS = Topics()
CLOCK = ClockLimits(max_future_skew=timedelta(minutes=5), max_age=timedelta(days=1))
LIMITS = VerifyLimits(max_payload_bytes=65_536, max_future_skew=CLOCK.max_future_skew, max_age=CLOCK.max_age)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


# JSON values of every kind, including the ones that hurt: huge integers, non-finite floats,
# NUL characters and deep nesting.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 10, max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.sampled_from(
        [
            "",
            "\x00",
            "ok",
            DEVICE_ID,
            "2026-11-28T12:00:00Z",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00+14:00",
        ]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
heartbeat_keys = st.sampled_from(
    [
        "device_id",
        "seq",
        "ts",
        "status",
        "metrics",
        "bundle",
        "config_version",
        "agent_version",
        "v",
        "type",
        "data",
    ]
)


def heartbeat_like() -> st.SearchStrategy[dict[str, Any]]:
    """A real heartbeat's claims with some fields replaced or added by hostile values."""
    base: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "seq": 1,
        "ts": format_ts(utc_now()),
        "status": "ok",
        "metrics": {"cpu_percent": 1.0, "memory_mb": 2.0, "disk_free_mb": 3.0, "uptime_s": 4.0},
        "agent_version": "fuzz",
    }
    return st.dictionaries(heartbeat_keys | st.text(max_size=6), json_values, max_size=5).map(
        lambda changes: {**base, **changes}
    )


def dumps(value: Any) -> bytes:
    # allow_nan: emit NaN/Infinity as a sloppy device might; surrogates escaped so it encodes.
    return json.dumps(value, allow_nan=True).encode()


tokens = (
    st.binary(max_size=512)
    | st.text(max_size=256).map(str.encode)
    | st.tuples(st.binary(max_size=96), st.binary(max_size=96), st.binary(max_size=96)).map(
        lambda parts: b".".join(b64(p) for p in parts)
    )
    | st.tuples(json_values, st.binary(max_size=64)).map(
        lambda hp: b64(dumps(hp[0])) + b"." + b64(b"{}") + b"." + b64(hp[1])
    )
    | st.tuples(
        st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), json_values), heartbeat_like()
    ).map(lambda hc: b64(dumps(hc[0])) + b"." + b64(dumps(hc[1])) + b"." + b64(b"x" * 64))
)


@FUZZ
@given(tokens)
@example(b"")
@example(b"..")
@example(b"a.b.c.d")
@example(b64(b'{"alg":"none","kid":"x"}') + b"." + b64(b"{}") + b".")
def test_jws_parsing_raises_only_signature_error(token: bytes) -> None:
    for call in (lambda: jws.unverified_header(token), lambda: jws.verify(token, KEY.public_key())):
        with contextlib.suppress(SignatureError):
            call()


@FUZZ
@given(st.binary(max_size=1024) | json_values.map(dumps) | heartbeat_like().map(dumps))
@example(b"[" * 100_000)
@example(b'{"status":"online","ts":"' + b"9" * 10_000 + b'"}')
def test_message_parsers_raise_only_message_error(payload: bytes) -> None:
    for parse in (parse_heartbeat, parse_event, parse_status):
        with contextlib.suppress(MessageError):
            parse(payload)


def _verify(token: bytes, kind: SignedKind = SignedKind.HEARTBEAT) -> RejectReason | None:
    """The reason the message is refused, None if it verified; anything else raised fails."""
    try:
        verify_signed(
            token,
            kind=kind,
            device_id=DEVICE_ID,
            public_key=KEY.public_key(),
            received_at=utc_now(),
            clock=CLOCK,
        )
    except MessageRejected as exc:
        return exc.reason
    return None


@FUZZ
@given(tokens)
def test_verify_signed_rejects_garbage_only_with_a_reason(token: bytes) -> None:
    # Unsigned by the device's key: whatever it is, it cannot verify.
    assert isinstance(_verify(token), RejectReason)


@FUZZ
@given(heartbeat_like(), st.sampled_from([jws.TYP_HEARTBEAT, jws.TYP_EVENT, "jwt", ""]), st.booleans())
@example(
    claims={"device_id": DEVICE_ID, "seq": 10**30, "ts": "2026-11-28T12:00:00Z"},
    typ=jws.TYP_HEARTBEAT,
    genuine_key=True,
)
def test_validly_signed_hostile_claims_are_rejected_with_a_reason(
    claims: dict[str, Any], typ: str, genuine_key: bool
) -> None:
    # Signed for real, so the schema, storability and clock checks are what the fuzzing reaches.
    token = jws.sign(dumps(claims), KEY if genuine_key else OTHER, kid=DEVICE_ID, typ=typ).encode()
    verdicts = {_verify(token, SignedKind.HEARTBEAT), _verify(token, SignedKind.EVENT)}
    if not genuine_key:
        assert None not in verdicts, "a message signed by another key verified"


topics = st.sampled_from(
    [
        TOPICS.heartbeat(DEVICE_ID),
        TOPICS.events(DEVICE_ID),
        TOPICS.status(DEVICE_ID),
        TOPICS.heartbeat("other"),
    ]
) | st.text(max_size=80)


@FUZZ
@given(
    topics,
    tokens | st.binary(max_size=256) | heartbeat_like().map(dumps),
    st.sampled_from(list(AdmissionState)),
)
def test_the_ingest_verifier_never_raises(topic: str, payload: bytes, state: AdmissionState) -> None:
    verifier = Verifier(TOPICS, LIMITS)
    device_key = DeviceKey(DEVICE_ID, state, KEY.public_key())
    verdict = verifier.verify(
        RawMessage(topic, payload, utc_now()),
        lambda device_id: device_key if device_id == DEVICE_ID else None,
    )
    if isinstance(verdict, Rejection):
        assert isinstance(verdict.reason, RejectReason)
        assert verdict.detail
