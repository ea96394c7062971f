"""The API process killed (-9) in the middle of a bundle upload, then started again.

No partial bundle is ever visible (the row commits only after the object is complete), and the
temp file the dead process left in the bundle store is swept when the API starts again (its
name carries the writer's host and pid, and that pid is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil

from tests.fixtures.platform import Platform, run_platform, wait_for
from tests.test_api_bundles import MIB, build

UPLOAD_BYTES = 8 * MIB
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


async def test_api_killed_mid_upload_leaves_no_bundle_and_its_temp_file_is_swept(
    pg_url: str, tmp_path: Path
) -> None:
    archive = build(tmp_path, data=os.urandom(UPLOAD_BYTES)).read_bytes()
    half_sent = asyncio.Event()
    never = asyncio.Event()

    async def stalls_halfway() -> AsyncIterator[bytes]:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\n'.encode()
        for i in range(0, len(archive) // 2, CHUNK):
            yield archive[i : i + CHUNK]
        half_sent.set()
        await never.wait()  # the API dies before the rest would come

    async with run_platform(tmp_path, pg_url) as platform:
        ports = {"api_port": int(platform.api_url.rsplit(":", 1)[1]), "mqtt_port": platform.mqtt_port}
        headers = {
            "Authorization": f"Bearer {platform.token}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        }
        async with httpx.AsyncClient(timeout=60) as client:
            upload = asyncio.create_task(
                client.post(platform.api_url + "/api/v1/bundles", content=stalls_halfway(), headers=headers)
            )
            await asyncio.wait_for(half_sent.wait(), 60)

            async def temp_file_written() -> list[str]:
                return leftovers(platform.data_dir).get("tmp", [])

            partial = await wait_for(temp_file_written, 30, "the upload's temp file", log=platform)
            api_process(platform).send_signal(signal.SIGKILL)
            # The client is stuck sending a body that never ends: it only learns of the dead
            # server when it reads the answer, so stop it here.
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upload
            assert upload.cancelled()
        # kernex up stops the platform when one of its processes dies.
        await asyncio.to_thread(platform.proc.wait, 60)
    assert leftovers(platform.data_dir)["tmp"] == partial, "the crash left its temp file behind"
    assert leftovers(platform.data_dir)["objects"] == []

    restart = {"data_dir": platform.data_dir, "create_admin": False, **ports}
    async with run_platform(tmp_path, pg_url, **restart) as again:
        listed = (await again.get("/api/v1/bundles")).json()
        assert listed["total"] == 0, listed
        assert leftovers(again.data_dir) == {"tmp": [], "objects": []}
