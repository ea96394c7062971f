"""Verification of one signed device message (heartbeat or event), whichever way it arrived.

Ingest checks messages that came over MQTT; the API checks heartbeats that came over its HTTP
fallback. Both must judge them by the same rules, so the rules live here: the JWS `kid` names the
device, the signature verifies with its registered key, the `typ` matches the channel, the claims
match the schema and name the same device, nothing in them is unstorable, and the timestamp is
within the allowed skew. Pure and synchronous: no I/O, no clock of its own.

Every failure raises `MessageRejected` carrying the `RejectReason` it is counted under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from kernex.protocol import jws
from kernex.protocol.exceptions import MessageError, ProtocolError, SignatureError
from kernex.protocol.keys import PublicKey
from kernex.protocol.messages import Event, Heartbeat, RejectReason, parse_event, parse_heartbeat
from kernex.protocol.version import unsupported_message_version

# Event data is free-form JSON stored as JSONB: numbers must survive the trip through Python's
# json and Postgres, and consumers (the dashboard's JavaScript) read them as 64-bit values.
JSON_INT_LIMIT = 2**63 - 1


class SignedKind(StrEnum):
    """The kinds of device-signed message."""

    HEARTBEAT = "heartbeat"
    EVENT = "event"


class MessageRejected(ProtocolError):  # noqa: N818 - named for what happened to the message
    """A device message failed a check; `reason` is what it is counted under."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ClockLimits:
    """How far a message's `ts` may be from when it was received."""

    max_future_skew: timedelta
    max_age: timedelta


def verify_signed(
    token: bytes,
    *,
    kind: SignedKind,
    device_id: str,
    public_key: PublicKey | None,
    received_at: datetime,
    clock: ClockLimits,
) -> Heartbeat | Event:
    """The verified claims of a message that must come from `device_id`; raises MessageRejected.

    `public_key` is the device's registered key, None when the stored key does not load (then
    nothing from the device can verify). The checks run in a fixed order, so a message failing
    several is always counted under the same reason: kid, signature, typ, schema, protocol
    version, claims device id, storability, clock.
    """
    payload = _verified_payload(token, device_id, public_key, kind)
    try:
        claims: Heartbeat | Event = (
            parse_heartbeat(payload) if kind is SignedKind.HEARTBEAT else parse_event(payload)
        )
    except MessageError as exc:
        raise MessageRejected(RejectReason.MALFORMED, str(exc)) from None
    unsupported = unsupported_message_version(claims.v)
    if unsupported is not None:
        raise MessageRejected(RejectReason.UNSUPPORTED_VERSION, unsupported)
    if claims.device_id != device_id:
        raise MessageRejected(RejectReason.TOPIC_MISMATCH, "claims device_id is not the topic's device id")
    problem = unstorable(claims)
    if problem is not None:
        raise MessageRejected(RejectReason.MALFORMED, problem)
    check_clock(as_utc(claims.ts), received_at, clock)
    return claims


def check_clock(ts: datetime, received_at: datetime, clock: ClockLimits) -> None:
    """Refuse (CLOCK_SKEW) a timestamp too old or too far in the future."""
    age = received_at - ts
    if age > clock.max_age:
        raise MessageRejected(RejectReason.CLOCK_SKEW, f"ts is {age} old")
    if -age > clock.max_future_skew:
        raise MessageRejected(RejectReason.CLOCK_SKEW, f"ts is {-age} in the future")


def as_utc(ts: datetime) -> datetime:
    """The timestamp in UTC; a valid RFC 3339 time near year 1 or 9999 may not convert."""
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        raise MessageRejected(RejectReason.MALFORMED, f"timestamp {ts.isoformat()} is out of range") from None


def _verified_payload(token: bytes, device_id: str, key: PublicKey | None, kind: SignedKind) -> bytes:
    """The claims bytes of a JWS signed by the device's registered key, for this channel."""
    try:
        parsed = jws.parse(token)
    except SignatureError as exc:
        raise MessageRejected(RejectReason.MALFORMED, f"not a JWS: {exc}") from None
    if parsed.header.get("kid") != device_id:
        raise MessageRejected(RejectReason.TOPIC_MISMATCH, "JWS kid is not the topic's device id")
    if key is None:
        raise MessageRejected(RejectReason.BAD_SIGNATURE, "the registered public key does not load")
    try:
        verified = jws.verify(parsed, key)
    except SignatureError as exc:
        raise MessageRejected(RejectReason.BAD_SIGNATURE, str(exc)) from None
    expected_typ = jws.TYP_HEARTBEAT if kind is SignedKind.HEARTBEAT else jws.TYP_EVENT
    if verified.header.get("typ") != expected_typ:
        # A validly signed message of another kind, replayed onto this channel.
        raise MessageRejected(RejectReason.MALFORMED, f"JWS typ is not {expected_typ}")
    return verified.payload


def unstorable(claims: Heartbeat | Event) -> str | None:
    """Why a schema-valid message still cannot be stored on every database, or None.

    The database refuses NUL characters in text and JSONB, lone surrogates cannot be encoded as
    UTF-8, and JSON has no Infinity: such a message would fail its whole batch on every retry
    (a poison batch) instead of being rejected alone.
    """
    if isinstance(claims, Heartbeat):
        texts = [claims.device_id, claims.status, claims.agent_version]
        if claims.bundle is not None:
            texts += [claims.bundle.id, claims.bundle.version]
        return next((p for p in map(_text_problem, texts) if p is not None), None)
    problem = _text_problem(claims.device_id) or _text_problem(claims.type)
    return problem or _json_problem(claims.data)


def _text_problem(value: str) -> str | None:
    if "\x00" in value:
        return "text contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "text is not valid Unicode"
    return None


def _json_problem(value: Any) -> str | None:
    # Depth is bounded: the JSON parser already refused deeper nesting than it supports.
    problem: str | None = None
    if isinstance(value, str):
        problem = _text_problem(value)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        problem = None if abs(value) <= JSON_INT_LIMIT else "integer out of 64-bit range"
    elif isinstance(value, float):
        problem = None if math.isfinite(value) else "number is not finite"
    elif isinstance(value, dict):
        problem = next((p for k, v in value.items() if (p := _text_problem(k) or _json_problem(v))), None)
    elif isinstance(value, list):
        problem = next((p for p in map(_json_problem, value) if p is not None), None)
    else:
        problem = f"unexpected JSON value of type {type(value).__name__}"
    return problem
