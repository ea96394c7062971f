"""The bundles API in-process on a real database, with both real bundle stores (directory, moto S3)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from kernex.api.auth.schemas import Role
from kernex.api.bundles.service import DownloadAbortedError
from kernex.cli.bundle import build_bundle, sign_bundle
from kernex.protocol import devicetoken
from kernex.protocol.keys import (
    KeyType,
    build_csr,
    device_id_for,
    generate_private_key,
    load_public_key_pem,
    public_key_to_pem,
)
from kernex.protocol.release import check_release, release_key_id, verify_release
from kernex.storage.bundles.filesystem import FilesystemStore
from kernex.storage.bundles.s3 import S3Options, S3Store
from kernex.storage.database import engine_scope, session_factory
from kernex.storage.models import AuditEntry, Bundle, Deployment, DeploymentTarget
from tests.fixtures.auth import AuthedApi, authed_api_on, bearer

MIB = 1024 * 1024
LIMIT = 24 * MIB  # room for a multipart S3 upload (8 MiB parts), small enough to exceed quickly
INSTALL = b"#!/bin/sh\nset -e\necho installed\n"


# --- bundles ----------------------------------------------------------------------------------


def write_source(root: Path, name: str = "pump-firmware", version: str = "1.2.3", **extra: Any) -> Path:
    """A bundle source directory: manifest.json (files generated at build) and two files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "install.sh").write_bytes(INSTALL)
    (root / "install.sh").chmod(0o755)
    (root / "app").mkdir(exist_ok=True)
    (root / "app" / "data.bin").write_bytes(extra.pop("data", os.urandom(50_000)))
    manifest = {
        "name": name,
        "version": version,
        "device_types": ["*"],
        "install": {"path": "install.sh", "timeout_s": 60},
        **extra,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def build(tmp_path: Path, **kwargs: Any) -> Path:
    source = write_source(tmp_path / f"src-{os.urandom(4).hex()}", **kwargs)
    path, _ = build_bundle(source, tmp_path / f"{os.urandom(4).hex()}.tar.gz")
    return path


def member(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, **attrs: Any):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if data is not None else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def raw_archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def manifest_bytes(files: dict[str, bytes], **overrides: Any) -> bytes:
    manifest = {
        "name": "hand-made",
        "version": "0.1.0",
        "device_types": ["*"],
        "files": [
            {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for path, data in files.items()
        ],
        "install": {"path": "install.sh"},
        **overrides,
    }
    return json.dumps(manifest).encode()


def good_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    files = {"install.sh": INSTALL}
    return [member("manifest.json", manifest_bytes(files)), member("install.sh", INSTALL)]


async def upload(api: AuthedApi, data: bytes, *, signature: str | None = None, role: Role = Role.OPERATOR):
    return await api.client.post(
        "/api/v1/bundles",
        data={"signature": signature} if signature else None,
        files={"file": ("bundle.tar.gz", data, "application/gzip")},
        headers=api.headers(role),
    )


# --- fixtures ---------------------------------------------------------------------------------


def store_overrides(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "filesystem":
        return {}
    options: S3Options = request.getfixturevalue("s3_options")
    return {
        "bundle_store": "s3",
        "s3_bucket": options.bucket,
        "s3_endpoint_url": options.endpoint_url,
        "s3_region": options.region,
        "s3_access_key": options.access_key,
        "s3_secret_key": options.secret_key,
    }


@pytest.fixture
def trusted_key(tmp_path: Path):
    """An offline release key, its public half configured as trusted."""
    key = generate_private_key(KeyType.ECDSA_P256)
    public = tmp_path / "trusted-release.pub"
    public.write_text(public_key_to_pem(key.public_key()))
    return key, public


@pytest.fixture(params=["filesystem", "s3"])
async def api(
    request: pytest.FixtureRequest, sqlite_url: str, tmp_path: Path, trusted_key
) -> AsyncIterator[AuthedApi]:
    overrides = {
        "max_bundle_bytes": LIMIT,
        "trusted_release_keys": [trusted_key[1]],
        **store_overrides(request.param, request),
    }
    async with authed_api_on(tmp_path, sqlite_url, **overrides) as authed:
        yield authed


def runtime_store(api: AuthedApi):
    return api.app.state.bundles.store


async def stored_leftovers(api: AuthedApi) -> list[str]:
    store = runtime_store(api)
    if isinstance(store, FilesystemStore):
        return [str(p) for p in store.root.rglob("*") if p.is_file()]
    assert isinstance(store, S3Store)
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    objects = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return [f"upload:{u['Key']}" for u in uploads] + [f"object:{o['Key']}" for o in objects]


async def register_device(api: AuthedApi):
    key = generate_private_key(KeyType.ECDSA_P256)
    device_id = device_id_for(key.public_key())
    response = await api.client.post("/api/v1/devices/register", json={"csr": build_csr(key, device_id)})
    assert response.status_code == 201, response.text
    return key, device_id, response.json()


async def deploy(api: AuthedApi, bundle_id: str, device_ids: list[str], status: str = "in_progress") -> str:
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        deployment = Deployment(bundle_id=bundle_id, status=status)
        session.add(deployment)
        await session.flush()
        for device_id in device_ids:
            session.add(DeploymentTarget(deployment_id=deployment.id, device_id=device_id))
        await session.commit()
        return deployment.id


async def audit_actions(api: AuthedApi) -> list[tuple[str, str, str | None]]:
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        rows = await session.exec(
            select(AuditEntry)
            .where(col(AuditEntry.action).startswith("bundle."))
            .order_by(col(AuditEntry.id))
        )
        return [(r.action, r.outcome, r.target) for r in rows.all()]


# --- tests ------------------------------------------------------------------------------------


async def test_upload_signs_stores_lists_and_serves(api: AuthedApi, tmp_path: Path) -> None:
    path = build(tmp_path)
    archive = path.read_bytes()
    response = await upload(api, archive)
    assert response.status_code == 201, response.text
    bundle = response.json()
    assert bundle["name"] == "pump-firmware"
    assert bundle["version"] == "1.2.3"
    assert bundle["sha256"] == hashlib.sha256(archive).hexdigest()
    assert bundle["size"] == len(archive)
    assert bundle["quarantined"] is False
    assert bundle["created_by"] == "user:operator-user"
    assert [f["path"] for f in bundle["manifest"]["files"]] == ["app/data.bin", "install.sh"]

    # The signature verifies with the release key a device receives at registration.
    _, _, registration = await register_device(api)
    release_keys = {k["kid"]: k for k in registration["release_keys"]}
    assert bundle["signed_by"] in release_keys
    assert release_keys[bundle["signed_by"]]["alg"] == "ES256"
    assert bundle["signed_by"].startswith("rel-")
    trusted = {kid: load_public_key_pem(k["public_key_pem"]) for kid, k in release_keys.items()}
    kid, claims = verify_release(bundle["signature"], trusted)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r|gz") as tar:
        first = tar.next()
        assert first is not None
        assert first.name == "manifest.json"
        extracted = tar.extractfile(first)
        assert extracted is not None
        manifest_sha = hashlib.sha256(extracted.read()).hexdigest()
    check_release(
        claims,
        name="pump-firmware",
        version="1.2.3",
        manifest_sha256=manifest_sha,
        archive_sha256=bundle["sha256"],
    )
    assert kid == bundle["signed_by"]

    got = await api.client.get(f"/api/v1/bundles/{bundle['id']}", headers=api.headers(Role.VIEWER))
    assert got.json() == bundle
    listed = await api.client.get(
        "/api/v1/bundles", params={"name": "pump-firmware"}, headers=api.headers(Role.VIEWER)
    )
    assert [b["id"] for b in listed.json()["items"]] == [bundle["id"]]
    assert listed.json()["total"] == 1
    schema = await api.client.get("/api/v1/bundles/manifest-schema", headers=api.headers(Role.VIEWER))
    assert "device_types" in schema.json()["properties"]

    download = await api.client.get(
        f"/api/v1/bundles/{bundle['id']}/download", headers=api.headers(Role.VIEWER)
    )
    assert download.status_code == 200
    assert download.content == archive
    assert download.headers["etag"] == f'"{bundle["sha256"]}"'
    assert download.headers["accept-ranges"] == "bytes"
    assert download.headers["x-kernex-sha256"] == bundle["sha256"]
    assert download.headers["x-kernex-release-signature"] == bundle["signature"]
    assert download.headers["content-length"] == str(len(archive))


async def test_range_requests_resume_a_download(api: AuthedApi, tmp_path: Path) -> None:
    archive = build(tmp_path, data=os.urandom(300_000)).read_bytes()
    bundle = (await upload(api, archive)).json()
    url = f"/api/v1/bundles/{bundle['id']}/download"
    size = len(archive)
    etag = f'"{bundle["sha256"]}"'

    async def get(range_header: str, **extra: str) -> httpx.Response:
        return await api.client.get(
            url, headers={**api.headers(Role.OPERATOR), "Range": range_header, **extra}
        )

    resumed = await get("bytes=1000-")
    assert resumed.status_code == 206
    assert resumed.content == archive[1000:]
    assert resumed.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
    assert resumed.headers["content-length"] == str(size - 1000)
    assert resumed.headers["etag"] == etag

    middle = await get("bytes=10-19")
    assert (middle.status_code, middle.content) == (206, archive[10:20])
    past_end = await get(f"bytes=5-{size + 100}")
    assert (past_end.status_code, past_end.content) == (206, archive[5:])
    suffix = await get("bytes=-7")
    assert (suffix.status_code, suffix.content) == (206, archive[-7:])

    unsatisfiable = await get(f"bytes={size}-")
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"

    # A stale validator or a multi-range request gets the whole bundle, never a wrong slice.
    stale = await get("bytes=1000-", **{"If-Range": '"0000"'})
    assert (stale.status_code, stale.content) == (200, archive)
    fresh = await get("bytes=1000-", **{"If-Range": etag})
    assert fresh.status_code == 206
    multi = await get("bytes=0-1,5-6")
    assert (multi.status_code, multi.content) == (200, archive)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        pytest.param(
            [
                member("manifest.json", manifest_bytes({"install.sh": INSTALL}, version="1.x")),
                member("install.sh", INSTALL),
            ],
            "manifest version",
            id="bad-version",
        ),
        pytest.param(
            [
                member("manifest.json", manifest_bytes({"install.sh": INSTALL}, install=None)),
                member("install.sh", INSTALL),
            ],
            "manifest install",
            id="no-install",
        ),
        pytest.param(
            [member("manifest.json", b"{not json"), member("install.sh", INSTALL)], "manifest", id="not-json"
        ),
        pytest.param(
            [member("install.sh", INSTALL), member("manifest.json", manifest_bytes({"install.sh": INSTALL}))],
            "first member",
            id="manifest-not-first",
        ),
        pytest.param(
            [*good_members(), member("evil", kind=tarfile.SYMTYPE, linkname="/etc/passwd")],
            "symbolic link",
            id="symlink",
        ),
        pytest.param(
            [*good_members(), member("hard", kind=tarfile.LNKTYPE, linkname="install.sh")],
            "hard link",
            id="hardlink",
        ),
        pytest.param([*good_members(), member("dev", kind=tarfile.CHRTYPE)], "character device", id="device"),
        pytest.param([*good_members(), member("extra.txt", b"x")], "not listed", id="unlisted-file"),
        pytest.param([*good_members(), member("../escape", b"x")], "../escape", id="path-escape"),
        pytest.param(
            [
                member("manifest.json", manifest_bytes({"install.sh": INSTALL})),
                member("install.sh", INSTALL.replace(b"installed", b"INSTALLED")),
            ],
            "sha256",
            id="hash-mismatch",
        ),
        pytest.param(
            [
                member("manifest.json", manifest_bytes({"install.sh": INSTALL, "lib/x.so": b"so"})),
                member("install.sh", INSTALL),
            ],
            "lib/x.so",
            id="listed-missing",
        ),
        pytest.param([], "empty", id="empty-archive"),
    ],
)
async def test_invalid_bundles_are_refused_naming_the_problem(api: AuthedApi, members, expected: str) -> None:
    response = await upload(api, raw_archive(*members))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_bundle"
    assert expected in error["message"]
    assert await stored_leftovers(api) == []


async def test_malformed_forms_are_refused(api: AuthedApi, tmp_path: Path) -> None:
    archive = build(tmp_path).read_bytes()
    not_gzip = await upload(api, b"this is not a tarball at all" * 100)
    assert not_gzip.status_code == 422
    assert "gzip" in not_gzip.json()["error"]["message"]

    no_file = await api.client.post(
        "/api/v1/bundles",
        data={"signature": "x"},
        files={"other": ("a", b"b")},
        headers=api.headers(Role.OPERATOR),
    )
    assert no_file.status_code == 422
    assert "other" in no_file.json()["error"]["message"]

    boundary = "kernexboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.tar.gz"\r\n\r\n'.encode()
        + archive
        + f"\r\n--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="signature"\r\n\r\nsig\r\n'
        + f"--{boundary}--\r\n".encode()
    )
    late_signature = await api.client.post(
        "/api/v1/bundles",
        content=body,
        headers={**api.headers(Role.OPERATOR), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert late_signature.status_code == 422
    assert "before" in late_signature.json()["error"]["message"]

    json_body = await api.client.post(
        "/api/v1/bundles", json={"file": "x"}, headers=api.headers(Role.OPERATOR)
    )
    assert json_body.status_code == 422
    assert await stored_leftovers(api) == []


async def test_duplicate_name_and_version_is_409(api: AuthedApi, tmp_path: Path) -> None:
    first = await upload(api, build(tmp_path, version="2.0.0").read_bytes())
    assert first.status_code == 201
    # Different bytes, same name and version.
    second = await upload(api, build(tmp_path, version="2.0.0").read_bytes())
    assert second.status_code == 409
    assert "already exists" in second.json()["error"]["message"]
    assert len(await stored_leftovers(api)) == 1
    assert ("bundle.upload", "failed", None) in await audit_actions(api)


async def test_offline_signatures_from_trusted_keys_only(api: AuthedApi, tmp_path: Path, trusted_key) -> None:
    key, _ = trusted_key
    path = build(tmp_path, version="3.0.0")
    signature, kid = sign_bundle(path, key)
    assert kid == release_key_id(key.public_key())
    accepted = await upload(api, path.read_bytes(), signature=signature)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["signed_by"] == kid
    assert accepted.json()["signature"] == signature
    _, _, registration = await register_device(api)
    assert kid in {k["kid"] for k in registration["release_keys"]}

    other = build(tmp_path, version="3.0.1")
    unknown, _ = sign_bundle(other, generate_private_key(KeyType.ECDSA_P256))
    refused = await upload(api, other.read_bytes(), signature=unknown)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_signature"
    assert "unknown key" in refused.json()["error"]["message"]

    wrong_bundle = await upload(api, other.read_bytes(), signature=signature)
    assert wrong_bundle.status_code == 422
    assert "different bundle" in wrong_bundle.json()["error"]["message"]
    assert len(await stored_leftovers(api)) == 1


async def test_over_the_limit_is_413_and_leaves_nothing(sqlite_url: str, tmp_path: Path) -> None:
    async with authed_api_on(tmp_path, sqlite_url, max_bundle_bytes=64 * 1024) as api:
        archive = build(tmp_path, data=os.urandom(200_000)).read_bytes()
        declared = await upload(api, archive)
        assert declared.status_code == 413

        # Without a Content-Length (chunked), the stream is cut off once it passes the limit.
        boundary = "kernexboundary"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\n'.encode()

        async def chunked() -> AsyncIterator[bytes]:
            yield head
            for i in range(0, len(archive), 16 * 1024):
                yield archive[i : i + 16 * 1024]
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = await api.client.post(
            "/api/v1/bundles",
            content=chunked(),
            headers={
                **api.headers(Role.OPERATOR),
                "Content-Type": f"multipart/form-data; boundary={boundary}",
            },
        )
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "bundle_too_large"
        assert await stored_leftovers(api) == []


class ConnectionLostError(Exception):
    """The client went away mid-upload (injected)."""


async def test_interrupted_upload_leaves_nothing(api: AuthedApi, tmp_path: Path) -> None:
    archive = build(tmp_path, data=os.urandom(12 * MIB)).read_bytes()
    boundary = "kernexboundary"

    async def dies_midway() -> AsyncIterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\n'.encode()
        for i in range(0, 10 * MIB, 256 * 1024):  # past the first 8 MiB S3 part
            yield archive[i : i + 256 * 1024]
        raise ConnectionLostError

    # Starlette's middleware may hand the client's failure back wrapped in an exception group.
    with pytest.raises(BaseException) as raised:
        await api.client.post(
            "/api/v1/bundles",
            content=dies_midway(),
            headers={
                **api.headers(Role.OPERATOR),
                "Content-Type": f"multipart/form-data; boundary={boundary}",
            },
        )
    if isinstance(raised.value, BaseExceptionGroup):
        assert raised.group_contains(ConnectionLostError)
    else:
        assert isinstance(raised.value, ConnectionLostError)
    assert await stored_leftovers(api) == []
    listed = await api.client.get("/api/v1/bundles", headers=api.headers(Role.VIEWER))
    assert listed.json()["total"] == 0


async def test_corrupt_at_rest_is_quarantined_and_refused(api: AuthedApi, tmp_path: Path) -> None:
    archive = build(tmp_path).read_bytes()
    bundle = (await upload(api, archive)).json()
    store = runtime_store(api)
    tampered = bytearray(archive)
    tampered[len(tampered) // 2] ^= 0xFF
    async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
        row = await session.get(Bundle, bundle["id"])
        assert row is not None
        key = row.storage_key
    if isinstance(store, FilesystemStore):
        store.path_of(key).write_bytes(bytes(tampered))
    else:
        store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(tampered))

    url = f"/api/v1/bundles/{bundle['id']}/download"
    refused = await api.client.get(url, headers=api.headers(Role.OPERATOR))
    assert refused.status_code == 410
    assert refused.json()["error"]["code"] == "quarantined"
    got = await api.client.get(f"/api/v1/bundles/{bundle['id']}", headers=api.headers(Role.VIEWER))
    assert got.json()["quarantined"] is True
    assert ("bundle.quarantine", "success", f"bundle:{bundle['id']}") in await audit_actions(api)
    again = await api.client.get(url, headers={**api.headers(Role.OPERATOR), "Range": "bytes=10-"})
    assert again.status_code == 410


async def test_download_authorization(api: AuthedApi, tmp_path: Path) -> None:
    archive = build(tmp_path).read_bytes()
    bundle = (await upload(api, archive)).json()
    other = (await upload(api, build(tmp_path, version="9.9.9").read_bytes())).json()
    url = f"/api/v1/bundles/{bundle['id']}/download"
    key, device_id, _ = await register_device(api)
    other_key, other_id, _ = await register_device(api)

    def device_auth(k, d) -> dict[str, str]:
        return bearer(devicetoken.issue(k, d))

    assert (await api.client.get(url)).status_code == 401
    assert (await api.client.get(url, headers=bearer("garbage"))).status_code == 401
    not_targeted = await api.client.get(url, headers=device_auth(key, device_id))
    assert not_targeted.status_code == 403

    await deploy(api, bundle["id"], [device_id], status="pending")
    await deploy(api, other["id"], [other_id], status="in_progress")
    await deploy(api, bundle["id"], [other_id], status="succeeded")
    allowed = await api.client.get(url, headers=device_auth(key, device_id))
    assert allowed.status_code == 200
    assert allowed.content == archive
    resumed = await api.client.get(url, headers={**device_auth(key, device_id), "Range": "bytes=100-"})
    assert (resumed.status_code, resumed.content) == (206, archive[100:])
    # A target of another bundle's deployment, or of a finished one, may not fetch this bundle.
    assert (await api.client.get(url, headers=device_auth(other_key, other_id))).status_code == 403

    # Device tokens never open operator routes; operators of every role may download.
    listed = await api.client.get("/api/v1/bundles", headers=device_auth(key, device_id))
    assert listed.status_code == 401
    for role in Role:
        assert (await api.client.get(url, headers=api.headers(role))).status_code == 200
    missing = await api.client.get("/api/v1/bundles/nope/download", headers=api.headers(Role.VIEWER))
    assert missing.status_code == 404


async def test_delete_is_refused_while_deployed(api: AuthedApi, tmp_path: Path) -> None:
    bundle = (await upload(api, build(tmp_path).read_bytes())).json()
    spare = (await upload(api, build(tmp_path, version="0.0.1").read_bytes())).json()
    url = f"/api/v1/bundles/{bundle['id']}"
    assert (await api.client.delete(url, headers=api.headers(Role.VIEWER))).status_code == 403
    _, device_id, _ = await register_device(api)
    deployment_id = await deploy(api, bundle["id"], [device_id])
    refused = await api.client.delete(url, headers=api.headers(Role.OPERATOR))
    assert refused.status_code == 409
    assert deployment_id in refused.json()["error"]["message"]
    assert "active" in refused.json()["error"]["message"]
    assert len(await stored_leftovers(api)) == 2

    deleted = await api.client.delete(f"/api/v1/bundles/{spare['id']}", headers=api.headers(Role.OPERATOR))
    assert deleted.status_code == 204
    assert (
        await api.client.get(f"/api/v1/bundles/{spare['id']}", headers=api.headers(Role.VIEWER))
    ).status_code == 404
    assert len(await stored_leftovers(api)) == 1
    actions = await audit_actions(api)
    assert ("bundle.delete", "failed", f"bundle:{bundle['id']}") in actions
    assert ("bundle.delete", "success", f"bundle:{spare['id']}") in actions


async def test_viewers_cannot_upload(api: AuthedApi, tmp_path: Path) -> None:
    response = await upload(api, build(tmp_path).read_bytes(), role=Role.VIEWER)
    assert response.status_code == 403
    assert await stored_leftovers(api) == []


async def test_upload_and_download_on_postgres_and_sqlite(database_url: str, tmp_path: Path) -> None:
    async with authed_api_on(tmp_path, database_url) as api:
        archive = build(tmp_path).read_bytes()
        bundle = (await upload(api, archive)).json()
        key, device_id, _ = await register_device(api)
        await deploy(api, bundle["id"], [device_id])
        response = await api.client.get(
            f"/api/v1/bundles/{bundle['id']}/download", headers=bearer(devicetoken.issue(key, device_id))
        )
        assert (response.status_code, response.content) == (200, archive)
        assert (await upload(api, archive)).status_code == 409


async def test_bytes_changed_after_verification_break_the_download(sqlite_url: str, tmp_path: Path) -> None:
    async with authed_api_on(tmp_path, sqlite_url) as api:
        archive = build(tmp_path, data=os.urandom(3 * MIB)).read_bytes()
        bundle = (await upload(api, archive)).json()
        url = f"/api/v1/bundles/{bundle['id']}/download"
        assert (await api.client.get(url, headers=api.headers(Role.OPERATOR))).content == archive

        # Rewrite in place, keeping inode, size and mtime: the verified version looks unchanged,
        # so only the hash taken while streaming can notice.
        store = runtime_store(api)
        async with engine_scope(api.database_url) as engine, session_factory(engine)() as session:
            row = await session.get(Bundle, bundle["id"])
            assert row is not None
            path = store.path_of(row.storage_key)
        before = path.stat()
        with path.open("r+b") as handle:
            handle.seek(len(archive) // 2)
            handle.write(bytes([archive[len(archive) // 2] ^ 0xFF]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

        # The server breaks the response off before its last chunk (in-process: the error surfaces).
        with pytest.raises(BaseException) as raised:
            await api.client.get(url, headers=api.headers(Role.OPERATOR))
        if isinstance(raised.value, BaseExceptionGroup):
            assert raised.group_contains(DownloadAbortedError, match="changed while being served")
        else:
            assert isinstance(raised.value, DownloadAbortedError)
        got = await api.client.get(f"/api/v1/bundles/{bundle['id']}", headers=api.headers(Role.VIEWER))
        assert got.json()["quarantined"] is True
        assert (await api.client.get(url, headers=api.headers(Role.OPERATOR))).status_code == 410


async def test_encrypted_filesystem_store_through_the_api(sqlite_url: str, tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    async with authed_api_on(tmp_path, sqlite_url, bundle_encryption_key=key) as api:
        archive = build(tmp_path, data=os.urandom(200_000)).read_bytes()
        bundle = (await upload(api, archive)).json()
        store = runtime_store(api)
        (stored,) = [p for p in store.objects.rglob("*") if p.is_file()]
        assert archive[:64] not in stored.read_bytes()
        url = f"/api/v1/bundles/{bundle['id']}/download"
        full = await api.client.get(url, headers=api.headers(Role.OPERATOR))
        assert full.content == archive
        part = await api.client.get(url, headers={**api.headers(Role.OPERATOR), "Range": "bytes=70000-"})
        assert (part.status_code, part.content) == (206, archive[70000:])


async def test_presigned_s3_downloads_redirect_after_authorization(
    sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    overrides = {**store_overrides("s3", request), "s3_presigned_downloads": True, "presign_ttl_s": 60}
    async with authed_api_on(tmp_path, sqlite_url, **overrides) as api:
        archive = build(tmp_path).read_bytes()
        bundle = (await upload(api, archive)).json()
        url = f"/api/v1/bundles/{bundle['id']}/download"
        key, device_id, _ = await register_device(api)
        device = bearer(devicetoken.issue(key, device_id))
        assert (await api.client.get(url, headers=device)).status_code == 403
        await deploy(api, bundle["id"], [device_id])
        redirect = await api.client.get(url, headers=device)
        assert redirect.status_code == 307
        assert redirect.headers["x-kernex-sha256"] == bundle["sha256"]
        assert redirect.headers["x-kernex-release-signature"] == bundle["signature"]
        async with httpx.AsyncClient() as plain:
            fetched = await plain.get(redirect.headers["location"])
        assert fetched.content == archive


async def test_concurrent_duplicates_store_one(api: AuthedApi, tmp_path: Path) -> None:
    archives = [build(tmp_path, version="5.0.0", data=os.urandom(2 * MIB)).read_bytes() for _ in range(3)]
    responses = await asyncio.gather(*(upload(api, a) for a in archives))
    assert sorted(r.status_code for r in responses) == [201, 409, 409], [r.text for r in responses]
    assert len(await stored_leftovers(api)) == 1
