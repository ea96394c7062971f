"""The HTTP fallback with no broker at all: heartbeats stored like ingest stores them, commands in
the answer, events applied; only the device itself may post."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa

from kernex.api.auth.schemas import Role
from kernex.broker.pki import FleetPKI
from kernex.protocol import devicetoken, jws
from kernex.protocol.commands import Command, verify_command
from kernex.protocol.keys import KeyType, PrivateKey, build_csr, device_id_for, generate_private_key
from kernex.protocol.messages import format_ts
from kernex.storage.database import engine_scope
from kernex.storage.models import Device, DeviceEvent, Heartbeat
from tests.fixtures import asyncapi
from tests.fixtures.auth import AuthedApi
from tests.fixtures.broker import RunningBroker, assert_no_message, close_client, next_message
from tests.fixtures.bundles import good_bundle
from tests.fixtures.fleet import connect_integrator, open_fleet
from tests.fixtures.ingest import signed_event, signed_heartbeat

JOSE = {"Content-Type": "application/jose"}


async def _register(api: AuthedApi) -> tuple[PrivateKey, str]:
    key = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(key.public_key())
    response = await api.client.post("/api/v1/devices/register", json={"csr": build_csr(key, device_id)})
    assert response.status_code == 201, response.text
    return key, device_id


def _auth(key: PrivateKey, device_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {devicetoken.issue(key, device_id)}", **JOSE}


async def _post(
    api: AuthedApi, key: PrivateKey, device_id: str, body: bytes, what: str = "heartbeat"
) -> httpx.Response:
    return await api.client.post(
        f"/api/v1/devices/{device_id}/{what}", content=body, headers=_auth(key, device_id)
    )


def _verify(api: AuthedApi, token: str, device_id: str) -> Command:
    pki = FleetPKI.from_settings(api.settings)
    return verify_command(
        token, {pki.command_key_id: pki.command_public_key}, device_id=device_id, now=datetime.now(UTC)
    )


async def test_heartbeat_is_stored_once_and_answers_with_outstanding_commands(authed_api: AuthedApi) -> None:
    api = authed_api
    key, device_id = await _register(api)
    operator = api.headers(Role.OPERATOR)

    first = await _post(api, key, device_id, signed_heartbeat(key, device_id, 5, config_version=None))
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": True, "stored": True, "commands": [], "command_key_set": None}
    again = await _post(api, key, device_id, signed_heartbeat(key, device_id, 5, config_version=None))
    assert again.json()["stored"] is False
    async with engine_scope(api.database_url) as engine, engine.connect() as conn:
        rows = (await conn.execute(sa.select(Heartbeat.seq).where(Heartbeat.device_id == device_id))).all()  # type: ignore[arg-type]  # SQLModel column
        device = (
            await conn.execute(sa.select(Device.status, Device.last_seq).where(Device.id == device_id))
        ).one()  # type: ignore[arg-type]  # SQLModel column
    assert rows == [(5,)]
    assert tuple(device) == ("online", 5)  # the same device state as an MQTT heartbeat gives

    # The broker is unreachable: the commands stay pending, and the fallback delivers them.
    upload = await api.client.post(
        "/api/v1/bundles",
        files={"file": ("b.tar.gz", good_bundle("1.0.0").archive, "application/gzip")},
        headers=operator,
    )
    bundle_id = upload.json()["id"]
    deployed = await api.client.post(
        "/api/v1/deployments", json={"bundle_id": bundle_id, "device_ids": [device_id]}, headers=operator
    )
    assert deployed.status_code == 201, deployed.text
    assert deployed.json()["targets"][0]["command_state"] == "pending"
    configured = await api.client.put(
        f"/api/v1/devices/{device_id}/config", json={"log_level": "DEBUG"}, headers=operator
    )
    assert configured.status_code == 200

    answer = (
        await _post(api, key, device_id, signed_heartbeat(key, device_id, 6, config_version=None))
    ).json()
    commands = [_verify(api, token, device_id) for token in answer["commands"]]
    assert [c.kind.value for c in commands] == ["deploy", "config"]  # revision order
    deploy, config = commands
    assert deploy.deploy is not None
    assert deploy.deploy.deployment_id == deployed.json()["id"]
    assert config.config is not None
    assert config.config.version == 1

    # Reported over the fallback too: the deployment finished, the config applied.
    for seq, data, kind in (
        (
            7,
            {
                "deployment_id": deploy.deploy.deployment_id,
                "command_id": deploy.command_id,
                "bundle_id": bundle_id,
                "version": "1.0.0",
                "stage": "succeeded",
            },
            "deployment",
        ),
        (8, {"command_id": config.command_id, "version": 1}, "config_applied"),
    ):
        claims = {
            "device_id": device_id,
            "seq": seq,
            "ts": format_ts(datetime.now(UTC)),
            "type": kind,
            "data": data,
        }
        token = jws.sign_claims(claims, key, kid=device_id, typ=jws.TYP_EVENT).encode()
        posted = await _post(api, key, device_id, token, "events")
        assert posted.status_code == 200, posted.text
        assert posted.json() == {"accepted": True, "stored": True}
    answer = (await _post(api, key, device_id, signed_heartbeat(key, device_id, 9, config_version=1))).json()
    assert answer["commands"] == []
    status = await api.client.get(f"/api/v1/deployments/{deploy.deploy.deployment_id}", headers=operator)
    assert status.json()["status"] == "succeeded"
    async with engine_scope(api.database_url) as engine, engine.connect() as conn:
        events = (await conn.execute(sa.select(sa.func.count()).select_from(DeviceEvent))).scalar_one()
    assert events == 2


async def test_only_the_device_itself_may_post(sqlite_authed_api: AuthedApi) -> None:
    api = sqlite_authed_api
    key, device_id = await _register(api)
    other_key, other_id = await _register(api)
    beat = signed_heartbeat(key, device_id, 1)

    operator = await api.client.post(
        f"/api/v1/devices/{device_id}/heartbeat", content=beat, headers={**api.headers(Role.ADMIN), **JOSE}
    )
    assert operator.status_code == 401
    anonymous = await api.client.post(f"/api/v1/devices/{device_id}/heartbeat", content=beat, headers=JOSE)
    assert anonymous.status_code == 401
    other = await api.client.post(
        f"/api/v1/devices/{device_id}/heartbeat", content=beat, headers=_auth(other_key, other_id)
    )
    assert other.status_code == 403
    # Its own endpoint, another device's heartbeat: refused like ingest refuses it.
    forged = await _post(api, other_key, other_id, beat)
    assert (forged.status_code, forged.json()["error"]["code"]) == (422, "message_rejected")
    assert forged.json()["error"]["message"].startswith("topic_mismatch")
    wrong_key = await _post(api, key, device_id, signed_heartbeat(other_key, device_id, 2))
    assert wrong_key.json()["error"]["message"].startswith("bad_signature")
    stale = await _post(
        api, key, device_id, signed_heartbeat(key, device_id, 3, ts=datetime.now(UTC) - timedelta(days=2))
    )
    assert stale.json()["error"]["message"].startswith("clock_skew")
    text = await api.client.post(
        f"/api/v1/devices/{device_id}/heartbeat",
        content=beat,
        headers={"Authorization": _auth(key, device_id)["Authorization"], "Content-Type": "text/plain"},
    )
    assert text.status_code == 415
    as_json = await api.client.post(
        f"/api/v1/devices/{device_id}/heartbeat",
        json={"jws": beat.decode()},
        headers={"Authorization": _auth(key, device_id)["Authorization"]},
    )
    assert as_json.status_code == 415
    async with engine_scope(api.database_url) as engine, engine.connect() as conn:
        stored = (await conn.execute(sa.select(sa.func.count()).select_from(Heartbeat))).scalar_one()
    assert stored == 0


async def test_what_arrives_over_http_reaches_integrators_on_the_fleet_topics(
    sqlite_url: str, tmp_path: Path, broker: RunningBroker
) -> None:
    async with open_fleet(tmp_path, sqlite_url, broker) as fleet:
        api = fleet.api
        integrator = await asyncio.to_thread(connect_integrator, broker, tmp_path / "integrator")
        try:
            key, device_id = await _register(api)
            beat = await _post(api, key, device_id, signed_heartbeat(key, device_id, 3, config_version=None))
            assert beat.status_code == 200, beat.text
            event = signed_event(key, device_id, 4, "deployment", stage="downloading")
            posted = await _post(api, key, device_id, event, what="events")
            assert posted.status_code == 200, posted.text
            seen = []
            while len(seen) < 3:  # the heartbeat, the status change it caused, the event
                message = await asyncio.to_thread(next_message, integrator)
                seen.append((message.topic, json.loads(message.payload)))
            await asyncio.to_thread(assert_no_message, integrator)
        finally:
            await asyncio.to_thread(close_client, integrator)
    base = f"{broker.topics.prefix}/fleet/devices/{device_id}"
    by_topic = dict(seen)
    assert set(by_topic) == {f"{base}/heartbeat", f"{base}/status", f"{base}/deployments"}
    assert (by_topic[f"{base}/heartbeat"]["seq"], by_topic[f"{base}/status"]["status"]) == (3, "online")
    assert by_topic[f"{base}/deployments"]["data"] == {"stage": "downloading"}
    for topic, body in seen:
        assert not asyncapi.message_errors(topic, body, prefix=broker.topics.prefix), (topic, body)
