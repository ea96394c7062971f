"""Integrity at rest: a stored bundle must still hash to the SHA-256 recorded at upload.

Each API process re-hashes a bundle the first time it serves it, and again whenever the store
reports a new version of the object (file replaced or touched, S3 ETag changed); in between,
full downloads are hashed as they stream (see service.stream). Concurrent first requests for
one bundle share a single verification.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from kernex.storage.bundles.exceptions import StoredObjectCorruptError, StoredObjectMissingError
from kernex.storage.bundles.store import BundleStore

VERIFIED_CACHE_MAX = 4096  # bundle ids remembered as verified; far more than a fleet keeps live


class IntegrityMismatchError(Exception):
    """The stored object is missing, unreadable or not what was uploaded (message says which)."""


class IntegrityChecker:
    """Verifies stored bundles against their recorded size and SHA-256, caching by object version."""

    def __init__(self, store: BundleStore) -> None:
        self._store = store
        self._verified: OrderedDict[str, str] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def check(self, bundle_id: str, key: str, sha256: str, size: int) -> None:
        """Return if the object is intact; IntegrityMismatchError if not; BundleStoreError if unknown."""
        try:
            stored = await self._store.stat(key)
        except StoredObjectMissingError:
            raise IntegrityMismatchError("the stored object is missing") from None
        if stored.size != size:
            raise IntegrityMismatchError(f"the stored object has {stored.size} bytes, not {size}")
        if self._verified.get(bundle_id) == stored.version:
            return
        lock = self._locks.setdefault(bundle_id, asyncio.Lock())
        try:
            async with lock:
                if self._verified.get(bundle_id) == stored.version:
                    return  # another request verified it while this one waited
                await self._hash_matches(key, sha256)
                self._remember(bundle_id, stored.version)
        finally:
            if not lock.locked():
                self._locks.pop(bundle_id, None)

    def forget(self, bundle_id: str) -> None:
        """Verify again next time (the bundle was deleted or found corrupt)."""
        self._verified.pop(bundle_id, None)

    async def _hash_matches(self, key: str, sha256: str) -> None:
        digest = hashlib.sha256()
        try:
            async for chunk in self._store.read(key):
                # hashlib releases the GIL on large buffers: hashing in a thread keeps the loop free.
                await asyncio.to_thread(digest.update, chunk)
        except StoredObjectMissingError:
            raise IntegrityMismatchError("the stored object is missing") from None
        except StoredObjectCorruptError as exc:
            raise IntegrityMismatchError(str(exc)) from None
        if digest.hexdigest() != sha256:
            raise IntegrityMismatchError(f"the stored object hashes to {digest.hexdigest()}, not {sha256}")

    def _remember(self, bundle_id: str, version: str) -> None:
        self._verified[bundle_id] = version
        self._verified.move_to_end(bundle_id)
        while len(self._verified) > VERIFIED_CACHE_MAX:
            self._verified.popitem(last=False)
