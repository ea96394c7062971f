"""Response bodies of the bundles domain."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class BundleOut(BaseModel):
    """A stored bundle, its manifest and its release signature."""

    id: str
    name: str
    version: str
    sha256: str
    size: int
    manifest: dict[str, Any]
    # Compact JWS (typ kernex-release+jws) over name, version, manifest and archive SHA-256.
    signature: str | None
    # The kid of the release key that signed it: the server's, or a trusted offline key's.
    signed_by: str | None
    quarantined: bool
    created_at: datetime
    created_by: str | None


class BundlePage(BaseModel):
    """One page of bundles."""

    items: list[BundleOut]
    total: int
    limit: int
    offset: int
