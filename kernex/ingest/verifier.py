"""Verification of one device message: topic, size, device, signature, schema, clock.

Pure and synchronous: no I/O, no clock of its own (the caller passes when the message was
received and a key lookup already filled from the database). That keeps every rule testable
without a broker and lets the CPU-bound signature checks move to a process pool later.

Every way a payload can be wrong ends as a `Rejection` with a `RejectReason`; no exception
escapes `Verifier.verify` for hostile input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from kernex.ingest.keys import DeviceKey
from kernex.protocol import jws
from kernex.protocol.exceptions import MessageError, SignatureError, TopicError
from kernex.protocol.messages import (
    ConnectionStatus,
    Event,
    Heartbeat,
    RejectReason,
    parse_event,
    parse_heartbeat,
    parse_status,
)
from kernex.protocol.topics import Channel, DeviceTopic, Topics
from kernex.storage.models import AdmissionState

UNKNOWN_CHANNEL = "unknown"  # metrics label for messages whose topic did not parse
# Event data is free-form JSON stored as JSONB: numbers must survive the trip through Python's
# json and Postgres, and consumers (the dashboard's JavaScript) read them as 64-bit values.
JSON_INT_LIMIT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as it came off the broker."""

    topic: str
    payload: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class VerifiedHeartbeat:
    """A heartbeat whose signature, topic, schema and timestamp checked out."""

    device_id: str
    claims: Heartbeat
    received_at: datetime


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """A device event whose signature, topic, schema and timestamp checked out."""

    device_id: str
    claims: Event
    received_at: datetime


@dataclass(frozen=True, slots=True)
class VerifiedStatus:
    """An online/offline status of a known, admitted device.

    `ts` orders it against the device's other statuses and heartbeats. For "online" it is the
    device's timestamp (the receive time if there is none). For "offline" it is the later of
    the two: the broker publishes the Last Will when the connection dies, but its payload (and
    ts) was fixed at connect time, before the "online" and every heartbeat of that connection;
    taken at face value, a Will could never win. The receive time is when the platform learnt
    the connection was gone. The cost: a queued "offline" replayed late (a worker catching up)
    counts as recent, and the device shows offline until its next live heartbeat.
    """

    device_id: str
    status: ConnectionStatus
    ts: datetime
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was refused; `device_id` is the topic's, when the topic parsed."""

    reason: RejectReason
    detail: str
    channel: str
    device_id: str | None


Verified: TypeAlias = VerifiedHeartbeat | VerifiedEvent | VerifiedStatus
Verdict: TypeAlias = Verified | Rejection
KeyLookup: TypeAlias = Callable[[str], DeviceKey | None]


@dataclass(frozen=True, slots=True)
class VerifyLimits:
    """The bounds a message must respect."""

    max_payload_bytes: int
    max_future_skew: timedelta
    max_age: timedelta


class _Refused(Exception):  # noqa: N818 - internal control flow, never leaves this module
    """Raised by a check to stop verification with a reason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Verifier:
    """Judges messages against the wire contract (DESIGN.md "Message format")."""

    def __init__(self, topics: Topics, limits: VerifyLimits) -> None:
        self._topics = topics
        self._limits = limits

    def device_id_of(self, topic: str) -> str | None:
        """The device a topic names, so the caller can fetch keys for a whole batch at once."""
        try:
            return self._topics.parse(topic).device_id
        except TopicError:
            return None

    def verify(self, message: RawMessage, key_for: KeyLookup) -> Verdict:
        """Check one message; key_for returns the registered key of a device id, or None.

        The checks run in a fixed order, so a message failing several is always counted under
        the same reason: topic, size, device known, device admitted, then (signed channels) kid,
        signature, schema, claims device id, and clock.
        """
        try:
            parsed = self._topics.parse(message.topic)
        except TopicError as exc:
            return Rejection(RejectReason.MALFORMED, str(exc), UNKNOWN_CHANNEL, None)
        try:
            key = self._check_envelope(message, parsed, key_for)
            if parsed.channel is Channel.STATUS:
                return self._verify_status(message, parsed)
            return self._verify_signed(message, parsed, key)
        except _Refused as refused:
            return Rejection(refused.reason, refused.detail, parsed.channel.value, parsed.device_id)

    def _check_envelope(self, message: RawMessage, parsed: DeviceTopic, key_for: KeyLookup) -> DeviceKey:
        if parsed.channel not in {Channel.HEARTBEAT, Channel.EVENTS, Channel.STATUS}:
            raise _Refused(RejectReason.MALFORMED, f"ingest does not take {parsed.channel.value} messages")
        size = len(message.payload)
        if size > self._limits.max_payload_bytes:
            raise _Refused(RejectReason.TOO_LARGE, f"{size} bytes > {self._limits.max_payload_bytes}")
        key = key_for(parsed.device_id)
        if key is None:
            raise _Refused(RejectReason.UNKNOWN_DEVICE, "no such device")
        if key.state is not AdmissionState.ACTIVE:
            # Revoked or rejected; pending devices have no certificate, so cannot get here.
            raise _Refused(RejectReason.REVOKED_DEVICE, f"device is {key.state.value}")
        return key

    def _verify_status(self, message: RawMessage, parsed: DeviceTopic) -> VerifiedStatus:
        try:
            status = parse_status(message.payload)
        except MessageError as exc:
            raise _Refused(RejectReason.MALFORMED, str(exc)) from None
        ts = _as_utc(status.ts) if status.ts is not None else message.received_at
        if status.status is ConnectionStatus.OFFLINE:
            ts = max(ts, message.received_at)
        # Only the future bound: a status is retained, so an old one is simply what the broker
        # last heard, and it only applies if newer than what the database already holds.
        if ts - message.received_at > self._limits.max_future_skew:
            raise _Refused(RejectReason.CLOCK_SKEW, f"status ts {ts.isoformat()} is in the future")
        return VerifiedStatus(parsed.device_id, status.status, ts, message.received_at)

    def _verify_signed(
        self, message: RawMessage, parsed: DeviceTopic, key: DeviceKey
    ) -> VerifiedHeartbeat | VerifiedEvent:
        device_id = parsed.device_id
        is_heartbeat = parsed.channel is Channel.HEARTBEAT
        payload = _verified_payload(message.payload, device_id, key, is_heartbeat)
        try:
            claims: Heartbeat | Event = parse_heartbeat(payload) if is_heartbeat else parse_event(payload)
        except MessageError as exc:
            raise _Refused(RejectReason.MALFORMED, str(exc)) from None
        if claims.device_id != device_id:
            raise _Refused(RejectReason.TOPIC_MISMATCH, "claims device_id is not the topic's device id")
        problem = _unstorable(claims)
        if problem is not None:
            raise _Refused(RejectReason.MALFORMED, problem)
        self._check_clock(_as_utc(claims.ts), message.received_at)
        if isinstance(claims, Heartbeat):
            return VerifiedHeartbeat(device_id, claims, message.received_at)
        return VerifiedEvent(device_id, claims, message.received_at)

    def _check_clock(self, ts: datetime, received_at: datetime) -> None:
        age = received_at - ts
        if age > self._limits.max_age:
            raise _Refused(RejectReason.CLOCK_SKEW, f"ts is {age} old")
        if -age > self._limits.max_future_skew:
            raise _Refused(RejectReason.CLOCK_SKEW, f"ts is {-age} in the future")


def _as_utc(ts: datetime) -> datetime:
    """The timestamp in UTC; a valid RFC 3339 time near year 1 or 9999 may not convert."""
    try:
        return ts.astimezone(UTC)
    except OverflowError:
        raise _Refused(RejectReason.MALFORMED, f"timestamp {ts.isoformat()} is out of range") from None


def _verified_payload(token: bytes, device_id: str, key: DeviceKey, is_heartbeat: bool) -> bytes:
    """The claims bytes of a JWS signed by the device's registered key, for this channel."""
    try:
        header = jws.unverified_header(token)
    except SignatureError as exc:
        raise _Refused(RejectReason.MALFORMED, f"not a JWS: {exc}") from None
    if header.get("kid") != device_id:
        raise _Refused(RejectReason.TOPIC_MISMATCH, "JWS kid is not the topic's device id")
    if key.public_key is None:
        raise _Refused(RejectReason.BAD_SIGNATURE, "the registered public key does not load")
    try:
        verified = jws.verify(token, key.public_key)
    except SignatureError as exc:
        raise _Refused(RejectReason.BAD_SIGNATURE, str(exc)) from None
    expected_typ = jws.TYP_HEARTBEAT if is_heartbeat else jws.TYP_EVENT
    if verified.header.get("typ") != expected_typ:
        # A validly signed message of another kind, replayed onto this channel.
        raise _Refused(RejectReason.MALFORMED, f"JWS typ is not {expected_typ}")
    return verified.payload


def _unstorable(claims: Heartbeat | Event) -> str | None:
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
