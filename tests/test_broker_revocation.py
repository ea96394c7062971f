"""Revocation at the broker (Mosquitto 2.0.11): the CRL after SIGHUP, and the session cut.

Mosquitto re-reads `crlfile` on SIGHUP but keeps existing sessions; the API cuts a revoked
device's live session by connecting with the device's client id under its own identity (MQTT
session takeover), which these tests show the project's ACL and config allow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from kernex.broker.integrators import reload_broker
from kernex.broker.pki import API_IDENTITY
from kernex.broker.session import cut_session
from tests.fixtures.broker import ClientConnectError, RunningBroker, make_device, wait_disconnected


def _serial(cert_path: Any) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return f"{cert.serial_number:x}"


def test_revoked_certificate_is_refused_after_reload_and_others_are_not(
    broker: RunningBroker, mqtt_connect: Callable[..., mqtt.Client]
) -> None:
    revoked = make_device(broker.pki)
    kept = make_device(broker.pki)
    mqtt_connect(revoked.cert_path, revoked.key_path, revoked.device_id).disconnect()
    broker.pki.write_crl([(_serial(revoked.cert_path), datetime.now(UTC))])
    assert _serial(revoked.cert_path) in broker.pki.revoked_serials()
    assert reload_broker(broker.process.conf_path.parent) == broker.process.pid
    deadline = time.monotonic() + 5
    while True:
        try:
            mqtt_connect(revoked.cert_path, revoked.key_path, revoked.device_id).disconnect()
        except ClientConnectError:
            break
        assert time.monotonic() < deadline, "the revoked certificate still connects after SIGHUP"
        time.sleep(0.2)
    mqtt_connect(kept.cert_path, kept.key_path, kept.device_id)


@pytest.mark.parametrize("clean", [True, False])
def test_cut_session_disconnects_the_live_device(
    broker: RunningBroker, mqtt_connect: Callable[..., mqtt.Client], clean: bool
) -> None:
    device = make_device(broker.pki)
    live = mqtt_connect(device.cert_path, device.key_path, device.device_id, clean_start=clean)
    cut_session(
        host=broker.host,
        port=broker.port,
        ssl_context=broker.pki.client_ssl_context(API_IDENTITY),
        client_id=device.device_id,
    )
    wait_disconnected(live)
    assert not live.is_connected()
