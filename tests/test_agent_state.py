"""Persisted agent state and the block-reserved sequence counter."""

from __future__ import annotations

import json
import stat

import pytest

from kernex.agent.exceptions import StateError
from kernex.agent.sequence import FIRST_SEQ, SEQ_BLOCK, Sequence
from kernex.agent.state import AgentState, StateStore
from kernex.protocol.messages import MqttEndpoint, RegistrationResponse


async def _restart(state_dir, *, block=SEQ_BLOCK) -> tuple[StateStore, Sequence]:
    """What an agent does at start: load the state from disk, build its counter."""
    store = StateStore(state_dir)
    await store.load()
    return store, Sequence(store, block=block)


async def test_fresh_device_starts_at_first_seq_and_reserves_a_block(tmp_path):
    _, sequence = await _restart(tmp_path)

    assert [await sequence.next() for _ in range(3)] == [FIRST_SEQ, FIRST_SEQ + 1, FIRST_SEQ + 2]
    assert sequence.last == FIRST_SEQ + 2
    on_disk = AgentState.model_validate_json((tmp_path / "state.json").read_bytes())
    assert on_disk.seq_reserved == FIRST_SEQ + SEQ_BLOCK
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


async def test_seq_strictly_increases_across_restarts(tmp_path):
    seen: list[int] = []
    # Runs that use less than a block, exactly a block, and several blocks.
    for used in (2, 3, 0, 7, 1):
        _, sequence = await _restart(tmp_path, block=3)
        seen.extend([await sequence.next() for _ in range(used)])

    assert seen == sorted(set(seen)), "no repeats, always increasing"
    # A restart jumps to the persisted reservation: the unused rest of a block is skipped.
    assert seen[:2] == [1, 2]
    assert seen[2] == 4  # reserved 4 after the first run: 3 was never used but is skipped
    assert seen[5:] == [7, 8, 9, 10, 11, 12, 13, 16]


async def test_crossing_a_block_persists_the_next_reservation_first(tmp_path):
    store, sequence = await _restart(tmp_path, block=3)
    values = [await sequence.next() for _ in range(7)]

    assert values == [1, 2, 3, 4, 5, 6, 7]
    assert store.state.seq_reserved == 10
    _, after_crash = await _restart(tmp_path, block=3)
    assert await after_crash.next() == 10


async def test_corrupt_state_is_an_error_not_a_reset(tmp_path):
    (tmp_path / "state.json").write_text("{not json")

    with pytest.raises(StateError, match="corrupt"):
        await StateStore(tmp_path).load()


def _registration(device_id="d1") -> RegistrationResponse:
    return RegistrationResponse(
        device_id=device_id,
        status="active",
        certificate="-----BEGIN CERTIFICATE-----\ncert\n-----END CERTIFICATE-----\n",
        ca_certificate="-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n",
        mqtt=MqttEndpoint(host="127.0.0.1", port=8883, topic_prefix="kernex/v1"),
        command_keys=[],
    )


async def test_registration_is_persisted_with_its_certificate_files(tmp_path):
    store = StateStore(tmp_path)
    await store.load()
    registration = _registration()

    await store.save_registration(registration)

    assert store.cert_path.read_text() == registration.certificate
    assert store.ca_path.read_text() == registration.ca_certificate
    for path in (store.cert_path, store.ca_path, store.path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(store.path.read_text())["registration"]["device_id"] == "d1"

    # A lost certificate file is restored from the state on the next start.
    store.cert_path.unlink()
    reloaded = StateStore(tmp_path)
    state = await reloaded.load()
    assert state.registration == registration
    assert reloaded.cert_path.read_text() == registration.certificate


async def test_invalid_change_is_refused_and_not_written(tmp_path):
    store = StateStore(tmp_path)
    await store.load()
    await store.update(config_version=3)

    with pytest.raises(StateError):
        await store.update(config_version=-1)

    assert store.state.config_version == 3
    assert (await StateStore(tmp_path).load()).config_version == 3
