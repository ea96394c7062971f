"""Operating the agent without a platform: config file and precedence, validation errors, install and
uninstall into a scratch root, status from a state dir, and `check` against wrong URLs, a foreign
CA and a skewed clock (test HTTP servers whose Date header says another time).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from kernex.agent.bundles.layout import BundlePaths, Installed, VersionRecord
from kernex.agent.identity import load_or_create
from kernex.agent.settings import AgentSettings, ConfigFileError
from kernex.agent.state import StateStore
from kernex.agent.status import STATUS_FILE, LiveStatus, StatusReporter, write_live_status
from kernex.broker.pki import FleetPKI
from kernex.cli.main import app
from kernex.protocol.keys import KeyType, build_csr
from kernex.protocol.messages import BundleRef, MqttEndpoint, RegistrationResponse
from tests.fixtures.broker import TEST_PKI_PASSPHRASE
from tests.fixtures.platform import KERNEX

runner = CliRunner()


def _agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEX_AGENT_")}
    return {**env, "KERNEX_AGENT_CONFIG": "", **extra}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KERNEX, *args], env=env or _agent_env(), capture_output=True, text=True, check=False
    )


# --- config file and precedence ---------------------------------------------------------------


def test_precedence_is_options_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'api_url = "https://file.example.com"\nheartbeat_interval_s = 30\nname = "from-file"\n'
        'proxy = "http://proxy.example.com:3128"\n'
    )
    for key in [k for k in os.environ if k.startswith("KERNEX_AGENT_")]:
        monkeypatch.delenv(key)
    from_file = AgentSettings(config=config)
    assert (from_file.api_url, from_file.heartbeat_interval_s, from_file.name) == (
        "https://file.example.com",
        30,
        "from-file",
    )
    assert from_file.proxy == "http://proxy.example.com:3128"
    assert from_file.buffer_size == 1000, "defaults fill what the file leaves out"
    assert from_file.config == config

    monkeypatch.setenv("KERNEX_AGENT_HEARTBEAT_INTERVAL_S", "20")
    monkeypatch.setenv("KERNEX_AGENT_CONFIG", str(config))
    from_env = AgentSettings()
    assert from_env.heartbeat_interval_s == 20, "the environment beats the file"
    assert from_env.api_url == "https://file.example.com"

    from_option = AgentSettings(heartbeat_interval_s=5, api_url="http://option.example.com")
    assert from_option.heartbeat_interval_s == 5, "an option beats the environment"
    assert from_option.api_url == "http://option.example.com"

    monkeypatch.setenv("KERNEX_AGENT_CONFIG", "")
    assert AgentSettings().config is None
    assert AgentSettings().api_url == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("api_uri = 'http://x'\n", "unknown setting 'api_uri'"),
        ("api_url = \n", "is not valid TOML"),
        ("heartbeat_interval_s = 0\n", "invalid setting heartbeat_interval_s"),
        ("api_url = 'ftp://files.example.com'\n", "invalid setting api_url"),
        ("log_level = 'LOUD'\n", "invalid setting log_level"),
        ("proxy = 'socks://p:1'\n", "invalid setting proxy"),
        ("key_type = 'dsa'\n", "invalid setting key_type"),
        ("config = '/etc/other.toml'\n", "unknown setting 'config'"),
    ],
)
def test_invalid_config_file_exits_2_with_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(content)
    result = _cli("agent", "status", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert result.stdout == ""


def test_missing_config_file_and_invalid_environment_exit_2(tmp_path: Path) -> None:
    missing = _cli("agent", "check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"kernex: config file {tmp_path / 'nope.toml'} does not exist"
    env = _cli("agent", "run", env=_agent_env(KERNEX_AGENT_BUFFER_SIZE="zero"))
    assert env.returncode == 2
    assert env.stderr.strip().startswith("kernex: invalid setting buffer_size:")
    with pytest.raises(ConfigFileError, match="does not exist"):
        AgentSettings(config=tmp_path / "nope.toml")


# --- install / uninstall ----------------------------------------------------------------------


def test_install_and_uninstall_into_a_scratch_root_are_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unit = root / "etc/systemd/system/kernex-agent.service"
    config = root / "etc/kernex/agent.toml"

    refused = runner.invoke(app, ["agent", "install", "--root", str(root)])
    assert refused.exit_code == 1
    assert "pass --api URL" in refused.output
    assert not unit.exists()

    first = runner.invoke(
        app, ["agent", "install", "--root", str(root), "--api", "https://kernex.example.com"]
    )
    assert first.exit_code == 0, first.output
    assert f"created   {config}" in first.output
    assert f"created   {unit}" in first.output
    text = unit.read_text()
    for directive in (
        "User=kernex",
        "StateDirectory=kernex",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ReadWritePaths=/var/lib/kernex\n",
        "Restart=on-failure",
        "RestartSec=10",
        "RestartPreventExitStatus=2",
        "CapabilityBoundingSet=\n",
        "WantedBy=multi-user.target",
    ):
        assert directive in text, directive
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(program).is_absolute()
    assert Path(program).exists()
    assert exec_start.endswith("agent run --config /etc/kernex/agent.toml")
    assert (unit.stat().st_mode & 0o777, config.stat().st_mode & 0o777) == (0o644, 0o640)
    settings = AgentSettings(config=config)
    assert settings.api_url == "https://kernex.example.com"
    assert settings.state_dir == Path("/var/lib/kernex")

    again = runner.invoke(
        app, ["agent", "install", "--root", str(root), "--api", "https://other.example.com"]
    )
    assert again.exit_code == 0, again.output
    assert f"unchanged {unit}" in again.output
    assert f"kept      {config}" in again.output
    assert AgentSettings(config=config).api_url == "https://kernex.example.com", "an operator's file is kept"

    widened = runner.invoke(app, ["agent", "install", "--root", str(root), "--read-write-path", "/opt/app"])
    assert widened.exit_code == 0, widened.output
    assert f"updated   {unit}" in widened.output
    assert "ReadWritePaths=/var/lib/kernex /opt/app\n" in unit.read_text()
    relative = runner.invoke(app, ["agent", "install", "--root", str(root), "--read-write-path", "opt/app"])
    assert relative.exit_code == 1
    assert "must be absolute" in relative.output

    (root / "var/lib/kernex").mkdir(parents=True)
    removed = runner.invoke(app, ["agent", "uninstall", "--root", str(root)])
    assert removed.exit_code == 0, removed.output
    assert f"removed   {unit}" in removed.output
    assert "--purge removes it" in removed.output
    assert not unit.exists()
    assert config.exists()
    assert (root / "var/lib/kernex").exists(), "the device identity survives an uninstall"

    twice = runner.invoke(app, ["agent", "uninstall", "--root", str(root)])
    assert twice.exit_code == 0, twice.output
    assert f"absent    {unit}" in twice.output

    purged = runner.invoke(app, ["agent", "uninstall", "--root", str(root), "--purge"])
    assert purged.exit_code == 0, purged.output
    assert not config.exists()
    assert not (root / "var/lib/kernex").exists()


def test_install_on_the_real_root_needs_root() -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: the real-root refusal cannot be observed without touching the system")
    result = runner.invoke(app, ["agent", "install", "--api", "https://kernex.example.com"])
    assert result.exit_code == 1
    assert "needs root" in result.output


# --- status -----------------------------------------------------------------------------------


@dataclass
class Counters:
    """A running agent's counters as StatusReporter reads them (AgentStats has these fields)."""

    device_id: str | None
    connected: bool
    buffered: int
    dropped: int
    last_seq: int | None


async def _registered_state(state_dir: Path, tmp_path: Path) -> str:
    """A state dir as a registered agent leaves it: key, registration, certificate, bundles, config."""
    identity = await asyncio.to_thread(load_or_create, state_dir, KeyType.ED25519)
    pki = FleetPKI(tmp_path / "pki", TEST_PKI_PASSPHRASE)
    await asyncio.to_thread(pki.init)

    csr = x509.load_pem_x509_csr(build_csr(identity.key, common_name=identity.device_id).encode())
    issued = await asyncio.to_thread(pki.sign_device_csr, csr, identity.device_id)
    store = StateStore(state_dir)
    await store.load()
    await store.save_registration(
        RegistrationResponse(
            device_id=identity.device_id,
            status="active",
            certificate=issued.pem,
            ca_certificate=pki.ca_certificate_pem,
            mqtt=MqttEndpoint(host="broker.example.com", port=8883, topic_prefix="kernex/v1"),
            command_keys=[],
        )
    )
    await store.update(seq_reserved=200, config_version=7, bundle=BundleRef(id="b-2", version="1.1.0"))
    now = datetime.now(UTC)
    records = [
        VersionRecord(
            name="app", version=v, bundle_id=b, sha256="a" * 64, installed_at=now - timedelta(days=d)
        )
        for v, b, d in (("1.1.0", "b-2", 0), ("1.0.0", "b-1", 3))
    ]
    paths = BundlePaths.under(state_dir)
    paths.root.mkdir(mode=0o700)
    paths.write_installed(Installed(current=records[0], previous=records[1]))
    return identity.device_id


def _status(state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("agent", "status", "--state-dir", str(state_dir), *extra)


async def test_status_text_and_json_from_state_and_a_running_reporter(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    device_id = await _registered_state(state_dir, tmp_path)

    stopped = json.loads(_status(state_dir, "--json").stdout)
    assert stopped["device_id"] == device_id
    assert stopped["admission"] == "active"
    assert stopped["broker"] == "broker.example.com:8883"
    assert stopped["certificate"]["subject"] == device_id
    assert 29 < stopped["certificate"]["expires_in_days"] <= 30
    assert stopped["seq_reserved"] == 200
    assert stopped["config_version"] == 7
    assert stopped["installed_bundle"]["version"] == "1.1.0"
    assert stopped["previous_bundle"]["version"] == "1.0.0"
    assert stopped["live"] == {
        "running": False,
        "reason": "not running (no status file: never started by this version)",
        "pid": None,
        "status_written_at": None,
        "connected": None,
        "buffered": None,
        "dropped": None,
        "last_seq": None,
        "last_seq_at": None,
    }
    assert stopped["problems"] == []

    counters = Counters(device_id=device_id, connected=True, buffered=3, dropped=0, last_seq=41)
    reporter = asyncio.create_task(StatusReporter(state_dir, lambda: counters, poll_s=0.05).run())
    try:
        for _ in range(100):
            if (state_dir / STATUS_FILE).exists():
                break
            await asyncio.sleep(0.05)
        assert (state_dir / STATUS_FILE).stat().st_mode & 0o777 == 0o600
        counters.last_seq, counters.buffered = 42, 0
        await asyncio.sleep(0.3)
        running = json.loads((await asyncio.to_thread(_status, state_dir, "--json")).stdout)
        assert running["live"]["running"] is True
        assert running["live"]["connected"] is True
        assert running["live"]["buffered"] == 0
        assert running["live"]["last_seq"] == 42
        text = (await asyncio.to_thread(_status, state_dir)).stdout
        assert f"device id:          {device_id}" in text
        assert "broker connection:  connected" in text
        assert "last heartbeat:     seq 42 at " in text
        assert "installed bundle:   app 1.1.0 (bundle b-2" in text
        assert "previous bundle:    app 1.0.0 (bundle b-1" in text
        assert "config version:     7" in text
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)

    after = json.loads(_status(state_dir, "--json").stdout)["live"]
    assert after["running"] is False
    assert after["reason"].startswith("not running (stopped at ")
    assert after["connected"] is None, "a stopped agent's connection is unknown, not its last value"
    assert after["last_seq"] == 42, "the last heartbeat recorded stays known"
    assert "buffered messages:  unknown (agent not running)" in _status(state_dir).stdout


def test_status_tells_a_dead_or_silent_agent_from_a_running_one(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir(mode=0o700)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    now = datetime.now(UTC)
    live = LiveStatus(pid=int(gone.stdout), agent_version="0", started_at=now, written_at=now, connected=True)
    write_live_status(state_dir, live)
    dead = json.loads(_status(state_dir, "--json").stdout)["live"]
    assert dead["running"] is False
    assert "is gone; it did not stop cleanly" in dead["reason"]
    assert dead["connected"] is None

    stale = live.model_copy(update={"pid": os.getpid(), "written_at": now - timedelta(minutes=10)})
    write_live_status(state_dir, stale)
    silent = json.loads(_status(state_dir, "--json").stdout)["live"]
    assert silent["running"] is False
    assert "has not written its status for" in silent["reason"]

    (state_dir / STATUS_FILE).write_text("{not json")
    corrupt = json.loads(_status(state_dir, "--json").stdout)
    assert corrupt["live"]["reason"] == "unknown: the status file is corrupt"
    assert any("status.json is corrupt" in problem for problem in corrupt["problems"])


# --- check against test servers ---------------------------------------------------------------


@asynccontextmanager
async def http_server(
    *, skew: timedelta = timedelta(0), tls: ssl.SSLContext | None = None, status: int = 200
) -> AsyncIterator[int]:
    """A minimal HTTP server answering every request with `status` and a Date header `skew` off."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            date = format_datetime(datetime.now(UTC) + skew, usegmt=True)
            body = b'{"status":"ok"}'
            writer.write(
                f"HTTP/1.1 {status} X\r\nDate: {date}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the check's TLS handshake may fail on purpose: nothing to answer then
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _check(*args: str) -> tuple[int, dict[str, dict[str, str]]]:
    proc = await asyncio.create_subprocess_exec(
        KERNEX,
        "agent",
        "check",
        "--json",
        *args,
        env=_agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    report = json.loads(out) if out else {"checks": [], "stderr": err.decode()}
    return proc.returncode, {c["name"]: c for c in report["checks"]}


async def test_check_names_dns_and_refused_connections(tmp_path: Path) -> None:
    code, checks = await _check("--api", "http://kernex-test.invalid:8000", "--state-dir", str(tmp_path))
    assert code == 1
    assert checks["api dns"]["verdict"] == "fail"
    assert "cannot resolve kernex-test.invalid" in checks["api dns"]["message"]
    assert "api" not in checks, "no HTTP attempt after DNS failed"

    async with http_server() as port:
        pass  # the port is closed again: nothing listens there now
    code, checks = await _check("--api", f"http://127.0.0.1:{port}", "--state-dir", str(tmp_path))
    assert code == 1
    assert checks["api"]["message"].startswith(
        f"connection refused at 127.0.0.1:{port}: nothing listens there"
    )
    assert checks["broker"]["verdict"] == "skip"

    async with http_server(status=404) as port:
        code, checks = await _check("--api", f"http://127.0.0.1:{port}", "--state-dir", str(tmp_path))
    assert code == 1
    assert "answered HTTP 404: is api_url the Kernex API" in checks["api"]["message"]


@pytest.mark.parametrize(
    ("skew", "verdict", "fragment", "code"),
    [
        (timedelta(0), "ok", "of the API's clock", 0),
        (timedelta(seconds=-90), "warn", "s ahead of the API's: is NTP running", 0),
        (
            timedelta(hours=1),
            "fail",
            "s behind the API's: heartbeats will be rejected (reason clock_skew)",
            1,
        ),
        (timedelta(hours=-2), "fail", "s ahead of the API's", 1),
    ],
)
async def test_check_measures_clock_skew_against_the_api_date(
    tmp_path: Path, skew: timedelta, verdict: str, fragment: str, code: int
) -> None:
    async with http_server(skew=skew) as port:
        returncode, checks = await _check("--api", f"http://127.0.0.1:{port}", "--state-dir", str(tmp_path))
    assert checks["api"]["verdict"] == "ok"
    assert checks["clock"]["verdict"] == verdict, checks["clock"]
    assert fragment in checks["clock"]["message"]
    assert returncode == code


async def test_check_refuses_an_api_certificate_from_a_foreign_ca(tmp_path: Path) -> None:
    ours = FleetPKI(tmp_path / "ours", TEST_PKI_PASSPHRASE)
    foreign = FleetPKI(tmp_path / "foreign", TEST_PKI_PASSPHRASE)
    await asyncio.to_thread(ours.init)
    await asyncio.to_thread(foreign.init, ("localhost", "127.0.0.1"))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(foreign.broker_cert_path, foreign.broker_key_path)
    async with http_server(tls=server_tls) as port:
        api = f"https://127.0.0.1:{port}"
        config = tmp_path / "agent.toml"
        config.write_text(f'api_url = "{api}"\napi_ca_file = "{ours.ca_cert_path}"\n')
        code, checks = await _check("--config", str(config), "--state-dir", str(tmp_path))
        assert code == 1
        message = checks["api"]["message"]
        assert message.startswith(f"the TLS certificate of 127.0.0.1:{port} is not trusted: ")
        assert "unable to get local issuer certificate" in message
        assert "Set api_ca_file to the CA that signed it" in message

        config.write_text(f'api_url = "{api}"\napi_ca_file = "{foreign.ca_cert_path}"\n')
        code, checks = await _check("--config", str(config), "--state-dir", str(tmp_path))
        assert checks["api"]["verdict"] == "ok", checks["api"]
        assert code == 0
