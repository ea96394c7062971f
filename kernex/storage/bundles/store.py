"""The bundle store interface: write an object once (streamed), read any byte range, delete it.

Uploads are all-or-nothing: until `commit()` nothing is visible under the key, and `abort()`
(which `BundleStore.upload` calls on any failure, cancellation included) leaves nothing behind.
Every method is async; implementations run blocking I/O in threads, never on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

from kernex.kit.logs import get_logger
from kernex.storage.bundles.exceptions import BundleStoreError

log = get_logger(__name__)

# Read granularity: large enough to amortise a thread hop per chunk, small enough that many
# concurrent downloads stay within a few megabytes each.
CHUNK_BYTES = 1024 * 1024
# The API writes every bundle under this prefix (kernex/api/bundles/service.py); a store's sweep of
# abandoned uploads keeps to it, so it never touches what other writers of a shared bucket leave.
BUNDLE_KEY_PREFIX = "bundles/"
# An unfinished upload older than this belongs to a process that died mid-upload (kill -9, OOM, a
# lost host), never to a live one: the 1 GiB default KERNEX_MAX_BUNDLE_BYTES at 100 kbit/s still
# finishes within it. Replicas sharing a bucket cannot ask S3 whether another's upload is alive.
STALE_UPLOAD_AGE_S = 24 * 3600
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}$")


def check_key(key: str) -> str:
    """Return key if it is a safe object key (also a relative path for the filesystem store)."""
    if not _KEY_RE.match(key) or ".." in key:
        raise BundleStoreError(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class StoredObject:
    """What the store knows about an object without reading it."""

    size: int
    # Changes whenever the stored bytes may have changed (file inode/mtime, S3 ETag/LastModified):
    # a verified hash stays valid only for the version it was computed on.
    version: str


class Upload(abc.ABC):
    """An object being written. Nothing is visible until commit(); abort() removes every trace."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Append bytes."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the object visible under its key; aborts (and raises) if that fails."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything written so far. Safe to call more than once."""


class BundleStore(abc.ABC):
    """Where bundle archives live."""

    kind: ClassVar[str]

    @abc.abstractmethod
    async def start(self) -> None:
        """Check the store is usable (directories, bucket); raises BundleStoreError."""

    async def close(self) -> None:  # noqa: B027 - optional hook: stores without resources need nothing
        """Release connections."""

    @abc.abstractmethod
    async def begin(self, key: str) -> Upload:
        """Start writing an object under key."""

    @asynccontextmanager
    async def upload(self, key: str) -> AsyncIterator[Upload]:
        """Write an object: committed when the block exits normally, aborted on any exception."""
        upload = await self.begin(key)
        try:
            yield upload
        except BaseException:
            # Shielded: a second cancellation must not leave a multipart upload or temp file behind.
            await _abort_shielded(upload, key)
            raise
        await upload.commit()

    @abc.abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """The bytes [start, end) of the object (end None: to its end), in chunks."""

    @abc.abstractmethod
    async def stat(self, key: str) -> StoredObject:
        """Size and version of the object; StoredObjectMissingError if there is none."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object (no error if it is already gone)."""

    async def presigned_url(self, key: str, *, ttl_s: int, filename: str) -> str | None:
        """A short-lived URL that serves the object directly, or None if the store has none."""
        del key, ttl_s, filename
        return None


# Aborts still running after their caller was cancelled: asyncio keeps only weak references to tasks.
_background_aborts: set[asyncio.Task[None]] = set()


async def _abort_shielded(upload: Upload, key: str) -> None:
    async def abort_logged() -> None:
        try:
            await upload.abort()
        except BundleStoreError as exc:
            # The original failure is what the caller must see; the leftover is logged for cleanup.
            log.warning("aborting a bundle upload failed", key=key, error=str(exc))

    task = asyncio.ensure_future(abort_logged())
    _background_aborts.add(task)
    task.add_done_callback(_background_aborts.discard)
    await asyncio.shield(task)
