"""Storage settings: the database (api, ingest, CLI) and the bundle store (api)."""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from kernex.kit.settings import KernexSettings
from kernex.storage.bundles.store import STALE_UPLOAD_AGE_S

SQLITE_FILE = "kernex.db"
DEFAULT_MAX_BUNDLE_BYTES = 1024**3  # the 1 GiB: room for a root filesystem image
# Presigned URLs are bearer credentials: long enough for a slow link to start, short enough to leak little.
DEFAULT_PRESIGN_TTL_S = 300
AES256_KEY_BYTES = 32


class StorageSettings(KernexSettings):
    """Where the database is: embedded SQLite in the data dir unless KERNEX_DATABASE_URL is set."""

    database_url: str | None = None

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy async URL in use."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / SQLITE_FILE).resolve()}"


class BundleStoreKind(StrEnum):
    """Where bundle archives are kept (DESIGN.md "Defaults: embedded first")."""

    FILESYSTEM = "filesystem"
    S3 = "s3"


class S3Encryption(StrEnum):
    """S3 server-side encryption of stored bundles (the x-amz-server-side-encryption header)."""

    NONE = "none"
    AES256 = "AES256"
    KMS = "aws:kms"


class BundleStoreSettings(KernexSettings):
    """Where and how bundle archives are stored; read by the API (and the benchmark)."""

    bundle_store: BundleStoreKind = BundleStoreKind.FILESYSTEM
    s3_bucket: str | None = None
    # Unset: AWS's regional endpoint. Set it for MinIO, Ceph or any other S3 API.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Unset: boto3's default chain (environment, shared config, instance or task role).
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_sse: S3Encryption = S3Encryption.NONE
    # The KMS key for s3_sse=aws:kms; unset, the bucket's default KMS key.
    s3_kms_key_id: str | None = None
    # Downloads answer 307 to a presigned S3 URL instead of streaming through the API.
    s3_presigned_downloads: bool = False
    presign_ttl_s: int = Field(default=DEFAULT_PRESIGN_TTL_S, ge=10, le=7 * 24 * 3600)
    # Incomplete multipart uploads under the bundles prefix initiated longer ago than this are
    # aborted at start and hourly (an API killed mid-upload leaves its parts billed forever).
    # Must exceed the longest upload: another replica's live upload would be aborted otherwise.
    s3_stale_upload_age_s: int = Field(default=STALE_UPLOAD_AGE_S, ge=1, le=30 * 24 * 3600)
    max_bundle_bytes: int = Field(default=DEFAULT_MAX_BUNDLE_BYTES, ge=1024, le=2**40)
    # 32 bytes, base64: bundles in the filesystem store are then encrypted with AES-256-GCM.
    bundle_encryption_key: SecretStr | None = None

    @property
    def bundle_dir(self) -> Path:
        """The filesystem store's root inside the data dir."""
        return self.data_dir / "bundles"

    def bundle_encryption_key_bytes(self) -> bytes | None:
        """The decoded filesystem-store key, or None when bundles are stored in the clear."""
        if self.bundle_encryption_key is None:
            return None
        return decode_encryption_key(self.bundle_encryption_key.get_secret_value())

    @model_validator(mode="after")
    def _check_bundle_store(self) -> BundleStoreSettings:
        if self.bundle_store is BundleStoreKind.S3 and not self.s3_bucket:
            raise ValueError("KERNEX_S3_BUCKET must be set when KERNEX_BUNDLE_STORE=s3")
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError("set both KERNEX_S3_ACCESS_KEY and KERNEX_S3_SECRET_KEY, or neither")
        self.bundle_encryption_key_bytes()
        return self


def decode_encryption_key(value: str) -> bytes:
    """A base64 AES-256 key; ValueError unless it decodes to exactly 32 bytes."""
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        raise ValueError(
            "KERNEX_BUNDLE_ENCRYPTION_KEY must be base64 (e.g. `openssl rand -base64 32`)"
        ) from None
    if len(key) != AES256_KEY_BYTES:
        raise ValueError(
            f"KERNEX_BUNDLE_ENCRYPTION_KEY must decode to {AES256_KEY_BYTES} bytes, not {len(key)}"
        )
    return key
