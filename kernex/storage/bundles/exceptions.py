"""Errors of the bundle stores."""

from kernex.storage.exceptions import StorageError


class BundleStoreError(StorageError):
    """The store failed or cannot be reached (S3 down, disk full, permission denied)."""


class StoredObjectMissingError(BundleStoreError):
    """No object is stored under the key."""


class StoredObjectCorruptError(BundleStoreError):
    """The stored bytes are not what was written (an AES-GCM tag failed, a file was truncated)."""
