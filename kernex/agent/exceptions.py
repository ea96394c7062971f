"""Errors the agent raises on purpose; each one stops the agent (transient faults are retried)."""

from kernex.protocol.exceptions import KernexError


class AgentError(KernexError):
    """Root of the agent's errors."""


class IdentityError(AgentError):
    """The device key cannot be created or loaded (unreadable file, corrupt PEM, ...)."""


class StateError(AgentError):
    """The persisted agent state cannot be read or written."""


class RegistrationError(AgentError):
    """The control plane refused the registration for good (a 4xx other than 408/429)."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class DeviceRefusedError(RegistrationError):
    """The control plane answered that this device is rejected or revoked."""


class IdentityMismatchError(RegistrationError):
    """The control plane named a different device id than our key derives: never trust that answer."""


class IncompatibleServerError(RegistrationError):
    """The control plane speaks a protocol version this agent cannot work with (see the message)."""
