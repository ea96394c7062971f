"""Errors of the storage layer."""

from kernex.protocol.exceptions import KernexError


class StorageError(KernexError):
    """Root of storage errors."""


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or refused the connection."""


class MigrationError(StorageError):
    """Applying schema migrations failed."""


class WriteError(StorageError):
    """Committing a batch of device messages failed; nothing of it was stored."""
