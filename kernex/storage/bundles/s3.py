"""Bundles in any S3 API (AWS S3, MinIO, Ceph) via boto3.

boto3 blocks, so every call runs in a worker thread. Uploads are buffered into parts of
PART_BYTES: an object that fits in one part is a single PUT, a larger one a multipart upload
with at most one part in flight while the next fills (memory stays at about two parts), and
any failure aborts the multipart upload so no parts linger (and are billed) in the bucket.

A process killed mid-upload (kill -9) cannot abort: its incomplete upload stays in the bucket,
invisible to listings, its parts billed. start() and then an hourly sweep abort the incomplete
uploads under the bundles prefix initiated longer ago than `stale_upload_age_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kernex.kit.logs import get_logger
from kernex.storage.bundles.exceptions import BundleStoreError, StoredObjectMissingError
from kernex.storage.bundles.store import (
    BUNDLE_KEY_PREFIX,
    CHUNK_BYTES,
    STALE_UPLOAD_AGE_S,
    BundleStore,
    StoredObject,
    Upload,
    check_key,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

# S3 requires parts of at least 5 MiB (but the last); 8 MiB is the AWS CLI's default and keeps
# 10,000 parts (S3's maximum) enough for 80 GiB.
PART_BYTES = 8 * 1024 * 1024
# Transient errors (throttling, 5xx, resets) are retried by botocore's standard mode.
MAX_ATTEMPTS = 5
# Threads may share one client; its pool bounds concurrent requests to the store.
MAX_POOL_CONNECTIONS = 32
# Abandoned uploads cost money, not correctness: hourly keeps the bill of a crash to an hour past
# the age threshold at the price of one LIST request.
SWEEP_INTERVAL_S = 3600.0
log = get_logger(__name__)

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_SUCH_UPLOAD = "NoSuchUpload"
T = TypeVar("T")


@dataclass(frozen=True)
class S3Options:
    """How to reach the bucket and how to write to it."""

    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    # "AES256" or "aws:kms"; None stores objects as the bucket's default encryption says.
    sse: str | None = None
    kms_key_id: str | None = None
    part_bytes: int = PART_BYTES
    # Incomplete multipart uploads under sweep_prefix initiated longer ago than this are aborted.
    stale_upload_age_s: float = STALE_UPLOAD_AGE_S
    sweep_prefix: str = BUNDLE_KEY_PREFIX
    sweep_interval_s: float = SWEEP_INTERVAL_S


class S3Store(BundleStore):
    """Bundles as objects in one bucket."""

    kind: ClassVar[str] = "s3"

    def __init__(self, options: S3Options, client: S3Client) -> None:
        if options.part_bytes < 5 * 1024 * 1024:
            raise BundleStoreError("S3 multipart parts must be at least 5 MiB")
        self.options = options
        self.bucket = options.bucket
        self.client = client
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, options: S3Options) -> S3Store:
        """A store with its own boto3 client (building one reads botocore's models from disk)."""
        return cls(options, await asyncio.to_thread(make_client, options))

    def sse_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        if self.options.sse:
            args["ServerSideEncryption"] = self.options.sse
            if self.options.kms_key_id:
                args["SSEKMSKeyId"] = self.options.kms_key_id
        return args

    async def call(self, operation: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run a blocking boto3 call in a thread, translating its errors."""
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            if code in _MISSING_CODES:
                raise StoredObjectMissingError(f"S3 {operation}: no such object or bucket ({code})") from None
            raise BundleStoreError(f"S3 {operation} failed: {code}: {error.get('Message', '')}") from None
        except BotoCoreError as exc:
            raise BundleStoreError(f"S3 {operation} failed: {exc}") from None

    async def start(self) -> None:
        try:
            await self.call("HeadBucket", self.client.head_bucket, Bucket=self.bucket)
        except StoredObjectMissingError:
            raise BundleStoreError(f"S3 bucket {self.bucket!r} does not exist") from None
        await self._sweep_logged()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_periodically(), name="s3-upload-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await asyncio.to_thread(self.client.close)

    async def sweep_abandoned_uploads(self) -> int:
        """Abort the incomplete multipart uploads under the sweep prefix older than the threshold.

        Returns how many this call aborted (one that another replica's sweep aborted first is
        not counted). Raises BundleStoreError when listing or aborting fails.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=self.options.stale_upload_age_s)
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.options.sweep_prefix}
        aborted = 0
        while True:
            page = await self.call("ListMultipartUploads", self.client.list_multipart_uploads, **args)
            stale = [upload for upload in page.get("Uploads", []) if upload["Initiated"] < cutoff]
            for upload in stale:
                key, upload_id = upload["Key"], upload["UploadId"]
                if await self.call("AbortMultipartUpload", self._abort_upload, key=key, upload_id=upload_id):
                    aborted += 1
            # Markers continue after the last listed upload, so aborting what was listed is safe.
            if not page.get("IsTruncated"):
                return aborted
            args["KeyMarker"] = page["NextKeyMarker"]
            args["UploadIdMarker"] = page["NextUploadIdMarker"]

    def _abort_upload(self, *, key: str, upload_id: str) -> bool:
        """Abort one upload (blocking); False when it is already gone."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == _NO_SUCH_UPLOAD:
                return False  # another replica's sweep, or the upload's own abort, got there first
            raise
        return True

    async def _sweep_logged(self) -> None:
        """One sweep; a failure is logged and otherwise ignored (the bucket still works)."""
        try:
            aborted = await self.sweep_abandoned_uploads()
        except BundleStoreError as exc:
            log.warning("sweeping abandoned S3 multipart uploads failed", bucket=self.bucket, error=str(exc))
            return
        if aborted:
            log.info(
                "abandoned S3 multipart uploads aborted",
                bucket=self.bucket,
                prefix=self.options.sweep_prefix,
                aborted=aborted,
                older_than_s=self.options.stale_upload_age_s,
            )
        else:
            log.debug(
                "no abandoned S3 multipart uploads", bucket=self.bucket, prefix=self.options.sweep_prefix
            )

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.options.sweep_interval_s)
            await self._sweep_logged()

    async def begin(self, key: str) -> Upload:
        return _S3Upload(self, check_key(key))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        if end is not None and end <= start:
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": check_key(key)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = await self.call("GetObject", self.client.get_object, **args)
        body = response["Body"]
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(body.read, CHUNK_BYTES)
                except (BotoCoreError, OSError) as exc:
                    raise BundleStoreError(f"S3 GetObject {key!r} failed mid-stream: {exc}") from None
                if not chunk:
                    return
                yield chunk
        finally:
            await asyncio.to_thread(body.close)

    async def stat(self, key: str) -> StoredObject:
        head = await self.call("HeadObject", self.client.head_object, Bucket=self.bucket, Key=check_key(key))
        return StoredObject(
            size=head["ContentLength"], version=f"{head['ETag']}:{head['LastModified'].isoformat()}"
        )

    async def delete(self, key: str) -> None:
        await self.call("DeleteObject", self.client.delete_object, Bucket=self.bucket, Key=check_key(key))

    async def presigned_url(self, key: str, *, ttl_s: int, filename: str) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": check_key(key),
            "ResponseContentType": "application/gzip",
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        # Signing is local, but resolving credentials may read files or the instance metadata service.
        return await self.call(
            "presign",
            self.client.generate_presigned_url,
            ClientMethod="get_object",
            Params=params,
            ExpiresIn=ttl_s,
        )


def make_client(options: S3Options) -> S3Client:
    """A thread-safe boto3 S3 client for the options (blocking: loads botocore's data files)."""
    config = Config(
        signature_version="s3v4",  # SSE-KMS and presigned URLs need SigV4
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        # MinIO and most self-hosted S3 APIs serve buckets by path, not by virtual host.
        s3={"addressing_style": "path" if options.endpoint_url else "auto"},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=options.endpoint_url,
        region_name=options.region,
        aws_access_key_id=options.access_key,
        aws_secret_access_key=options.secret_key,
        config=config,
    )


class _S3Upload(Upload):
    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self._key = key
        self._part_bytes = store.options.part_bytes
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._inflight: asyncio.Task[None] | None = None
        self._next_part = 1
        self._done = False

    async def write(self, data: bytes) -> None:
        # Chunks are joined once per part: one part-sized allocation, no resizing or shifting.
        self._chunks.append(data)
        self._buffered += len(data)
        while self._buffered >= self._part_bytes:
            joined = b"".join(self._chunks)
            part, rest = joined[: self._part_bytes], joined[self._part_bytes :]
            del joined
            self._chunks = [rest] if rest else []
            self._buffered = len(rest)
            await self._send(part)

    def _take_buffer(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        return data

    async def _send(self, part: bytes) -> None:
        store = self._store
        if self._upload_id is None:
            created = await store.call(
                "CreateMultipartUpload",
                store.client.create_multipart_upload,
                Bucket=store.bucket,
                Key=self._key,
                ContentType="application/gzip",
                **store.sse_args(),
            )
            self._upload_id = created["UploadId"]
        await self._wait_inflight()
        number, self._next_part = self._next_part, self._next_part + 1
        self._inflight = asyncio.create_task(self._upload_part(number, part))

    async def _upload_part(self, number: int, part: bytes) -> None:
        store = self._store
        assert self._upload_id is not None
        result = await store.call(
            "UploadPart",
            store.client.upload_part,
            Bucket=store.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=part,
        )
        self._parts.append({"PartNumber": number, "ETag": result["ETag"]})

    async def _wait_inflight(self) -> None:
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task

    async def commit(self) -> None:
        store = self._store
        try:
            if self._upload_id is None:
                await store.call(
                    "PutObject",
                    store.client.put_object,
                    Bucket=store.bucket,
                    Key=self._key,
                    Body=self._take_buffer(),
                    ContentType="application/gzip",
                    **store.sse_args(),
                )
            else:
                if self._buffered:
                    await self._send(self._take_buffer())
                await self._wait_inflight()
                parts = sorted(self._parts, key=lambda p: p["PartNumber"])
                await store.call(
                    "CompleteMultipartUpload",
                    store.client.complete_multipart_upload,
                    Bucket=store.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            await self.abort()
            raise
        self._done = True

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._chunks, self._buffered = [], 0
        if self._inflight is not None:
            # A part still uploading would outlive the abort; wait for it, its outcome no longer matters.
            task, self._inflight = self._inflight, None
            await asyncio.wait([task])
            if not task.cancelled() and (error := task.exception()) is not None:
                log.info("in-flight part failed while aborting", key=self._key, error=str(error))
        if self._upload_id is not None:
            store = self._store
            await store.call(
                "AbortMultipartUpload",
                store.client.abort_multipart_upload,
                Bucket=store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
            )
