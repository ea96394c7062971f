"""What the bundles domain owns for the app's lifetime: the store, the release keys, the integrity cache.

The bundles router carries its own lifespan (FastAPI merges it into the app's when the router
is included), so the store's connections are opened after, and closed before, the app's own
resources.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from kernex.api.bundles.integrity import IntegrityChecker
from kernex.api.bundles.keyring import ReleaseKeyring, load_keyring
from kernex.api.state import AppState
from kernex.kit.logs import get_logger
from kernex.storage.bundles.factory import create_store
from kernex.storage.bundles.store import BundleStore

log = get_logger(__name__)


@dataclass(frozen=True)
class BundleRuntime:
    """The bundles domain's long-lived resources and limits."""

    store: BundleStore
    keyring: ReleaseKeyring
    integrity: IntegrityChecker
    max_bundle_bytes: int
    presigned_downloads: bool
    presign_ttl_s: int


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the bundle store and unlock the release key (runs inside the app's lifespan)."""
    state: AppState = app.state.kernex
    settings = state.settings
    # Unlocking the key runs the passphrase KDF; reading trusted keys touches the disk.
    keyring = await asyncio.to_thread(load_keyring, state.pki, settings.trusted_release_keys)
    store = await create_store(settings)
    app.state.bundles = BundleRuntime(
        store=store,
        keyring=keyring,
        integrity=IntegrityChecker(store),
        max_bundle_bytes=settings.max_bundle_bytes,
        presigned_downloads=settings.s3_presigned_downloads,
        presign_ttl_s=settings.presign_ttl_s,
    )
    log.info("bundle store ready", store=store.kind, release_key=keyring.key_id, trusted=len(keyring.trusted))
    try:
        yield
    finally:
        await store.close()


def get_runtime(request: Request) -> BundleRuntime:
    """The bundles domain's resources."""
    runtime: BundleRuntime = request.app.state.bundles
    return runtime


def get_keyring(request: Request) -> ReleaseKeyring:
    """The release keys (registration hands their public halves to devices)."""
    return get_runtime(request).keyring


RuntimeDep = Annotated[BundleRuntime, Depends(get_runtime)]
KeyringDep = Annotated[ReleaseKeyring, Depends(get_keyring)]
