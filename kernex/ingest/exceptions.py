"""Errors of the ingest worker."""

from kernex.protocol.exceptions import KernexError


class IngestError(KernexError):
    """Root of the errors the ingest worker raises."""


class IngestConfigError(IngestError):
    """The worker cannot start: missing service certificate, bad topic prefix, ..."""


class BrokerConnectionError(IngestError):
    """The first connection to the broker failed (later drops are retried, not raised)."""


class WriteError(IngestError):
    """Committing a batch failed; the batch was not acknowledged and will be retried."""
