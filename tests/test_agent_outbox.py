"""The bounded outbox: FIFO, drops the oldest when full, failed publishes go back to the front."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from kernex.agent.outbox import Outbox, OutgoingMessage


def _message(seq: int) -> OutgoingMessage:
    return OutgoingMessage(topic="t", payload=str(seq).encode(), seq=seq)


async def _drain(outbox: Outbox) -> list[int | None]:
    return [(await outbox.get()).seq for _ in range(len(outbox))]


async def test_full_outbox_drops_the_oldest_and_counts():
    outbox = Outbox(capacity=3)

    with capture_logs() as logs:
        for seq in range(1, 6):
            outbox.put(_message(seq))

    assert len(outbox) == 3
    assert outbox.dropped == 2
    assert await _drain(outbox) == [3, 4, 5]
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [(w["seq"], w["dropped_total"]) for w in warnings] == [(1, 1), (2, 2)]


async def test_failed_publish_goes_back_to_the_front():
    outbox = Outbox(capacity=3)
    for seq in (1, 2):
        outbox.put(_message(seq))

    in_flight = await outbox.get()
    outbox.put(_message(3))
    outbox.put_back(in_flight)

    assert outbox.dropped == 0
    assert await _drain(outbox) == [1, 2, 3]


async def test_put_back_into_a_full_outbox_drops_the_returned_oldest():
    outbox = Outbox(capacity=2)
    outbox.put(_message(1))
    in_flight = await outbox.get()
    outbox.put(_message(2))
    outbox.put(_message(3))

    outbox.put_back(in_flight)

    assert outbox.dropped == 1
    assert await _drain(outbox) == [2, 3]


async def test_get_waits_for_a_message():
    outbox = Outbox(capacity=2)
    waiter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()

    outbox.put(_message(7))

    assert (await asyncio.wait_for(waiter, timeout=1)).seq == 7
    assert len(outbox) == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least one"):
        Outbox(capacity=0)
