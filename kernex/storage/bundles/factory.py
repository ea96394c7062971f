"""Build the configured bundle store from settings."""

from __future__ import annotations

from kernex.storage.bundles.filesystem import FilesystemStore
from kernex.storage.bundles.s3 import S3Options, S3Store
from kernex.storage.bundles.store import BundleStore
from kernex.storage.settings import BundleStoreKind, BundleStoreSettings, S3Encryption


async def create_store(settings: BundleStoreSettings) -> BundleStore:
    """The store the settings name, started (directories made, bucket checked)."""
    store: BundleStore
    if settings.bundle_store is BundleStoreKind.S3:
        assert settings.s3_bucket is not None  # the settings validator requires it
        store = await S3Store.create(
            S3Options(
                bucket=settings.s3_bucket,
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
                secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
                sse=None if settings.s3_sse is S3Encryption.NONE else settings.s3_sse.value,
                kms_key_id=settings.s3_kms_key_id,
                stale_upload_age_s=settings.s3_stale_upload_age_s,
            )
        )
    else:
        store = FilesystemStore(settings.bundle_dir, settings.bundle_encryption_key_bytes())
    try:
        await store.start()
    except BaseException:
        await store.close()
        raise
    return store
