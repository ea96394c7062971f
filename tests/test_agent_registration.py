"""Registration against a real HTTP server: retry on transient answers, stop on permanent ones.

The server is a scripted `http.server` on a free port in a thread; httpx is not mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from kernex.agent.agent import Agent
from kernex.agent.exceptions import DeviceRefusedError, IdentityMismatchError, RegistrationError
from kernex.agent.identity import load_or_create
from kernex.agent.registration import REGISTER_PATH, Registrar
from kernex.agent.settings import AgentSettings
from kernex.agent.state import StateStore
from kernex.kit.backoff import Backoff
from kernex.protocol.keys import KeyType, device_id_for, load_csr

KERNEX = str(Path(sys.executable).parent / "kernex")  # the console script of this environment
Reply = tuple[int, Any]  # status, JSON body (or str for a raw body)


def _fast_backoff() -> Backoff:
    return Backoff(initial_s=0.01, max_s=0.05)


def registration_body(
    request: dict[str, Any], *, status: str = "active", device_id: str | None = None
) -> dict:
    """What the control plane answers: the device id derived from the CSR's key."""
    _, public_key = load_csr(request["csr"])
    return {
        "device_id": device_id or device_id_for(public_key),
        "status": status,
        "certificate": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
        if status == "active"
        else None,
        "ca_certificate": "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n",
        "mqtt": {"host": "127.0.0.1", "port": 8883, "topic_prefix": "kernex/test"},
        "command_keys": [],
    }


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


@dataclass
class ScriptedApi:
    """Answers each POST with the next scripted reply (the last one repeats)."""

    url: str
    replies: list[Callable[[dict[str, Any]], Reply]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def reply(self, request: dict[str, Any]) -> Reply:
        index = min(len(self.requests) - 1, len(self.replies) - 1)
        return self.replies[index](request)


@pytest.fixture
def api() -> Iterator[ScriptedApi]:
    state: dict[str, ScriptedApi] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            scripted = state["api"]
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            scripted.requests.append((self.path, body))
            status, payload = scripted.reply(body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Keep the test output clean."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["api"] = ScriptedApi(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["api"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("transient_status", [503, 500, 408, 429])
async def test_retries_transient_errors_then_registers(api, tmp_path, transient_status):
    identity = load_or_create(tmp_path, KeyType.ECDSA_P256)
    api.replies = [
        lambda _: (transient_status, error_body("unavailable", "try later")),
        lambda _: (transient_status, "<html>proxy error</html>"),
        lambda request: (201, registration_body(request)),
    ]

    async with httpx.AsyncClient() as http:
        registrar = Registrar(http, api.url, name="dev-1", backoff=_fast_backoff())
        response = await registrar.register(identity)

    assert registrar.attempts == 3
    assert response.status == "active"
    assert response.device_id == identity.device_id
    path, request = api.requests[-1]
    assert path == REGISTER_PATH
    csr, public_key = load_csr(request["csr"])
    assert device_id_for(public_key) == identity.device_id
    assert csr.subject.rfc4514_string() == f"CN={identity.device_id}"
    assert request["name"] == "dev-1"
    assert set(request["hardware"]) == {"machine", "system", "hostname"}


async def test_permanent_refusal_stops_without_retrying(api, tmp_path):
    identity = load_or_create(tmp_path, KeyType.ECDSA_P256)
    api.replies = [lambda _: (422, error_body("invalid_csr", "CSR signature does not verify"))]

    async with httpx.AsyncClient() as http:
        registrar = Registrar(http, api.url, backoff=_fast_backoff())
        with pytest.raises(RegistrationError, match="CSR signature does not verify") as caught:
            await registrar.register(identity)

    assert registrar.attempts == 1
    assert caught.value.status_code == 422
    assert caught.value.code == "invalid_csr"


async def test_pending_keeps_polling_until_active(api, tmp_path):
    identity = load_or_create(tmp_path, KeyType.ED25519)
    api.replies = [
        lambda request: (201, registration_body(request, status="pending")),
        lambda request: (200, registration_body(request, status="pending")),
        lambda request: (200, registration_body(request)),
    ]

    async with httpx.AsyncClient() as http:
        registrar = Registrar(http, api.url, backoff=_fast_backoff())
        response = await registrar.register(identity)

    assert registrar.attempts == 3
    assert response.status == "active"


@pytest.mark.parametrize("status", ["rejected", "revoked"])
async def test_rejected_or_revoked_device_stops(api, tmp_path, status):
    identity = load_or_create(tmp_path, KeyType.ECDSA_P256)
    api.replies = [lambda request: (200, registration_body(request, status=status))]

    async with httpx.AsyncClient() as http:
        with pytest.raises(DeviceRefusedError, match=status):
            await Registrar(http, api.url, backoff=_fast_backoff()).register(identity)

    assert len(api.requests) == 1


async def test_answer_for_another_device_is_refused(api, tmp_path):
    identity = load_or_create(tmp_path, KeyType.ECDSA_P256)
    api.replies = [lambda request: (201, registration_body(request, device_id="0" * 32))]

    async with httpx.AsyncClient() as http:
        with pytest.raises(IdentityMismatchError):
            await Registrar(http, api.url, backoff=_fast_backoff()).register(identity)


async def test_malformed_success_is_retried(api, tmp_path):
    identity = load_or_create(tmp_path, KeyType.ECDSA_P256)
    api.replies = [lambda _: (200, {"hello": "proxy"}), lambda request: (201, registration_body(request))]

    async with httpx.AsyncClient() as http:
        registrar = Registrar(http, api.url, backoff=_fast_backoff())
        await registrar.register(identity)

    assert registrar.attempts == 2


async def test_agent_registers_once_and_persists_the_result(api, tmp_path):
    api.replies = [
        lambda _: (503, error_body("unavailable", "starting")),
        lambda r: (201, registration_body(r)),
    ]
    settings = AgentSettings(api_url=api.url, state_dir=tmp_path / "agent")
    agent = Agent(settings, registration_backoff=_fast_backoff())
    identity = load_or_create(settings.state_dir, settings.key_type)

    registration = await agent._ensure_registered(identity)

    assert registration.device_id == identity.device_id
    store = StateStore(settings.state_dir)
    assert (await store.load()).registration == registration
    assert store.cert_path.read_text() == registration.certificate
    # A restarted agent uses the stored registration: the API is not asked again.
    requests_before = len(api.requests)
    restarted = Agent(settings, registration_backoff=_fast_backoff())
    await restarted._store.load()
    assert await restarted._ensure_registered(identity) == registration
    assert len(api.requests) == requests_before


async def test_agent_run_raises_on_permanent_refusal(api, tmp_path):
    api.replies = [lambda _: (403, error_body("forbidden", "enrollment token required"))]
    agent = Agent(AgentSettings(api_url=api.url, state_dir=tmp_path), registration_backoff=_fast_backoff())

    with pytest.raises(RegistrationError, match="enrollment token required"):
        await agent.run()

    assert agent.stats.connects == 0


def test_cli_refusal_is_one_line_and_exit_code_1(api, tmp_path):
    api.replies = [lambda _: (422, error_body("invalid_request", "name is too long"))]
    env = {**os.environ, "KERNEX_AGENT_LOG_FORMAT": "json"}

    done = subprocess.run(
        [KERNEX, "agent", "run", "--api", api.url, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1
    assert "name is too long" in errors[0]["error"]
    assert Path(tmp_path, "device.key").exists()


def test_cli_sigterm_while_retrying_exits_cleanly(tmp_path):
    # A port nothing listens on: the agent keeps retrying registration until it is stopped.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {**os.environ, "KERNEX_AGENT_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [KERNEX, "agent", "run", "--api", f"http://127.0.0.1:{closed_port}", "--state-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        # Wait for the first failed attempt: the agent is then inside its retry loop.
        for line in proc.stderr:
            if json.loads(line)["event"] == "registration failed, retrying":
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 0, rest
    assert "Traceback" not in rest
