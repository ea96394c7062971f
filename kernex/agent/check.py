"""`kernex agent check`: are the settings right, and can this device reach the API and the broker?

Each check ends in one verdict with a message that names the cause an operator can act on: the
host does not resolve (DNS), nothing listens (connection refused), the TLS certificate is not
trusted (which CA, which name), the device clock is off (compared with the API's `Date` header),
the broker refuses the device certificate, the certificate expired. The broker is checked with
the device's own certificate under a separate MQTT client id (`<device id>-check`), so a
running agent's session is not taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from pydantic import ValidationError

from kernex.agent.http import api_client
from kernex.agent.identity import KEY_FILE
from kernex.agent.settings import AgentSettings
from kernex.agent.state import CA_FILE, CERT_FILE, STATE_FILE, AgentState
from kernex.protocol.messages import RegistrationResponse
from kernex.protocol.version import IncompatibleVersionError, check_server

HEALTH_PATH = "/healthz"
# Ingest rejects messages dated more than KERNEX_MAX_FUTURE_SKEW_S (300 s) ahead, and the fleet
# CA backdates certificates by 5 minutes: beyond this the device visibly breaks.
CLOCK_SKEW_FAIL_S = 300.0
CLOCK_SKEW_WARN_S = 30.0  # NTP keeps clocks within milliseconds; 30 s means it is not running
CERT_EXPIRY_WARNING = timedelta(days=7)
CHECK_CLIENT_SUFFIX = "-check"  # the broker check's MQTT client id: never the agent's own
MQTT_CHECK_TIMEOUT_S = 10.0
HTTP_PORTS = {"http": 80, "https": 443}


class Verdict(StrEnum):
    """The outcome of one check."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    name: str
    verdict: Verdict
    message: str


@dataclass(frozen=True, slots=True)
class _Local:
    """What the state dir holds, read before any network check (off the event loop)."""

    registration: RegistrationResponse | None
    problem: str | None
    certificate: x509.Certificate | None
    ca: x509.Certificate | None
    key_path: Path
    has_key: bool


async def run_checks(settings: AgentSettings) -> list[Check]:
    """Every check, in order; network checks are skipped when what they need is missing."""
    source = (
        f"config file {settings.config}" if settings.config else "no config file (environment and defaults)"
    )
    results = [Check("settings", Verdict.OK, f"valid; {source}")]
    local = await asyncio.to_thread(_read_local, settings)
    results += _local_checks(settings, local)
    results += await _api_checks(settings)
    results += await _broker_checks(settings, local)
    return results


def failed(results: list[Check]) -> bool:
    """True when any check failed."""
    return any(result.verdict is Verdict.FAIL for result in results)


# --- local ------------------------------------------------------------------------------------


def _read_local(settings: AgentSettings) -> _Local:
    state_dir = settings.state_dir
    registration: RegistrationResponse | None = None
    problem: str | None = None
    try:
        registration = AgentState.model_validate_json((state_dir / STATE_FILE).read_bytes()).registration
    except FileNotFoundError:
        pass
    except OSError as exc:
        problem = (
            f"cannot read {state_dir / STATE_FILE}: {exc.strerror or exc} (run as the agent's user or root)"
        )
    except ValidationError as exc:
        problem = f"{state_dir / STATE_FILE} is corrupt ({exc.error_count()} errors)"
    return _Local(
        registration=registration,
        problem=problem,
        certificate=_load_certificate(state_dir / CERT_FILE),
        ca=_load_certificate(state_dir / CA_FILE),
        key_path=state_dir / KEY_FILE,
        has_key=(state_dir / KEY_FILE).exists(),
    )


def _load_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None  # reported by the checks that need it


def _local_checks(settings: AgentSettings, local: _Local) -> list[Check]:
    results: list[Check] = []
    if local.problem is not None:
        results.append(Check("state", Verdict.FAIL, local.problem))
    elif not settings.state_dir.exists():
        results.append(
            Check("state", Verdict.WARN, f"{settings.state_dir} does not exist yet (made at first start)")
        )
    elif local.registration is None:
        key = "a device key exists" if local.has_key else "no device key yet"
        results.append(
            Check("state", Verdict.WARN, f"not registered yet ({key}): start the agent to register")
        )
    else:
        registration = local.registration
        status = registration.status
        verdict = (
            Verdict.OK
            if status == "active"
            else Verdict.FAIL
            if status in {"rejected", "revoked"}
            else Verdict.WARN
        )
        note = {
            "pending": ": an operator must accept it (kernex devices accept, or the dashboard)",
            "rejected": ": the platform refused this device",
            "revoked": ": the platform revoked this device; it needs a new key to enrol again",
        }.get(status, "")
        results.append(Check("registration", verdict, f"device {registration.device_id} is {status}{note}"))
        try:
            check_server(registration.protocol_version, registration.min_protocol_version)
        except IncompatibleVersionError as exc:
            results.append(Check("protocol", Verdict.FAIL, str(exc)))
        else:
            results.append(
                Check("protocol", Verdict.OK, f"server protocol {registration.protocol_version} is supported")
            )
        results.append(_certificate_check(local))
    return results


def _certificate_check(local: _Local) -> Check:
    cert, ca = local.certificate, local.ca
    if cert is None or ca is None:
        return Check(
            "certificate", Verdict.FAIL, "device.crt or ca.crt is missing or unreadable in the state dir"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Check("certificate", Verdict.FAIL, "device.crt was not issued by the fleet CA in ca.crt")
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        return Check(
            "certificate",
            Verdict.FAIL,
            f"device.crt is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
            "the device clock is behind (enable NTP: timedatectl set-ntp true)",
        )
    left = cert.not_valid_after_utc - now
    expires = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if left <= timedelta(0):
        return Check(
            "certificate", Verdict.FAIL, f"device.crt expired on {expires}: the broker will refuse it"
        )
    if left < CERT_EXPIRY_WARNING:
        return Check("certificate", Verdict.WARN, f"device.crt expires on {expires} ({left.days} days left)")
    return Check("certificate", Verdict.OK, f"device.crt valid until {expires}")


# --- API --------------------------------------------------------------------------------------


async def _api_checks(settings: AgentSettings) -> list[Check]:
    url = urlsplit(settings.api_url)
    host = url.hostname or ""
    port = url.port or HTTP_PORTS[url.scheme]
    results: list[Check] = []
    if settings.proxy is None:
        # Through a proxy the proxy resolves the API's name; the HTTP check below covers both.
        dns = await _resolve("api dns", host, port, settings.api_timeout_s)
        results.append(dns)
        if dns.verdict is Verdict.FAIL:
            return results
    else:
        proxy = urlsplit(settings.proxy)
        proxy_port = proxy.port or HTTP_PORTS[proxy.scheme]
        dns = await _resolve("proxy dns", proxy.hostname or "", proxy_port, settings.api_timeout_s)
        results.append(dns)
        if dns.verdict is Verdict.FAIL:
            return results
    client = await asyncio.to_thread(api_client, settings)
    async with client:
        started = time.monotonic()
        try:
            response = await client.get(settings.api_url + HEALTH_PATH)
        except httpx.TimeoutException:
            results.append(
                Check(
                    "api",
                    Verdict.FAIL,
                    f"no answer from {settings.api_url} within {settings.api_timeout_s:g} s",
                )
            )
            return results
        except httpx.TransportError as exc:
            results.append(Check("api", Verdict.FAIL, _transport_problem(exc, host, port, "the API")))
            return results
        received = datetime.now(UTC)
    elapsed_ms = (time.monotonic() - started) * 1000
    if response.status_code != httpx.codes.OK:
        results.append(
            Check(
                "api",
                Verdict.FAIL,
                f"GET {HEALTH_PATH} answered HTTP {response.status_code}: is api_url the Kernex API "
                "(scheme, host and port only, no path)?",
            )
        )
    else:
        via = f" via proxy {settings.proxy}" if settings.proxy else ""
        results.append(Check("api", Verdict.OK, f"{settings.api_url} answers ({elapsed_ms:.0f} ms{via})"))
    results.append(_clock_check(response.headers.get("date"), received, elapsed_ms / 1000))
    return results


def _clock_check(date_header: str | None, received: datetime, round_trip_s: float) -> Check:
    if date_header is None:
        return Check("clock", Verdict.SKIP, "the API sent no Date header to compare the clock with")
    try:
        server_time = parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return Check("clock", Verdict.SKIP, f"the API's Date header {date_header!r} does not parse")
    if server_time.tzinfo is None:
        server_time = server_time.replace(tzinfo=UTC)
    # The header has 1 s resolution and was stamped somewhere within the round trip.
    skew = (received - server_time).total_seconds()
    tolerance = 1.0 + round_trip_s
    magnitude = max(abs(skew) - tolerance, 0.0)
    direction = "ahead of" if skew > 0 else "behind"
    if magnitude > CLOCK_SKEW_FAIL_S:
        return Check(
            "clock",
            Verdict.FAIL,
            f"the device clock is {abs(skew):.0f} s {direction} the API's: heartbeats will be rejected "
            "(reason clock_skew) and certificates may look expired or not yet valid; "
            "enable NTP (timedatectl set-ntp true)",
        )
    if magnitude > CLOCK_SKEW_WARN_S:
        return Check(
            "clock",
            Verdict.WARN,
            f"the device clock is {abs(skew):.0f} s {direction} the API's: is NTP running (timedatectl)?",
        )
    return Check("clock", Verdict.OK, f"within {max(abs(skew), tolerance):.0f} s of the API's clock")


# --- broker -----------------------------------------------------------------------------------


async def _broker_checks(settings: AgentSettings, local: _Local) -> list[Check]:
    registration = local.registration
    if registration is None or registration.status != "active" or local.certificate is None:
        return [Check("broker", Verdict.SKIP, "no active registration yet: the broker address comes with it")]
    host, port = registration.mqtt.host, registration.mqtt.port
    dns = await _resolve("broker dns", host, port, settings.api_timeout_s)
    if dns.verdict is Verdict.FAIL:
        return [dns]
    try:
        context = await asyncio.to_thread(_broker_tls_context, settings.state_dir, local.key_path)
    except (OSError, ssl.SSLError) as exc:
        return [dns, Check("broker tls", Verdict.FAIL, f"cannot load the device certificate and key: {exc}")]
    tls = await _tls_handshake(host, port, context, settings.api_timeout_s)
    if tls.verdict is Verdict.FAIL:
        return [dns, tls]
    return [dns, tls, await _mqtt_connect(host, port, context, registration.device_id)]


def _broker_tls_context(state_dir: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(state_dir / CA_FILE))
    context.load_cert_chain(str(state_dir / CERT_FILE), str(key_path))
    return context


async def _tls_handshake(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> Check:
    try:
        async with asyncio.timeout(timeout_s):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
    except TimeoutError:
        return Check(
            "broker tls", Verdict.FAIL, f"no TLS handshake with {host}:{port} within {timeout_s:g} s"
        )
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "broker tls",
            Verdict.FAIL,
            f"the broker's certificate at {host}:{port} is not trusted by this device's fleet CA (ca.crt): "
            f"{exc.verify_message}. A broker of another fleet, or a platform restored without its CA?",
        )
    except ssl.SSLError as exc:
        return Check(
            "broker tls", Verdict.FAIL, f"TLS with the broker at {host}:{port} failed: {exc.reason or exc}"
        )
    except OSError as exc:
        return Check("broker tls", Verdict.FAIL, _socket_problem(exc, host, port, "the broker"))
    writer.close()
    # The handshake succeeded; how the check's own connection then closes does not matter.
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return Check("broker tls", Verdict.OK, f"{host}:{port} presents a certificate of this device's fleet CA")


async def _mqtt_connect(host: str, port: int, context: ssl.SSLContext, device_id: str) -> Check:
    client = aiomqtt.Client(
        host,
        port,
        identifier=device_id + CHECK_CLIENT_SUFFIX,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        timeout=MQTT_CHECK_TIMEOUT_S,
        clean_start=True,
    )
    try:
        async with client:
            pass
    except aiomqtt.MqttError as exc:
        return Check(
            "broker",
            Verdict.FAIL,
            f"the broker at {host}:{port} refused this device's MQTT connection: {exc} "
            "(certificate revoked, or a broker of another fleet?)",
        )
    return Check("broker", Verdict.OK, f"MQTT over mutual TLS to {host}:{port} accepted as {device_id}")


# --- shared -----------------------------------------------------------------------------------


async def _resolve(name: str, host: str, port: int, timeout_s: float) -> Check:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        return Check(
            name, Verdict.FAIL, f"resolving {host} took longer than {timeout_s:g} s: is DNS reachable?"
        )
    except socket.gaierror as exc:
        return Check(
            name, Verdict.FAIL, f"cannot resolve {host}: {exc.strerror} (check the name and /etc/resolv.conf)"
        )
    addresses = sorted({str(info[4][0]) for info in infos})
    return Check(name, Verdict.OK, f"{host} resolves to {', '.join(addresses)}")


def _transport_problem(exc: httpx.TransportError, host: str, port: int, what: str) -> str:
    chain = _causes(exc)
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"the TLS certificate of {host}:{port} is not trusted: {cause.verify_message}. "
                "Set api_ca_file to the CA that signed it, or check the host name and the clock"
            )
    for cause in chain:
        if isinstance(cause, ssl.SSLError):
            return f"TLS with {host}:{port} failed: {cause.reason or cause} (is it an https port?)"
    if isinstance(exc, httpx.ProxyError):
        return f"the proxy refused or failed the request: {exc}"
    # The innermost OS error says what happened (refused, unreachable); outer ones summarise.
    for cause in reversed(chain):
        if isinstance(cause, OSError):
            return _socket_problem(cause, host, port, what)
    return f"cannot reach {what} at {host}:{port}: {exc}"


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first (httpx wraps the socket error several times)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _socket_problem(exc: OSError, host: str, port: int, what: str) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {host}:{port}: nothing listens there (wrong port, or {what} is down)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {exc.strerror}"
    return f"cannot connect to {what} at {host}:{port}: {exc.strerror or exc}"
