"""Verification of one device message: topic, size, device, signature, schema, clock.

Pure and synchronous: no I/O, no clock of its own (the caller passes when the message was
received and a key lookup already filled from the database). That keeps every rule testable
without a broker and lets the CPU-bound signature checks move to a process pool later.

Every way a payload can be wrong ends as a `Rejection` with a `RejectReason`; no exception
escapes `Verifier.verify` for hostile input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeAlias

from kernex.ingest.keys import DeviceKey
from kernex.protocol.exceptions import MessageError, TopicError
from kernex.protocol.messages import ConnectionStatus, Heartbeat, RejectReason, parse_status
from kernex.protocol.topics import Channel, DeviceTopic, Topics
from kernex.protocol.verify import ClockLimits, MessageRejected, SignedKind, as_utc, verify_signed
from kernex.storage.models import AdmissionState
from kernex.storage.records import Verified, VerifiedEvent, VerifiedHeartbeat, VerifiedStatus

# The verified records live in kernex.storage.records (the API's HTTP fallback writes them too);
# they are re-exported here for the worker and its tests.
__all__ = [
    "KeyLookup",
    "RawMessage",
    "Rejection",
    "Verdict",
    "Verified",
    "VerifiedEvent",
    "VerifiedHeartbeat",
    "VerifiedStatus",
    "Verifier",
    "VerifyLimits",
]

UNKNOWN_CHANNEL = "unknown"  # metrics label for messages whose topic did not parse


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as it came off the broker."""

    topic: str
    payload: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was refused; `device_id` is the topic's, when the topic parsed."""

    reason: RejectReason
    detail: str
    channel: str
    device_id: str | None


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
        ts = self._as_utc(status.ts) if status.ts is not None else message.received_at
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
        kind = SignedKind.HEARTBEAT if parsed.channel is Channel.HEARTBEAT else SignedKind.EVENT
        clock = ClockLimits(max_future_skew=self._limits.max_future_skew, max_age=self._limits.max_age)
        try:
            claims = verify_signed(
                message.payload,
                kind=kind,
                device_id=device_id,
                public_key=key.public_key,
                received_at=message.received_at,
                clock=clock,
            )
        except MessageRejected as exc:
            raise _Refused(exc.reason, exc.detail) from None
        if isinstance(claims, Heartbeat):
            return VerifiedHeartbeat(device_id, claims, message.received_at)
        return VerifiedEvent(device_id, claims, message.received_at)

    @staticmethod
    def _as_utc(ts: datetime) -> datetime:
        try:
            return as_utc(ts)
        except MessageRejected as exc:
            raise _Refused(exc.reason, exc.detail) from None
