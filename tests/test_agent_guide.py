"""docs/agent-guide.md: its offline shell example signs a heartbeat the platform accepts and
verifies real commands (and refuses a tampered one); its network part, run as written against
`kernex up`, registers, gets a heartbeat stored and receives and verifies a real command."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from kernex.protocol import jws
from kernex.protocol.commands import Command, ConfigBody, sign_command
from kernex.protocol.keys import KeyType, device_id_for, generate_private_key, public_key_to_pem
from kernex.protocol.messages import Heartbeat
from kernex.protocol.topics import CommandKind
from tests.fixtures.platform import run_platform, wait_for

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "agent-guide.md"


def _scripts() -> list[str]:
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert len(blocks) == 2
    return blocks


def _offline_script() -> str:
    return _scripts()[0]


def _run(tmp_path: Path, extra: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-c", _offline_script() + extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_shell_heartbeat_verifies_with_the_platforms_verifier(tmp_path: Path) -> None:
    for expected_seq in (1, 2):  # seq persists and grows across runs
        done = _run(tmp_path)
        assert done.returncode == 0, done.stderr
        key = load_pem_private_key((tmp_path / "device.key").read_bytes(), password=None)
        public = key.public_key()
        device_id = device_id_for(public)  # type: ignore[arg-type]  # an Ed25519 key, as generated
        token = (tmp_path / "heartbeat.jws").read_text()
        header = jws.unverified_header(token)
        assert (header["alg"], header["kid"], header["typ"]) == ("EdDSA", device_id, jws.TYP_HEARTBEAT)
        claims = Heartbeat.model_validate(json.loads(jws.verify(token, public).payload))  # type: ignore[arg-type]  # as above
        assert (claims.device_id, claims.seq) == (device_id, expected_seq)
        csr = subprocess.run(
            ["/usr/bin/openssl", "req", "-in", "device.csr", "-noout", "-subject", "-verify"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        assert device_id in csr.stdout


def test_the_shell_command_check_accepts_real_commands_and_refuses_tampered_ones(tmp_path: Path) -> None:
    key = generate_private_key(KeyType.ECDSA_P256)
    (tmp_path / "command-key.pem").write_text(public_key_to_pem(key.public_key()))
    now = datetime.now(UTC)
    # Several commands: raw r and s of every length and high bit get converted to DER right.
    for i in range(12):
        command = Command(
            command_id=f"c{i}",
            device_id="d1",
            kind=CommandKind.CONFIG,
            revision=i + 1,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            config=ConfigBody(version=i + 1, values={"log_level": "DEBUG"}),
        )
        token = sign_command(command, key, "ctl-1")
        (tmp_path / "command.jws").write_text(token)
        done = _run(tmp_path, "\nverify_command command.jws command-key.pem && echo VERIFIED\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("VERIFIED")
        assert json.loads((tmp_path / "command.json").read_text())["revision"] == i + 1
    header, _claims, signature = token.split(".")
    forged = json.dumps({**command.model_dump(mode="json"), "revision": 999}, separators=(",", ":"))
    forged_b64 = base64.urlsafe_b64encode(forged.encode()).rstrip(b"=").decode("ascii")
    (tmp_path / "command.jws").write_text(f"{header}.{forged_b64}.{signature}")
    done = _run(
        tmp_path,
        "\nif verify_command command.jws command-key.pem; then echo VERIFIED; else echo REFUSED; fi\n",
    )
    assert done.stdout.strip().endswith("REFUSED"), done.stdout


COMMAND_STEP = "# 6. Commands"


def _network_run(tmp_path: Path, api_url: str, *, through_commands: bool) -> subprocess.CompletedProcess[str]:
    """The offline part, then the network part as written with only the API address changed."""
    network = _scripts()[1]
    assert network.startswith("API=http://127.0.0.1:8000\n")
    network = f"API={api_url}\n" + network.split("\n", 1)[1]
    if not through_commands:
        network = network.split(COMMAND_STEP)[0]
    return subprocess.run(
        ["/bin/bash", "-c", "set -e\n" + _offline_script() + network],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


async def test_the_network_part_registers_publishes_and_obeys_a_command(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with run_platform(tmp_path, sqlite_url) as platform:
        work = tmp_path / "device"
        work.mkdir()
        done = await asyncio.to_thread(_network_run, work, platform.api_url, through_commands=False)
        assert done.returncode == 0, done.stdout + done.stderr
        key = load_pem_private_key((work / "device.key").read_bytes(), password=None)
        public = key.public_key()
        device_id = device_id_for(public)  # type: ignore[arg-type]  # an Ed25519 key, as generated

        async def stored_heartbeats() -> list[int]:
            response = await platform.get(f"/api/v1/devices/{device_id}/heartbeats")
            if response.status_code != 200:
                return []
            return [item["seq"] for item in response.json()["items"]]

        stored = await wait_for(stored_heartbeats, 30, "the shell heartbeat in the database", log=platform)
        assert stored == [1]
        device = (await platform.get(f"/api/v1/devices/{device_id}")).json()
        assert (device["status"], device["last_seq"]) == ("online", 1)

        async with httpx.AsyncClient(timeout=10) as client:
            put = await client.put(
                f"{platform.api_url}/api/v1/devices/{device_id}/config",
                json={"heartbeat_interval_s": 7},
                headers={"Authorization": f"Bearer {platform.token}"},
            )
        assert put.status_code == 200, put.text

        # Run again, now through step 6: registration is idempotent, seq grows, and the retained
        # config command arrives, passes the guide's signature check and is printed.
        done = await asyncio.to_thread(_network_run, work, platform.api_url, through_commands=True)
        assert done.returncode == 0, done.stdout + done.stderr
        command = json.loads((work / "command.json").read_text())
        assert (command["device_id"], command["kind"]) == (device_id, "config")
        assert command["config"]["values"]["heartbeat_interval_s"] == 7
        assert sorted(
            await wait_for(lambda: _two(stored_heartbeats), 30, "the second heartbeat", log=platform)
        ) == [1, 2]


async def _two(seqs: Callable[[], Awaitable[list[int]]]) -> list[int] | None:
    found = await seqs()
    return found if len(found) == 2 else None
