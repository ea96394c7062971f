"""The API process killed (-9) in the middle of a bundle upload, then started again.

No partial bundle is ever visible (the row commits only after the object is complete), and what
the dead process left in the bundle store is cleaned up when the API starts again: the
filesystem store's temp file (its name carries the writer's host and pid, and that pid is gone),
the S3 store's incomplete multipart upload (older than KERNEX_S3_STALE_UPLOAD_AGE_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from kernex.storage.bundles.s3 import PART_BYTES, S3Options
from tests.fixtures.platform import Platform, run_platform, wait_for
from tests.test_api_bundles import MIB, build

UPLOAD_BYTES = 8 * MIB
# Half of it is sent before the kill: more than one S3 part, so a multipart upload is under way.
S3_UPLOAD_BYTES = 3 * PART_BYTES
CHUNK = 64 * 1024
BOUNDARY = "kernexfaultboundary"


def api_process(platform: Platform) -> psutil.Process:
    found = [c for c in psutil.Process(platform.proc.pid).children() if "api" in c.cmdline()]
    assert len(found) == 1, [c.cmdline() for c in psutil.Process(platform.proc.pid).children()]
    return found[0]


def leftovers(data_dir: Path) -> dict[str, list[str]]:
    root = data_dir / "bundles"
    dirs = [d for d in ("tmp", "objects") if (root / d).exists()]
    return {d: sorted(p.name for p in (root / d).iterdir()) for d in dirs}


async def kill_api_mid_upload(
    platform: Platform, archive: bytes, partial: Callable[[], Awaitable[list[str]]]
) -> list[str]:
    """Send half of archive as an upload, wait for partial() to show its traces, kill the API
    with -9 and wait for `kernex up` to stop; returns the traces."""
    half_sent = asyncio.Event()
    never = asyncio.Event()

    async def stalls_halfway() -> AsyncIterator[bytes]:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\n'.encode()
        for i in range(0, len(archive) // 2, CHUNK):
            yield archive[i : i + CHUNK]
        half_sent.set()
        await never.wait()  # the API dies before the rest would come

    headers = {
        "Authorization": f"Bearer {platform.token}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    async with httpx.AsyncClient(timeout=60) as client:
        upload = asyncio.create_task(
            client.post(platform.api_url + "/api/v1/bundles", content=stalls_halfway(), headers=headers)
        )
        await asyncio.wait_for(half_sent.wait(), 60)
        traces = await wait_for(partial, 30, "the upload's partial state in the store", log=platform)
        api_process(platform).send_signal(signal.SIGKILL)
        # The client is stuck sending a body that never ends: it only learns of the dead
        # server when it reads the answer, so stop it here.
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upload
        assert upload.cancelled()
    # kernex up stops the platform when one of its processes dies.
    await asyncio.to_thread(platform.proc.wait, 60)
    return traces


def restart(
    platform: Platform, tmp_path: Path, pg_url: str, env: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[Platform]:
    """The same platform started again: its data dir, ports and database (the admin came back with it)."""
    return run_platform(
        tmp_path,
        pg_url,
        env=env,
        data_dir=platform.data_dir,
        api_port=int(platform.api_url.rsplit(":", 1)[1]),
        mqtt_port=platform.mqtt_port,
        create_admin=False,
    )


async def test_api_killed_mid_upload_leaves_no_bundle_and_its_temp_file_is_swept(
    pg_url: str, tmp_path: Path
) -> None:
    archive = build(tmp_path, data=os.urandom(UPLOAD_BYTES)).read_bytes()
    async with run_platform(tmp_path, pg_url) as platform:

        async def temp_file_written() -> list[str]:
            return leftovers(platform.data_dir).get("tmp", [])

        partial = await kill_api_mid_upload(platform, archive, temp_file_written)
    assert leftovers(platform.data_dir)["tmp"] == partial, "the crash left its temp file behind"
    assert leftovers(platform.data_dir)["objects"] == []

    async with restart(platform, tmp_path, pg_url) as again:
        listed = (await again.get("/api/v1/bundles")).json()
        assert listed["total"] == 0, listed
        assert leftovers(again.data_dir) == {"tmp": [], "objects": []}


def s3_leftovers(client: Any, bucket: str) -> dict[str, list[str]]:
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {"uploads": sorted(u["Key"] for u in uploads), "objects": sorted(o["Key"] for o in objects)}


async def test_api_killed_mid_upload_to_s3_leaves_no_bundle_and_its_multipart_upload_is_aborted(
    pg_url: str, tmp_path: Path, s3_options: S3Options, s3_client: Any
) -> None:
    archive = build(tmp_path, data=os.urandom(S3_UPLOAD_BYTES)).read_bytes()
    bucket = s3_options.bucket
    s3_env = {
        "KERNEX_BUNDLE_STORE": "s3",
        "KERNEX_S3_BUCKET": bucket,
        "KERNEX_S3_ENDPOINT_URL": str(s3_options.endpoint_url),
        "KERNEX_S3_REGION": str(s3_options.region),
        "KERNEX_S3_ACCESS_KEY": str(s3_options.access_key),
        "KERNEX_S3_SECRET_KEY": str(s3_options.secret_key),
    }
    async with run_platform(tmp_path, pg_url, env=s3_env) as platform:

        async def multipart_upload_started() -> list[str]:
            return s3_leftovers(s3_client, bucket)["uploads"]

        partial = await kill_api_mid_upload(platform, archive, multipart_upload_started)
    # The dead process could not abort: its parts stay in the bucket, billed and unlisted.
    assert s3_leftovers(s3_client, bucket) == {"uploads": partial, "objects": []}
    assert partial[0].startswith("bundles/"), partial

    # A threshold of one second: starting the platform again takes longer than that, so the dead
    # upload is older when the API sweeps (moto dates every upload in 2010 anyway).
    async with restart(
        platform, tmp_path, pg_url, env={**s3_env, "KERNEX_S3_STALE_UPLOAD_AGE_S": "1"}
    ) as again:
        listed = (await again.get("/api/v1/bundles")).json()
        assert listed["total"] == 0, listed
        assert s3_leftovers(s3_client, bucket) == {"uploads": [], "objects": []}
        swept = [
            entry
            for line in again.log().splitlines()
            if line.startswith("{")
            and (entry := json.loads(line)).get("event") == "abandoned S3 multipart uploads aborted"
        ]
        assert [entry["aborted"] for entry in swept] == [1], swept
