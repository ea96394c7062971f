"""Errors of the ingest worker."""

from kernex.protocol.exceptions import KernexError
from kernex.storage.exceptions import WriteError

# WriteError is the storage writer's (kernex.storage.writer); re-exported for the worker.
__all__ = ["BrokerConnectionError", "IngestConfigError", "IngestError", "WriteError"]


class IngestError(KernexError):
    """Root of the errors the ingest worker raises."""


class IngestConfigError(IngestError):
    """The worker cannot start: missing service certificate, bad topic prefix, ..."""


class BrokerConnectionError(IngestError):
    """The first connection to the broker failed (later drops are retried, not raised)."""
