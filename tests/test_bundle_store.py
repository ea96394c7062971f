"""Bundle stores against real backends: a directory (clear and encrypted) and a real S3 HTTP endpoint."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError
from structlog.testing import capture_logs

from kernex.storage.bundles import encryption
from kernex.storage.bundles.exceptions import (
    BundleStoreError,
    StoredObjectCorruptError,
    StoredObjectMissingError,
)
from kernex.storage.bundles.filesystem import FilesystemStore
from kernex.storage.bundles.s3 import S3Options, S3Store
from kernex.storage.bundles.store import BundleStore

MIB = 1024 * 1024
S3_MIN_PART = 5 * MIB  # smallest legal part: exercises multipart with a dozen megabytes
KEY = "bundles/abc123.tar.gz"


class InjectedError(Exception):
    """A fault the test injected."""


@pytest.fixture(params=["filesystem", "filesystem-encrypted", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BundleStore]:
    if request.param == "s3":
        options: S3Options = request.getfixturevalue("s3_options")
        created: BundleStore = await S3Store.create(replace(options, part_bytes=S3_MIN_PART))
    else:
        key = os.urandom(32) if request.param == "filesystem-encrypted" else None
        created = FilesystemStore(tmp_path / "bundles", key)
    await created.start()
    try:
        yield created
    finally:
        await created.close()


async def _write(store: BundleStore, key: str, data: bytes, chunk: int = 100_003) -> None:
    async with store.upload(key) as upload:
        for i in range(0, len(data), chunk):
            await upload.write(data[i : i + chunk])


async def _read(store: BundleStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


async def _leftovers(store: BundleStore) -> list[str]:
    """Whatever an aborted upload could have left: temp files, objects, multipart uploads."""
    if isinstance(store, FilesystemStore):
        return [p.name for p in store.tmp.iterdir()] + [
            str(p) for p in store.objects.rglob("*") if p.is_file()
        ]
    assert isinstance(store, S3Store)
    client = store.client
    uploads = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    objects = client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return [f"upload:{u['Key']}" for u in uploads] + [f"object:{o['Key']}" for o in objects]


@pytest.mark.parametrize("size", [0, 1, 64 * 1024, 12 * MIB + 12_345])
async def test_round_trip_and_stat(store: BundleStore, size: int) -> None:
    data = os.urandom(size)
    await _write(store, KEY, data)
    assert await _read(store, KEY) == data
    stat = await store.stat(KEY)
    assert stat.size == size
    assert stat.version


async def test_range_reads(store: BundleStore) -> None:
    data = os.urandom(3 * MIB + 777)
    await _write(store, KEY, data)
    segment = encryption.SEGMENT_BYTES
    ranges = [
        (0, 1),
        (1, 2),
        (segment - 1, segment + 1),  # across an encryption segment boundary
        (segment, 3 * segment),
        (MIB - 3, 2 * MIB + 5),  # across read chunks
        (len(data) - 10, len(data)),
        (len(data) - 10, len(data) + 1000),  # past the end: clipped
        (12345, None),  # resume to the end
    ]
    for start, end in ranges:
        assert await _read(store, KEY, start, end) == data[start:end], (start, end)


async def test_aborted_upload_leaves_nothing(store: BundleStore) -> None:
    data = os.urandom(12 * MIB)  # more than two S3 parts: a multipart upload is under way

    async def fail_mid_stream() -> None:
        async with store.upload(KEY) as upload:
            await upload.write(data[: 11 * MIB])
            raise InjectedError

    with pytest.raises(InjectedError):
        await fail_mid_stream()
    with pytest.raises(StoredObjectMissingError):
        await store.stat(KEY)
    assert await _leftovers(store) == []


async def test_cancelled_upload_leaves_nothing(store: BundleStore) -> None:
    started = asyncio.Event()

    async def upload_forever() -> None:
        async with store.upload(KEY) as upload:
            await upload.write(os.urandom(11 * MIB))
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(upload_forever())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _leftovers(store) == []


async def test_missing_and_delete(store: BundleStore) -> None:
    with pytest.raises(StoredObjectMissingError):
        await store.stat("bundles/missing.tar.gz")
    with pytest.raises(StoredObjectMissingError):
        await _read(store, "bundles/missing.tar.gz")
    await _write(store, KEY, b"x" * 100)
    await store.delete(KEY)
    await store.delete(KEY)  # already gone: not an error
    with pytest.raises(StoredObjectMissingError):
        await store.stat(KEY)


async def test_keys_cannot_escape_the_store(store: BundleStore) -> None:
    for bad in ("../etc/passwd", "/abs", "a/../../b", "", "a//b"):
        with pytest.raises(BundleStoreError):
            await store.stat(bad)


async def test_s3_part_failure_aborts_the_multipart_upload(s3_options: S3Options) -> None:
    store = await S3Store.create(replace(s3_options, part_bytes=S3_MIN_PART))
    real_upload_part = store.client.upload_part
    calls = 0

    def failing_upload_part(**kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionClosedError(endpoint_url="injected: connection reset while sending part 2")
        return real_upload_part(**kwargs)

    store.client.upload_part = failing_upload_part  # type: ignore[method-assign] # fault injection
    try:
        with pytest.raises(BundleStoreError, match="UploadPart"):
            await _write(store, KEY, os.urandom(16 * MIB))
        assert calls == 2
        assert await _leftovers(store) == []
    finally:
        await store.close()


async def test_s3_complete_failure_aborts(s3_options: S3Options) -> None:
    store = await S3Store.create(replace(s3_options, part_bytes=S3_MIN_PART))

    def failing_complete(**kwargs):
        raise ConnectionClosedError(endpoint_url="injected: complete lost")

    store.client.complete_multipart_upload = failing_complete  # type: ignore[method-assign] # fault injection
    try:
        with pytest.raises(BundleStoreError, match="complete lost"):
            await _write(store, KEY, os.urandom(11 * MIB))
        assert await _leftovers(store) == []
    finally:
        await store.close()


@pytest.mark.parametrize("size", [1000, 11 * MIB])
async def test_s3_server_side_encryption(s3_options: S3Options, size: int) -> None:
    store = await S3Store.create(replace(s3_options, sse="AES256", part_bytes=S3_MIN_PART))
    try:
        await _write(store, KEY, os.urandom(size))
        head = store.client.head_object(Bucket=store.bucket, Key=KEY)
        assert head["ServerSideEncryption"] == "AES256"
    finally:
        await store.close()


async def test_s3_presigned_url_serves_the_object(s3_options: S3Options) -> None:
    store = await S3Store.create(s3_options)
    try:
        data = os.urandom(5000)
        await _write(store, KEY, data)
        url = await store.presigned_url(KEY, ttl_s=60, filename="b-1.0.0.tar.gz")
        assert url is not None
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        assert response.status_code == 200
        assert response.content == data
        assert "b-1.0.0.tar.gz" in response.headers["content-disposition"]
    finally:
        await store.close()


def _crashed_upload(client: Any, bucket: str, key: str) -> str:
    """An incomplete multipart upload with one part: what an API killed mid-upload leaves."""
    upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(1024))
    return upload_id


def _incomplete(client: Any, bucket: str) -> dict[str, float]:
    """Incomplete multipart uploads by key, with their age in seconds as the server reports it."""
    now = datetime.now(UTC)
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["Key"]: (now - u["Initiated"]).total_seconds() for u in uploads}


async def _older_than(client: Any, bucket: str, seconds: float) -> None:
    """Wait until every incomplete upload is older than seconds (moto dates them all in 2010)."""
    youngest = min(_incomplete(client, bucket).values())
    await asyncio.sleep(max(0.0, seconds - youngest + 0.1))


async def test_s3_start_aborts_stale_uploads_under_the_bundles_prefix(
    s3_options: S3Options, s3_client: Any
) -> None:
    bucket = s3_options.bucket
    _crashed_upload(s3_client, bucket, "bundles/crashed.tar.gz")
    _crashed_upload(s3_client, bucket, "bundles/crashed-too.tar.gz")
    _crashed_upload(s3_client, bucket, "elsewhere/crashed.tar.gz")  # another writer's: not ours to judge
    await _older_than(s3_client, bucket, 1.0)
    store = await S3Store.create(replace(s3_options, stale_upload_age_s=1.0))
    try:
        with capture_logs() as logs:
            await store.start()
        assert list(_incomplete(s3_client, bucket)) == ["elsewhere/crashed.tar.gz"]
        swept = [e for e in logs if e["event"] == "abandoned S3 multipart uploads aborted"]
        assert [(e["log_level"], e["aborted"]) for e in swept] == [("info", 2)]
        assert await store.sweep_abandoned_uploads() == 0  # nothing left to abort
    finally:
        await store.close()


async def test_s3_start_leaves_uploads_younger_than_the_threshold(
    s3_options: S3Options, s3_client: Any
) -> None:
    bucket, key = s3_options.bucket, "bundles/live.tar.gz"
    upload_id = _crashed_upload(s3_client, bucket, key)
    # Whatever age the server gives it, one hour short of the threshold: a live upload.
    age = _incomplete(s3_client, bucket)[key]
    store = await S3Store.create(replace(s3_options, stale_upload_age_s=age + 3600))
    try:
        await store.start()
        assert await store.sweep_abandoned_uploads() == 0
        assert list(_incomplete(s3_client, bucket)) == [key]
        # Still intact: its writer can complete it.
        parts = s3_client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        s3_client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]},
        )
        assert (await store.stat(key)).size == 1024
    finally:
        await store.close()


async def test_s3_sweep_runs_periodically(s3_options: S3Options, s3_client: Any) -> None:
    store = await S3Store.create(replace(s3_options, stale_upload_age_s=1.0, sweep_interval_s=0.2))
    try:
        await store.start()
        _crashed_upload(s3_client, s3_options.bucket, "bundles/crashed-later.tar.gz")
        deadline = time.monotonic() + 15
        while _incomplete(s3_client, s3_options.bucket) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert _incomplete(s3_client, s3_options.bucket) == {}
    finally:
        await store.close()


async def test_s3_sweep_failure_is_logged_and_start_goes_on(s3_options: S3Options) -> None:
    store = await S3Store.create(s3_options)

    def denied(**kwargs: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "injected"}}, "ListMultipartUploads")

    store.client.list_multipart_uploads = denied  # type: ignore[method-assign,assignment] # fault injection
    try:
        with capture_logs() as logs:
            await store.start()
        failures = [e for e in logs if e["event"] == "sweeping abandoned S3 multipart uploads failed"]
        assert len(failures) == 1
        assert failures[0]["log_level"] == "warning"
        assert "AccessDenied" in failures[0]["error"]
        await _write(store, KEY, b"still works")
        assert await _read(store, KEY) == b"still works"
    finally:
        await store.close()


async def test_s3_sweep_pages_and_tolerates_uploads_aborted_meanwhile(
    s3_options: S3Options, s3_client: Any
) -> None:
    bucket = s3_options.bucket
    keys = [f"bundles/crashed-{i}.tar.gz" for i in range(5)]
    upload_ids = [_crashed_upload(s3_client, bucket, key) for key in keys]
    await _older_than(s3_client, bucket, 1.0)
    store = await S3Store.create(replace(s3_options, stale_upload_age_s=1.0))
    real_list = store.client.list_multipart_uploads
    pages: list[str | None] = []

    def two_per_page(**kwargs: Any) -> Any:
        # moto ignores max-uploads and answers everything at once; page as S3 does (at 1,000).
        pages.append(kwargs.get("KeyMarker"))
        listed = sorted(real_list(**kwargs).get("Uploads", []), key=lambda u: u["Key"])
        after = [u for u in listed if u["Key"] > kwargs.get("KeyMarker", "")]
        page, rest = after[:2], after[2:]
        if keys[0] in [u["Key"] for u in page]:
            # Another replica's sweep aborts this one between our listing and our abort.
            s3_client.abort_multipart_upload(Bucket=bucket, Key=keys[0], UploadId=upload_ids[0])
        answer: dict[str, Any] = {"Uploads": page, "IsTruncated": bool(rest)}
        if rest:
            answer |= {"NextKeyMarker": page[-1]["Key"], "NextUploadIdMarker": page[-1]["UploadId"]}
        return answer

    store.client.list_multipart_uploads = two_per_page  # type: ignore[method-assign] # paging injected
    try:
        assert await store.sweep_abandoned_uploads() == len(keys) - 1
        assert pages == [None, keys[1], keys[3]]
        assert _incomplete(s3_client, bucket) == {}
    finally:
        await store.close()


async def test_filesystem_has_no_presigned_urls(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    await store.start()
    assert await store.presigned_url(KEY, ttl_s=60, filename="x") is None


async def test_encrypted_store_keeps_no_plaintext_and_detects_tampering(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = FilesystemStore(tmp_path, key)
    await store.start()
    data = b"kernex-secret-payload " * 20_000  # ~440 KiB: several segments
    await _write(store, KEY, data)
    raw = store.path_of(KEY).read_bytes()
    assert b"kernex-secret-payload" not in raw
    assert len(raw) > len(data)

    # One flipped bit in the third segment: reads touching it fail, others still work.
    tampered = bytearray(raw)
    tampered[encryption.HEADER_BYTES + 2 * (encryption.SEGMENT_BYTES + encryption.TAG_BYTES) + 5] ^= 1
    store.path_of(KEY).write_bytes(bytes(tampered))
    assert await _read(store, KEY, 0, 1000) == data[:1000]
    with pytest.raises(StoredObjectCorruptError, match="segment 2"):
        await _read(store, KEY)

    # Truncated at a segment boundary: the new last segment was not sealed as the last one.
    boundary = encryption.HEADER_BYTES + 2 * (encryption.SEGMENT_BYTES + encryption.TAG_BYTES)
    store.path_of(KEY).write_bytes(raw[:boundary])
    with pytest.raises(StoredObjectCorruptError):
        await _read(store, KEY)

    # The same file under another key (swapped bundles) or with another store key fails too.
    store.path_of(KEY).write_bytes(raw)
    other = "bundles/other.tar.gz"
    store.path_of(other).write_bytes(raw)
    with pytest.raises(StoredObjectCorruptError):
        await _read(store, other)
    wrong = FilesystemStore(tmp_path, os.urandom(32))
    with pytest.raises(StoredObjectCorruptError):
        await _read(wrong, KEY)
    assert await _read(store, KEY) == data
