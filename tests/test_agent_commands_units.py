"""The pieces of command handling that need no broker: the gate's refusal reasons, config
resolution, the outbox's ordering across senders, the doorbell, report truncation.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from kernex.agent.commands import Refusal, classify
from kernex.agent.config import Resolved
from kernex.agent.deploy import OUTPUT_MAX_CHARS, TRUNCATED_MARK, tail
from kernex.agent.outbox import Outbox, OutgoingMessage
from kernex.agent.wakeup import Wakeup
from kernex.protocol import jws
from kernex.protocol.commands import Command, sign_command
from kernex.protocol.keys import KeyType, generate_private_key
from kernex.protocol.topics import CommandKind

KEY = generate_private_key(KeyType.ECDSA_P256)
PINNED = {"cp-1": KEY.public_key()}


def _config_token(device_id: str = "dev-1", key=KEY, kid: str = "cp-1") -> bytes:
    now = datetime.now(UTC)
    command = Command(
        command_id="c1",
        device_id=device_id,
        kind=CommandKind.CONFIG,
        revision=1,
        issued_at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
        config={"version": 1, "values": {}},
    )
    return sign_command(command, key, kid).encode()


def test_refusal_reasons_name_what_failed():
    other = generate_private_key(KeyType.ECDSA_P256)
    assert classify(b"garbage", PINNED, "dev-1") is Refusal.MALFORMED
    assert classify(_config_token(kid="cp-unknown"), PINNED, "dev-1") is Refusal.FORGED
    assert classify(_config_token(key=other), PINNED, "dev-1") is Refusal.FORGED
    heartbeat_typ = jws.sign_claims({"device_id": "dev-1"}, KEY, kid="cp-1", typ=jws.TYP_HEARTBEAT)
    assert classify(heartbeat_typ.encode(), PINNED, "dev-1") is Refusal.FORGED
    assert classify(_config_token(device_id="dev-2"), PINNED, "dev-1") is Refusal.NOT_ADDRESSED
    assert classify(_config_token(), PINNED, "dev-1") is Refusal.EXPIRED


def test_config_applies_whole_or_not_at_all_and_keeps_unknown_keys():
    good = Resolved({"heartbeat_interval_s": 5, "log_level": "DEBUG", "newer_key": [1, 2]})
    assert good.error is None
    assert good.settings is not None
    assert good.settings.heartbeat_interval_s == 5
    assert good.persisted["newer_key"] == [1, 2]
    assert good.persisted["install_timeout_s"] == 600, "a missing key is the documented default"

    bad = Resolved({"heartbeat_interval_s": 0, "log_level": "LOUD", "extra": {"bad key": 1}})
    assert bad.settings is None
    assert bad.error is not None
    assert bad.error.startswith("configuration not applied (the previous one stays): ")
    for key in ("heartbeat_interval_s", "log_level", "extra"):
        assert key in bad.error


def _message(seq: int, delivered: list[int] | None = None) -> OutgoingMessage:
    callback = (lambda: delivered.append(seq)) if delivered is not None else None
    return OutgoingMessage(topic="t", payload=b"x", seq=seq, on_delivered=callback)


async def test_put_back_returns_a_message_to_its_place_by_seq():
    outbox = Outbox(capacity=10)
    for seq in (1, 2, 3, 4):
        outbox.put(_message(seq))
    taken = outbox.take_first(lambda m: m.seq == 3)
    assert taken is not None
    assert outbox.take_first(lambda m: m.seq == 99) is None

    outbox.put_back(taken)

    assert [(await outbox.get()).seq for _ in range(4)] == [1, 2, 3, 4]


async def test_put_back_into_a_full_outbox_drops_the_oldest():
    outbox = Outbox(capacity=2)
    outbox.put(_message(1))
    outbox.put(_message(3))
    middle = _message(2)

    outbox.put_back(middle)

    assert outbox.dropped == 1
    assert [(await outbox.get()).seq for _ in range(2)] == [2, 3]


def test_a_failing_delivery_callback_is_logged_not_raised():
    def broken() -> None:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        OutgoingMessage(topic="t", payload=b"", seq=7, on_delivered=broken).delivered()

    assert [(entry["event"], entry["seq"]) for entry in logs] == [("delivery callback failed", 7)]


async def test_wakeup_remembers_a_ring_and_times_out_without_one():
    wakeup = Wakeup()
    started = time.monotonic()
    assert await wakeup.wait(0.05) is False
    assert time.monotonic() - started >= 0.04

    wakeup.ring()
    assert await wakeup.wait(10) is True, "a ring before the wait is not lost"

    waiter = asyncio.create_task(wakeup.wait(None))
    await asyncio.sleep(0.01)
    wakeup.ring()
    assert await asyncio.wait_for(waiter, 1) is True


async def test_a_cancelled_wait_stays_cancelled():
    wakeup = Wakeup()
    waiter = asyncio.create_task(wakeup.wait(None))
    await asyncio.sleep(0.01)
    # Rung and cancelled in the same loop iteration: the cancellation must win (3.11 wait_for's bug).
    wakeup.ring()
    waiter.cancel()
    await asyncio.wait({waiter})
    assert waiter.cancelled()


def test_output_keeps_its_end_within_the_bound():
    assert tail(None, 10) is None
    assert tail("", 10) is None
    assert tail("short", 10) == "short"
    long = "".join(f"line {n}\n" for n in range(10_000))
    cut = tail(long, OUTPUT_MAX_CHARS)
    assert cut is not None
    assert len(cut) == OUTPUT_MAX_CHARS
    assert cut.startswith(TRUNCATED_MARK)
    assert cut.endswith("line 9999\n")
