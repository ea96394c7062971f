"""The agent's own downloader and verifier against the real bundles API: the two sides agree."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kernex.agent.bundles.archive import BundleArchive
from kernex.agent.bundles.download import Downloader
from kernex.agent.bundles.verify import check_manifest, check_signature, release_keys_from
from kernex.agent.identity import Identity
from kernex.protocol.messages import RegistrationResponse
from tests.fixtures.auth import authed_api_on
from tests.test_api_bundles import build, deploy, register_device, upload


async def test_agent_resumes_and_verifies_a_bundle_served_by_the_api(sqlite_url: str, tmp_path: Path) -> None:
    async with authed_api_on(tmp_path, sqlite_url) as api:
        archive_path = build(tmp_path, data=os.urandom(400_000))
        archive = archive_path.read_bytes()
        bundle = (await upload(api, archive)).json()
        key, device_id, registration_json = await register_device(api)
        registration = RegistrationResponse.model_validate(registration_json)
        await deploy(api, bundle["id"], [device_id])

        identity = Identity(key=key, key_path=tmp_path / "device.key", device_id=device_id)
        staging = tmp_path / "staging"
        staging.mkdir()
        downloader = Downloader(api.client, str(api.client.base_url), identity, staging)
        # Half a download left by an earlier, interrupted attempt: the agent resumes it with Range.
        downloader.part_path(bundle["sha256"]).write_bytes(archive[: len(archive) // 2])
        download = await downloader.fetch(
            bundle_id=bundle["id"], download_path=None, sha256=bundle["sha256"], size=bundle["size"]
        )
        assert downloader.requests == 1
        assert download.archive.read_bytes() == archive
        assert hashlib.sha256(download.archive.read_bytes()).hexdigest() == bundle["sha256"]

        claims = check_signature(
            download.signature, release_keys_from(registration.release_keys), archive_sha256=bundle["sha256"]
        )
        with BundleArchive(download.archive) as opened:
            manifest = check_manifest(
                opened.read_manifest(),
                claims,
                archive_sha256=bundle["sha256"],
                version="1.2.3",
                name="pump-firmware",
                device_type="rpi4",
                max_unpacked_bytes=10 * 1024 * 1024,
            )
        assert manifest.name == "pump-firmware"
