"""The agent's persisted state: registration result, seq reservation, running bundle and config,
and what it did with commands (the revision of each kind it took up, the deploy under way).

One JSON file written atomically (mode 0600). The certificate and CA also live as PEM files,
because TLS libraries take paths. A corrupt state file stops the agent instead of being reset:
starting over would reuse sequence numbers that ingest has already stored.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernex.agent.exceptions import StateError
from kernex.agent.files import ensure_private_dir, write_atomic
from kernex.protocol.commands import DeploymentStage
from kernex.protocol.messages import BIGINT_MAX, BundleRef, CommandKey, RegistrationResponse

STATE_FILE = "state.json"
CERT_FILE = "device.crt"
CA_FILE = "ca.crt"
STATE_VERSION = 1  # bump with a migration when the layout changes


class DeployRecord(BaseModel):
    """A deploy command the agent took up, kept until the broker has its outcome.

    Written before the installation starts (with the command's revision, in the same write), so
    a crash can never make the agent run it again: at the next start the installer's recovery
    settles it and the outcome is reported instead. `stage` is set (terminal) once it ended.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    command_id: str
    revision: Annotated[int, Field(ge=1, le=BIGINT_MAX)]
    deployment_id: str
    bundle_id: str
    version: str
    stage: DeploymentStage | None = None
    error: str | None = None
    output: str | None = None
    current_version: str | None = None


class PinnedKeys(BaseModel):
    """The control-plane keys taken up from a signed key set, and that set's version."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Annotated[int, Field(ge=0, le=BIGINT_MAX)]
    keys: list[CommandKey]


class AgentState(BaseModel):
    """Everything the agent must remember across restarts."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = STATE_VERSION
    registration: RegistrationResponse | None = None
    # Every seq below this may have been used already; a restarted agent continues from here.
    seq_reserved: Annotated[int, Field(ge=0, le=BIGINT_MAX)] = 0
    bundle: BundleRef | None = None
    config_version: Annotated[int, Field(ge=0)] | None = None
    # The applied configuration: typed settings as applied, unknown keys kept as received.
    config: dict[str, Any] | None = None
    # Per command kind, the highest revision taken up; lower or equal ones are never run.
    revisions: dict[str, Annotated[int, Field(ge=0, le=BIGINT_MAX)]] = Field(default_factory=dict)
    deploy: DeployRecord | None = None
    # The newest signed command key set taken up; None: the keys pinned at registration.
    command_keys: PinnedKeys | None = None


class StateStore:
    """Holds the current state in memory and persists every change before it takes effect."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self.cert_path = state_dir / CERT_FILE
        self.ca_path = state_dir / CA_FILE
        self._state = AgentState()
        # Serialises writers so a slow write can never overwrite a newer state.
        self._lock = asyncio.Lock()

    @property
    def state(self) -> AgentState:
        """The current state (immutable: replace it through the store)."""
        return self._state

    async def load(self) -> AgentState:
        """Read the state file (a missing file is a fresh device) and restore the TLS files."""
        async with self._lock:
            self._state = await asyncio.to_thread(self._read)
            return self._state

    async def update(self, **changes: Any) -> AgentState:
        """Validate and persist the changed fields; the new state is current once it is on disk."""
        async with self._lock:
            try:
                new = AgentState.model_validate({**self._state.model_dump(), **changes})
            except ValidationError as exc:
                raise StateError(f"invalid agent state change: {exc}") from None
            await asyncio.to_thread(self._write, new)
            self._state = new
            return new

    async def save_registration(self, registration: RegistrationResponse) -> AgentState:
        """Persist a registration result together with its certificate files."""
        return await self.update(registration=registration)

    def _read(self) -> AgentState:
        try:
            ensure_private_dir(self.state_dir)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        except OSError as exc:
            raise StateError(f"cannot read agent state {self.path}: {exc}") from None
        try:
            state = AgentState.model_validate_json(raw)
        except ValidationError as exc:
            raise StateError(f"agent state {self.path} is corrupt ({exc.error_count()} errors)") from None
        if state.version != STATE_VERSION:
            raise StateError(f"agent state {self.path} has version {state.version}, expected {STATE_VERSION}")
        self._write_tls_files(state, only_missing=True)
        return state

    def _write(self, state: AgentState) -> None:
        try:
            ensure_private_dir(self.state_dir)
            self._write_tls_files(state, only_missing=False)
            write_atomic(self.path, state.model_dump_json(indent=2).encode("utf-8"))
        except OSError as exc:
            raise StateError(f"cannot write agent state {self.path}: {exc}") from None

    def _write_tls_files(self, state: AgentState, *, only_missing: bool) -> None:
        registration = state.registration
        if registration is None:
            return
        wanted = {self.ca_path: registration.ca_certificate, self.cert_path: registration.certificate}
        for path, pem in wanted.items():
            if pem is None or (only_missing and path.exists()):
                continue
            data = pem.encode("ascii")
            if not path.exists() or path.read_bytes() != data:
                write_atomic(path, data)
