"""Rotating the control-plane keys that sign commands (issue #6).

The ring (kernex.broker.command_keys) on a real PKI directory; the signed key set checked as
devices check it; and, end to end, the in-process API on a real Mosquitto rotating its key while
a real agent runs: the agent takes up the key set from the retained topic, obeys commands the new
key signs, refuses a set signed by an unknown key and a replayed older one, and keeps what it
took up across a restart.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from kernex.agent.agent import Agent
from kernex.agent.commands import KeySetRefusal
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.api.auth.schemas import Role
from kernex.broker.command_keys import CommandKeyRing
from kernex.broker.exceptions import PKIError
from kernex.broker.pki import API_IDENTITY, FleetPKI
from kernex.cli.main import app as cli
from kernex.kit.backoff import Backoff
from kernex.protocol import jws
from kernex.protocol.commands import KeySet, sign_key_set, verify_key_set
from kernex.protocol.exceptions import MessageError, SignatureError, StaleKeySetError
from kernex.protocol.keys import KeyType, generate_private_key, load_public_key_pem, public_key_to_pem
from kernex.protocol.messages import CommandKey, MqttEndpoint, RegistrationResponse
from kernex.storage.migrate import upgrade
from kernex.storage.models import AuditEntry
from tests.fixtures.broker import (
    TEST_PKI_PASSPHRASE,
    DeviceIdentity,
    RunningBroker,
    free_port,
    next_message,
    publish,
    subscribe,
)
from tests.fixtures.fleet import Fleet, open_fleet, wait_until

WAIT_S = 30.0  # a loaded 2-core host: reconnects, retained deliveries and state writes take time


# --- the ring ---------------------------------------------------------------------------------


@pytest.fixture
def own_pki(pki: FleetPKI, tmp_path: Path) -> FleetPKI:
    """A copy of the session PKI: rotations here never reach other tests."""
    shutil.copytree(pki.directory, tmp_path / "pki")
    return FleetPKI(tmp_path / "pki", TEST_PKI_PASSPHRASE)


def test_before_any_rotation_the_ring_is_the_first_key_at_version_0(own_pki: FleetPKI) -> None:
    ring = CommandKeyRing(own_pki).load()
    assert ring.version == 0
    assert ring.token is None
    assert [k.kid for k in ring.keys] == [own_pki.command_key_id]
    assert ring.signer(datetime.now(UTC)).kid == own_pki.command_key_id


def test_rotation_adds_a_key_vouched_for_by_the_current_one_and_switches_after_the_transition(
    own_pki: FleetPKI,
) -> None:
    store = CommandKeyRing(own_pki)
    now = datetime.now(UTC)
    ring, added = store.rotate(timedelta(hours=1), now)
    assert ring.version == 1
    assert [k.kid for k in ring.keys] == [own_pki.command_key_id, added.kid]
    # The set is signed by the key devices already pin, and lists both keys.
    assert ring.token is not None
    assert jws.unverified_header(ring.token)["kid"] == own_pki.command_key_id
    key_set, keys = verify_key_set(
        ring.token, {own_pki.command_key_id: own_pki.command_public_key}, current_version=0
    )
    assert key_set.version == 1
    assert set(keys) == {own_pki.command_key_id, added.kid}
    # The old key signs until the transition is over, the new one after.
    assert ring.signer(now + timedelta(minutes=59)).kid == own_pki.command_key_id
    assert ring.signer(now + timedelta(hours=1)).kid == added.kid
    # Another process (the API, the CLI) reads the same ring, and decrypts the new key.
    again = CommandKeyRing(FleetPKI(own_pki.directory, TEST_PKI_PASSPHRASE))
    assert again.load() == ring
    assert again.private_key(added.kid).public_key().public_numbers() == keys[added.kid].public_numbers()  # type: ignore[union-attr]  # both are EC keys
    assert (own_pki.directory / "command-keys" / f"{added.kid}.key").stat().st_mode & 0o777 == 0o600


def test_only_a_superseded_key_can_be_retired(own_pki: FleetPKI) -> None:
    store = CommandKeyRing(own_pki)
    now = datetime.now(UTC)
    _, added = store.rotate(timedelta(hours=1), now)
    with pytest.raises(PKIError, match="signs now or will"):
        store.retire(added.kid, now)  # not signing yet, but it will
    with pytest.raises(PKIError, match="signs now or will"):
        store.retire(own_pki.command_key_id, now)  # still the signer
    with pytest.raises(PKIError, match="no command key"):
        store.retire("cp-0000000000000000", now)
    later = now + timedelta(hours=2)
    ring = store.retire(own_pki.command_key_id, later)
    assert ring.version == 2
    assert [k.kid for k in ring.keys] == [added.kid]
    # Signed by the new key, which devices pinned from version 1.
    assert ring.token is not None
    assert jws.unverified_header(ring.token)["kid"] == added.kid


def test_the_cli_rotates_lists_and_retires(own_pki: FleetPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEX_DATA_DIR", str(own_pki.directory.parent))
    monkeypatch.setenv("KERNEX_PKI_DIR", str(own_pki.directory))
    monkeypatch.setenv("KERNEX_PKI_PASSPHRASE", TEST_PKI_PASSPHRASE.decode())
    runner = CliRunner()
    rotated = runner.invoke(cli, ["keys", "rotate", "--transition-s", "0"])
    assert rotated.exit_code == 0, rotated.output
    ring = CommandKeyRing(own_pki).load()
    assert ring.version == 1
    new_kid = ring.keys[-1].kid
    listed = runner.invoke(cli, ["keys", "list"])
    assert f"{new_kid}\tsigning" in listed.stdout
    refused = runner.invoke(cli, ["keys", "retire", new_kid])
    assert refused.exit_code == 1
    assert "only a superseded key can be retired" in refused.stderr
    retired = runner.invoke(cli, ["keys", "retire", own_pki.command_key_id])
    assert retired.exit_code == 0, retired.output
    assert [k.kid for k in CommandKeyRing(own_pki).load().keys] == [new_kid]


# --- the key set as devices check it -----------------------------------------------------------


def _key_set(version: int, *keys: Any) -> KeySet:
    return KeySet(
        version=version,
        issued_at=datetime.now(UTC),
        keys=[
            CommandKey(kid=f"k{i}", alg="ES256", public_key_pem=public_key_to_pem(k.public_key()))
            for i, k in enumerate(keys)
        ],
    )


def test_a_key_set_is_taken_only_from_a_pinned_signer_newer_and_whole() -> None:
    trusted = generate_private_key(KeyType.ECDSA_P256)
    stranger = generate_private_key(KeyType.ECDSA_P256)
    pinned = {"trusted": trusted.public_key()}
    good = sign_key_set(_key_set(3, trusted, stranger), trusted, "trusted")
    key_set, keys = verify_key_set(good, pinned, current_version=2)
    assert (key_set.version, sorted(keys)) == (3, ["k0", "k1"])
    with pytest.raises(StaleKeySetError) as stale:
        verify_key_set(good, pinned, current_version=3)
    assert stale.value.version == 3
    with pytest.raises(SignatureError, match="does not trust"):
        verify_key_set(sign_key_set(_key_set(9, stranger), stranger, "stranger"), pinned, current_version=0)
    with pytest.raises(SignatureError, match="verification failed"):
        # A trusted kid on a stranger's signature: the signature decides, not the header.
        verify_key_set(sign_key_set(_key_set(9, stranger), stranger, "trusted"), pinned, current_version=0)
    with pytest.raises(SignatureError, match="not a command key set"):
        verify_key_set(
            jws.sign_claims({"version": 9}, trusted, kid="trusted", typ=jws.TYP_COMMAND),
            pinned,
            current_version=0,
        )
    broken = _key_set(4, trusted).model_dump(mode="json")
    broken["keys"][0]["public_key_pem"] = "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
    with pytest.raises(MessageError, match="unusable"):
        verify_key_set(
            jws.sign_claims(broken, trusted, kid="trusted", typ="kernex-keyset+jws"),
            pinned,
            current_version=0,
        )


# --- end to end: the API rotates, a real agent follows ---------------------------------------------


@pytest.fixture
async def fleet(sqlite_url: str, tmp_path: Path, broker: RunningBroker) -> AsyncIterator[Fleet]:
    async with open_fleet(tmp_path, sqlite_url, broker) as opened:
        yield opened


async def _enrol(fleet: Fleet, mqtt_port: int | None = None) -> tuple[DeviceIdentity, Path]:
    """A registered device whose agent state is what registration leaves (the first key pinned).

    mqtt_port: where the device is told the broker is (a dead port: it falls back to HTTP).
    """
    device = await fleet.device()
    state_dir = device.cert_path.parent
    registration = (await fleet.api.client.get("/api/v1/command-keys", headers=fleet.viewer)).json()
    store = StateStore(state_dir)
    await store.load()
    await store.save_registration(
        RegistrationResponse(
            device_id=device.device_id,
            status="active",
            certificate=device.cert_path.read_text(),
            ca_certificate=fleet.broker.pki.ca_certificate_pem,
            mqtt=MqttEndpoint(
                host=fleet.broker.host,
                port=mqtt_port or fleet.broker.port,
                topic_prefix=fleet.broker.topics.prefix,
            ),
            command_keys=[
                CommandKey(kid=k["kid"], alg=k["alg"], public_key_pem=k["public_key_pem"])
                for k in registration["keys"]
            ],
            command_keys_version=registration["version"],
        )
    )
    assert device.key_path == state_dir / "device.key"  # where the agent looks for its key
    return device, state_dir


def _agent(state_dir: Path, fleet: Fleet | None = None) -> Agent:
    """An agent on MQTT only; with `fleet`, one that falls back to the fleet's API over HTTP."""
    settings = AgentSettings(
        state_dir=state_dir,
        # Without a fleet, never called: no fallback, and the certificate is fresh.
        api_url=str(fleet.api.client.base_url) if fleet else "http://127.0.0.1:9",
        heartbeat_interval_s=1 if fleet else 60,
        fallback_after_s=1 if fleet else 0,
    )
    return Agent(
        settings,
        http=fleet.api.client if fleet else None,
        reconnect_backoff=Backoff(initial_s=0.2, max_s=1.0),
        fallback_backoff=Backoff(initial_s=0.2, max_s=1.0),
    )


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        await asyncio.wait({task})
        assert task.cancelled(), "the agent must stop by cancellation, not by an error"


async def _until(predicate: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return predicate()

    await wait_until(check, what, timeout=WAIT_S)


async def _configure(fleet: Fleet, device: DeviceIdentity, interval: int) -> None:
    response = await fleet.api.client.put(
        f"/api/v1/devices/{device.device_id}/config",
        json={"heartbeat_interval_s": interval},
        headers=fleet.operator,
    )
    assert response.status_code == 200, response.text


async def _rotate(fleet: Fleet, transition_s: int = 0) -> dict[str, Any]:
    response = await fleet.api.client.post(
        "/api/v1/command-keys/rotate",
        json={"transition_s": transition_s},
        headers=fleet.api.headers(Role.ADMIN),
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _retained_key_set(fleet: Fleet, mqtt_connect: Callable[..., mqtt.Client]) -> bytes:
    pki = fleet.broker.pki
    client = mqtt_connect(
        pki.service_cert_path(API_IDENTITY), pki.service_key_path(API_IDENTITY), f"t-{uuid.uuid4().hex[:8]}"
    )
    subscribe(client, fleet.broker.topics.command_keys())
    return bytes(next_message(client).payload)


async def test_after_rotation_the_agent_obeys_the_new_key_and_refuses_forged_and_older_sets(
    fleet: Fleet, mqtt_connect: Callable[..., mqtt.Client]
) -> None:
    device, state_dir = await _enrol(fleet)
    agent = _agent(state_dir)
    async with running(agent):
        await _until(lambda: agent.stats.connected, "the agent connected")
        first = await _rotate(fleet)
        assert first["version"] == 1
        new_kid = first["added"]
        assert [k["signing"] for k in first["keys"]] == [False, True]
        handler = agent._commands
        assert handler is not None
        await _until(lambda: handler.key_set_version == 1, "the agent took up key set 1")
        await _configure(fleet, device, 7)
        await _until(lambda: agent.live.heartbeat_interval_s == 7, "the config the new key signed applied")
        token_v1 = await asyncio.to_thread(_retained_key_set, fleet, mqtt_connect)
        assert jws.unverified_header(token_v1)["kid"] != new_kid  # vouched for by the first key

        second = await _rotate(fleet)
        assert second["version"] == 2
        await _until(lambda: handler.key_set_version == 2, "the agent took up key set 2")
        await _configure(fleet, device, 9)
        await _until(lambda: agent.live.heartbeat_interval_s == 9, "the config the newest key signed applied")

        pki = fleet.broker.pki
        api = mqtt_connect(
            pki.service_cert_path(API_IDENTITY),
            pki.service_key_path(API_IDENTITY),
            f"t-{uuid.uuid4().hex[:8]}",
        )
        # A key set from a key nobody pinned (version far ahead): refused, the pinned set stays.
        stranger = generate_private_key(KeyType.ECDSA_P256)
        forged = sign_key_set(_key_set(99, stranger), stranger, "cp-stranger")
        assert (
            publish(api, fleet.broker.topics.command_keys(), forged.encode(), retain=True).is_failure is False
        )
        await _until(
            lambda: handler.key_sets_refused[KeySetRefusal.FORGED] == 1, "the forged key set refused"
        )
        # The older set replayed (signed by a key still pinned): refused as a rollback.
        assert publish(api, fleet.broker.topics.command_keys(), token_v1, retain=True).is_failure is False
        await _until(lambda: handler.key_sets_refused[KeySetRefusal.STALE] == 1, "the older key set refused")
        assert handler.key_set_version == 2
        await _configure(fleet, device, 11)
        await _until(lambda: agent.live.heartbeat_interval_s == 11, "commands still obeyed")

    stored = await StateStore(state_dir).load()
    assert stored.command_keys is not None
    assert stored.command_keys.version == 2
    assert {k.kid for k in stored.command_keys.keys} == {k["kid"] for k in second["keys"]}

    async with fleet.api.app.state.kernex.sessions() as session:
        actions = (await session.exec(sa.select(AuditEntry.action, AuditEntry.outcome))).all()  # type: ignore[call-overload]  # SQLModel select
    assert actions.count(("command_key.rotate", "success")) == 2


async def test_an_agent_offline_during_the_rotation_catches_up_in_either_order(fleet: Fleet) -> None:
    device, state_dir = await _enrol(fleet)
    # The rotation and a command signed by the new key happen while the agent is off: on connect,
    # the retained key set and the retained command arrive in whichever order the broker sends.
    await _rotate(fleet)
    await _configure(fleet, device, 13)
    agent = _agent(state_dir)
    async with running(agent):
        await _until(lambda: agent.live.heartbeat_interval_s == 13, "the command applied after the key set")
        handler = agent._commands
        assert handler is not None
        assert handler.key_set_version == 1
    # Restarted, it pins the set it took up (not the registration's first key alone).
    again = _agent(state_dir)
    async with running(again):
        await _until(lambda: again._commands is not None, "the agent started")
        assert again._commands.key_set_version == 1


async def test_rotation_and_retirement_are_admin_only_and_refusals_audited(fleet: Fleet) -> None:
    operator = await fleet.api.client.post("/api/v1/command-keys/rotate", json={}, headers=fleet.operator)
    assert operator.status_code == 403
    listed = await fleet.api.client.get("/api/v1/command-keys", headers=fleet.viewer)
    assert listed.status_code == 200
    first_kid = listed.json()["keys"][0]["kid"]
    admin = fleet.api.headers(Role.ADMIN)
    refused = await fleet.api.client.delete(f"/api/v1/command-keys/{first_kid}", headers=admin)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "command_key_conflict"
    missing = await fleet.api.client.delete("/api/v1/command-keys/cp-0000000000000000", headers=admin)
    assert missing.status_code == 404
    rotated = await _rotate(fleet, transition_s=3600)
    assert [k["signing"] for k in rotated["keys"]] == [True, False]  # the old key signs for an hour
    too_long = await fleet.api.client.post(
        "/api/v1/command-keys/rotate", json={"transition_s": 10**9}, headers=admin
    )
    assert too_long.status_code == 422
    async with fleet.api.app.state.kernex.sessions() as session:
        rows = (
            await session.exec(sa.select(AuditEntry.action, AuditEntry.outcome, AuditEntry.target))  # type: ignore[call-overload]  # SQLModel select
        ).all()
    assert ("command_key.retire", "failed", f"command_key:{first_kid}") in rows
    assert ("command_key.rotate", "success", f"command_key:{rotated['added']}") in rows


def test_a_backup_keeps_the_rotated_ring_and_a_restore_brings_it_back(
    pki: FleetPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(pki.directory, first / "pki")
    ring, added = CommandKeyRing(FleetPKI(first / "pki", TEST_PKI_PASSPHRASE)).rotate(timedelta(0))
    for key, value in {
        "KERNEX_DATA_DIR": str(first),
        "KERNEX_DATABASE_URL": f"sqlite+aiosqlite:///{first / 'kernex.db'}",
        "KERNEX_PKI_PASSPHRASE": TEST_PKI_PASSPHRASE.decode(),
    }.items():
        monkeypatch.setenv(key, value)
    upgrade(f"sqlite+aiosqlite:///{first / 'kernex.db'}")
    archive = tmp_path / "backup.tar.gz"
    runner = CliRunner()
    made = runner.invoke(cli, ["backup", "--output", str(archive), "--no-bundles"])
    assert made.exit_code == 0, made.output
    monkeypatch.setenv("KERNEX_DATA_DIR", str(second))
    monkeypatch.setenv("KERNEX_DATABASE_URL", f"sqlite+aiosqlite:///{second / 'kernex.db'}")
    restored = runner.invoke(cli, ["restore", str(archive)])
    assert restored.exit_code == 0, restored.output
    back = CommandKeyRing(FleetPKI(second / "pki", TEST_PKI_PASSPHRASE))
    assert back.load() == ring
    # The restored platform signs with the rotated key, which it can still decrypt.
    assert back.load().signer(datetime.now(UTC)).kid == added.kid
    assert back.private_key(added.kid).public_key().public_numbers() == (  # type: ignore[union-attr]  # EC keys
        load_public_key_pem(added.public_key_pem).public_numbers()  # type: ignore[union-attr]  # EC keys
    )


async def test_a_device_on_the_http_fallback_takes_up_the_key_set_from_the_heartbeat_answer(
    fleet: Fleet,
) -> None:
    device, state_dir = await _enrol(fleet, mqtt_port=free_port())  # nothing listens there
    await _rotate(fleet)
    await _configure(fleet, device, 17)
    agent = _agent(state_dir, fleet)
    async with running(agent):
        await _until(lambda: agent.live.heartbeat_interval_s == 17, "the config applied over HTTP")
        assert agent.stats.sent_over_http > 0
        assert not agent.stats.connected
        handler = agent._commands
        assert handler is not None
        assert handler.key_set_version == 1
