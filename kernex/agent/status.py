"""`kernex agent status`: what an agent is, from its state dir, and what it is doing, from a status file.

The persisted facts (identity, registration, certificate, seq reservation, installed bundles,
config version) come from the files the agent keeps anyway. The live ones (running, connected,
buffered messages, last heartbeat) come from `status.json`, which a running agent rewrites
through `StatusReporter` whenever they change and at least every `REFRESH_S`. A status file that
is older than `STALE_AFTER_S`, or whose process is gone, means "not running": its live values are
then shown as unknown, never as current.

Reading is read-only: `kernex agent status` never creates, tightens or rewrites a file.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from kernex import __version__
from kernex.agent.bundles.errors import BundleStorageError
from kernex.agent.bundles.layout import BundlePaths, Installed, VersionRecord
from kernex.agent.files import PRIVATE_FILE_MODE
from kernex.agent.identity import KEY_FILE
from kernex.agent.settings import AgentSettings
from kernex.agent.state import CERT_FILE, STATE_FILE, AgentState
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import InvalidKeyError
from kernex.protocol.keys import device_id_for, load_private_key_pem

STATUS_FILE = "status.json"
POLL_S = 1.0  # how often the reporter looks at the agent's counters (in memory: cheap)
# A status file is rewritten at least this often, so a reader can tell a hung or killed agent from
# a quiet one; changes are written at once. Not fsynced: it is rebuilt at every start, and flash
# storage on a device should not pay a sync per heartbeat for it.
REFRESH_S = 30.0
STALE_AFTER_S = 3 * REFRESH_S  # two missed refreshes: the agent is not running (or is stuck)
CERT_EXPIRY_WARNING = timedelta(days=7)  # device certificates live 30 days by default

log = get_logger(__name__)


class AgentCounters(Protocol):
    """What the reporter reads from a running agent (kernex.agent.agent.AgentStats fits)."""

    @property
    def device_id(self) -> str | None: ...
    @property
    def connected(self) -> bool: ...
    @property
    def buffered(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def last_seq(self) -> int | None: ...


class LiveStatus(BaseModel):
    """The content of status.json."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    pid: int
    agent_version: str
    started_at: AwareDatetime
    written_at: AwareDatetime
    stopped_at: AwareDatetime | None = None
    device_id: str | None = None
    connected: bool = False
    buffered: Annotated[int, Field(ge=0)] = 0
    dropped: Annotated[int, Field(ge=0)] = 0
    # The last seq the agent used (heartbeats and events share the counter) and when it was seen.
    last_seq: int | None = None
    last_seq_at: AwareDatetime | None = None


def write_live_status(state_dir: Path, status: LiveStatus) -> None:
    """Replace status.json (mode 0600) atomically; a reader sees the old file or the new one. Blocking."""
    path = state_dir / STATUS_FILE
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(status.model_dump_json(indent=2).encode("utf-8"))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_live_status(state_dir: Path) -> LiveStatus | None:
    """The status file, or None when there is none. Raises OSError or ValidationError. Blocking."""
    try:
        raw = (state_dir / STATUS_FILE).read_bytes()
    except FileNotFoundError:
        return None
    return LiveStatus.model_validate_json(raw)


class StatusReporter:
    """Keeps status.json in step with a running agent: `await StatusReporter(dir, lambda: agent.stats).run()`.

    Runs beside the agent until cancelled; on cancellation it writes a last snapshot marked stopped.
    """

    def __init__(
        self,
        state_dir: Path,
        counters: Callable[[], AgentCounters],
        *,
        poll_s: float = POLL_S,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self._state_dir = state_dir
        self._counters = counters
        self._poll_s = poll_s
        self._refresh_s = refresh_s
        self._started_at = datetime.now(UTC)
        self._last_seq: int | None = None
        self._last_seq_at: datetime | None = None

    def snapshot(self, *, stopped: bool = False) -> LiveStatus:
        """The live status now (noting when the last seq was first seen)."""
        counters = self._counters()
        now = datetime.now(UTC)
        if counters.last_seq is not None and counters.last_seq != self._last_seq:
            self._last_seq, self._last_seq_at = counters.last_seq, now
        return LiveStatus(
            pid=os.getpid(),
            agent_version=__version__,
            started_at=self._started_at,
            written_at=now,
            stopped_at=now if stopped else None,
            device_id=counters.device_id,
            connected=counters.connected and not stopped,
            buffered=counters.buffered,
            dropped=counters.dropped,
            last_seq=self._last_seq,
            last_seq_at=self._last_seq_at,
        )

    async def run(self) -> None:
        """Write on change and every refresh period until cancelled, then write the stopped snapshot."""
        loop = asyncio.get_running_loop()
        written: LiveStatus | None = None
        written_mono = 0.0
        try:
            while True:
                current = self.snapshot()
                if current.device_id is None:
                    # The identity is not loaded yet, so the state dir may not exist yet either.
                    await asyncio.sleep(self._poll_s)
                    continue
                changed = written is None or _live_fields(current) != _live_fields(written)
                if changed or loop.time() - written_mono >= self._refresh_s:
                    await self._write(current)
                    written, written_mono = current, loop.time()
                await asyncio.sleep(self._poll_s)
        except asyncio.CancelledError:
            if written is not None:
                # The file must not claim a connection the agent no longer holds.
                await asyncio.shield(self._write(self.snapshot(stopped=True)))
            raise

    async def _write(self, status: LiveStatus) -> None:
        try:
            await asyncio.to_thread(write_live_status, self._state_dir, status)
        except OSError as exc:
            # Status is for humans: a full disk must not stop the agent, but it must be visible.
            log.warning(
                "cannot write the status file", path=str(self._state_dir / STATUS_FILE), error=str(exc)
            )


def _live_fields(status: LiveStatus) -> tuple[object, ...]:
    return (status.device_id, status.connected, status.buffered, status.dropped, status.last_seq)


# --- reading ----------------------------------------------------------------------------------


class Certificate(BaseModel):
    """The device certificate, as `status` reports it."""

    subject: str
    not_after: AwareDatetime
    expires_in_days: float
    expired: bool


class BundleInfo(BaseModel):
    """An installed bundle version."""

    name: str
    version: str
    bundle_id: str
    installed_at: AwareDatetime


class Live(BaseModel):
    """What the running agent last said; every field None when that is unknown."""

    running: bool
    reason: str
    pid: int | None = None
    status_written_at: AwareDatetime | None = None
    connected: bool | None = None
    buffered: int | None = None
    dropped: int | None = None
    last_seq: int | None = None
    last_seq_at: AwareDatetime | None = None


class StatusReport(BaseModel):
    """Everything `kernex agent status` shows (its --json form)."""

    state_dir: str
    config_file: str | None
    api_url: str
    device_id: str | None
    admission: str
    certificate: Certificate | None
    broker: str | None
    live: Live
    seq_reserved: int
    reported_bundle: str | None
    installed_bundle: BundleInfo | None
    previous_bundle: BundleInfo | None
    bundle_install_pending: BundleInfo | None
    config_version: int | None
    problems: list[str]


def collect(settings: AgentSettings, *, now: datetime | None = None) -> StatusReport:
    """Read the state dir of the agent these settings describe. Blocking (file reads)."""
    now = now or datetime.now(UTC)
    state_dir = settings.state_dir
    problems: list[str] = []
    state = _read_state(state_dir, problems)
    registration = state.registration if state else None
    certificate = _read_certificate(state_dir / CERT_FILE, now, problems)
    device_id = registration.device_id if registration else _device_id_from_key(state_dir, problems)
    installed = _read_installed(state_dir, problems)
    bundle = state.bundle if state else None
    return StatusReport(
        state_dir=str(state_dir),
        config_file=str(settings.config) if settings.config else None,
        api_url=settings.api_url,
        device_id=device_id,
        admission=registration.status if registration else "not registered",
        certificate=certificate,
        broker=f"{registration.mqtt.host}:{registration.mqtt.port}" if registration else None,
        live=_read_live(state_dir, now, problems),
        seq_reserved=state.seq_reserved if state else 0,
        reported_bundle=f"{bundle.id} {bundle.version}" if bundle else None,
        installed_bundle=_bundle(installed.current) if installed else None,
        previous_bundle=_bundle(installed.previous) if installed else None,
        bundle_install_pending=_bundle(installed.pending) if installed else None,
        config_version=state.config_version if state else None,
        problems=problems,
    )


def _read_state(state_dir: Path, problems: list[str]) -> AgentState | None:
    path = state_dir / STATE_FILE
    if not state_dir.is_dir():
        problems.append(f"state dir {state_dir} does not exist (the agent has not started yet?)")
        return None
    try:
        return AgentState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return AgentState()
    except OSError as exc:
        problems.append(f"cannot read {path}: {exc.strerror or exc} (run as the agent's user or root)")
    except ValidationError as exc:
        problems.append(f"{path} is corrupt ({exc.error_count()} errors)")
    return None


def _read_certificate(path: Path, now: datetime, problems: list[str]) -> Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"cannot read {path}: {exc.strerror or exc}")
        return None
    except ValueError as exc:
        problems.append(f"{path} is not a PEM certificate: {exc}")
        return None
    left = cert.not_valid_after_utc - now
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string()
    if left <= timedelta(0):
        problems.append(f"the device certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    elif left < CERT_EXPIRY_WARNING:
        problems.append(f"the device certificate expires in {left.total_seconds() / 86400:.1f} days")
    return Certificate(
        subject=subject,
        not_after=cert.not_valid_after_utc,
        expires_in_days=round(left.total_seconds() / 86400, 2),
        expired=left <= timedelta(0),
    )


def _device_id_from_key(state_dir: Path, problems: list[str]) -> str | None:
    path = state_dir / KEY_FILE
    try:
        return device_id_for(load_private_key_pem(path.read_bytes()).public_key())
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"cannot read the device key {path}: {exc.strerror or exc}")
    except InvalidKeyError as exc:
        problems.append(f"the device key {path} is unusable: {exc}")
    return None


def _read_installed(state_dir: Path, problems: list[str]) -> Installed | None:
    try:
        return BundlePaths.under(state_dir).read_installed()
    except BundleStorageError as exc:
        problems.append(str(exc))
        return None


def _bundle(record: VersionRecord | None) -> BundleInfo | None:
    if record is None:
        return None
    return BundleInfo(
        name=record.name, version=record.version, bundle_id=record.bundle_id, installed_at=record.installed_at
    )


def _read_live(state_dir: Path, now: datetime, problems: list[str]) -> Live:
    try:
        status = read_live_status(state_dir)
    except OSError as exc:
        problems.append(f"cannot read {state_dir / STATUS_FILE}: {exc.strerror or exc}")
        return Live(running=False, reason="unknown: the status file is unreadable")
    except ValidationError as exc:
        problems.append(f"{state_dir / STATUS_FILE} is corrupt ({exc.error_count()} errors)")
        return Live(running=False, reason="unknown: the status file is corrupt")
    if status is None:
        return Live(running=False, reason="not running (no status file: never started by this version)")
    known = {
        "last_seq": status.last_seq,
        "last_seq_at": status.last_seq_at,
        "pid": status.pid,
        "status_written_at": status.written_at,
    }
    not_running = _not_running(status, now)
    if not_running is not None:
        return Live(running=False, reason=not_running, **known)
    return Live(
        running=True,
        reason=f"running (pid {status.pid})",
        connected=status.connected,
        buffered=status.buffered,
        dropped=status.dropped,
        **known,
    )


def _not_running(status: LiveStatus, now: datetime) -> str | None:
    """Why the status file's live values are not current, or None when they are."""
    if status.stopped_at is not None:
        return f"not running (stopped at {status.stopped_at:%Y-%m-%d %H:%M:%S} UTC)"
    if not _process_exists(status.pid):
        return f"not running (process {status.pid} is gone; it did not stop cleanly)"
    age = (now - status.written_at).total_seconds()
    if age > STALE_AFTER_S:
        return f"unknown (process {status.pid} exists but has not written its status for {age:.0f} s)"
    return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user (the agent's service user)
    return True


# --- rendering --------------------------------------------------------------------------------


def render_text(report: StatusReport) -> str:
    """The human form: one `name: value` line each, unknowns said as such."""
    live = report.live
    unknown = "unknown (agent not running)"
    cert = report.certificate
    lines = [
        ("device id", report.device_id or "none yet (no key: the agent has not started)"),
        ("admission", report.admission),
        (
            "certificate",
            "none"
            if cert is None
            else f"{cert.subject}, {'EXPIRED' if cert.expired else 'expires'} "
            f"{cert.not_after:%Y-%m-%d %H:%M} UTC ({cert.expires_in_days:.1f} days)",
        ),
        ("agent", live.reason),
        ("broker", report.broker or "unknown (not registered)"),
        (
            "broker connection",
            _yes_no(live.connected, "connected", "disconnected") if live.running else unknown,
        ),
        ("last heartbeat", _last_seq(live)),
        ("buffered messages", str(live.buffered) if live.buffered is not None else unknown),
        ("seq reserved up to", str(report.seq_reserved)),
        ("installed bundle", _bundle_text(report.installed_bundle)),
        ("previous bundle", _bundle_text(report.previous_bundle)),
        (
            "config version",
            str(report.config_version) if report.config_version is not None else "none applied",
        ),
        ("config file", report.config_file or "none (environment and defaults)"),
        ("api", report.api_url),
        ("state dir", report.state_dir),
    ]
    if report.bundle_install_pending is not None:
        lines.append(("install in progress", _bundle_text(report.bundle_install_pending)))
    width = max(len(name) for name, _ in lines)
    text = "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in lines)
    if report.problems:
        text += "\n" + "\n".join(f"problem: {problem}" for problem in report.problems)
    return text


def _yes_no(value: bool | None, yes: str, no: str) -> str:
    if value is None:
        return "unknown"
    return yes if value else no


def _last_seq(live: Live) -> str:
    if live.last_seq is None:
        return "none recorded"
    when = f" at {live.last_seq_at:%Y-%m-%d %H:%M:%S} UTC" if live.last_seq_at else ""
    return f"seq {live.last_seq}{when}"


def _bundle_text(bundle: BundleInfo | None) -> str:
    if bundle is None:
        return "none"
    installed = f"{bundle.installed_at:%Y-%m-%d %H:%M} UTC"
    return f"{bundle.name} {bundle.version} (bundle {bundle.bundle_id}, installed {installed})"
