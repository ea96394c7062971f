"""`kernex bundle build | keygen | sign | upload`, the upload against a real API over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from kernex.api.app import create_app
from kernex.api.auth.schemas import Role
from kernex.broker.pki import FleetPKI
from kernex.cli.main import app as cli
from kernex.protocol.keys import load_private_key_pem, load_public_key_pem
from kernex.protocol.manifest import parse_manifest
from kernex.protocol.release import release_key_id, verify_release
from tests.fixtures.auth import add_user, api_settings
from tests.fixtures.database import free_port

runner = CliRunner()


def source_dir(root: Path, manifest: dict[str, object] | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "install.sh").write_text("#!/bin/sh\necho ok\n")
    (root / "install.sh").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("level=3\n")
    base = {
        "name": "sensor-app",
        "version": "0.9.0",
        "device_types": ["rpi4"],
        "install": {"path": "install.sh"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest if manifest is not None else base))
    return root


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:gz") as archive:
        out = []
        for info in archive.getmembers():
            handle = archive.extractfile(info)
            out.append((info.name, handle.read() if handle else b""))
        return out


def test_build_generates_the_file_list_and_is_reproducible(tmp_path: Path) -> None:
    source = source_dir(tmp_path / "src")
    first = runner.invoke(cli, ["bundle", "build", str(source), "-o", str(tmp_path / "a.tar.gz")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(cli, ["bundle", "build", str(source), "-o", str(tmp_path / "b.tar.gz")])
    assert second.exit_code == 0
    a, b = (tmp_path / "a.tar.gz").read_bytes(), (tmp_path / "b.tar.gz").read_bytes()
    assert a == b  # fixed times and owners: the same tree gives the same archive
    assert hashlib.sha256(a).hexdigest() in first.output

    contents = members(tmp_path / "a.tar.gz")
    assert [name for name, _ in contents] == ["manifest.json", "etc/app.conf", "install.sh"]
    manifest = parse_manifest(contents[0][1])
    by_path = {f.path: f for f in manifest.files}
    assert by_path["install.sh"].executable is True
    assert by_path["etc/app.conf"].executable is False
    for name, data in contents[1:]:
        assert by_path[name].sha256 == hashlib.sha256(data).hexdigest()
        assert by_path[name].size == len(data)


def test_build_completes_and_checks_a_listed_file_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = {
        "name": "sensor-app",
        "version": "1.0.0",
        "device_types": ["*"],
        "install": {"path": "install.sh"},
        "files": [{"path": "install.sh", "executable": True}, {"path": "etc/app.conf"}],
    }
    source = source_dir(tmp_path / "src", manifest)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["bundle", "build", str(source)])
    assert result.exit_code == 0, result.output
    contents = members(tmp_path / "sensor-app-1.0.0.tar.gz")
    assert [name for name, _ in contents] == ["manifest.json", "install.sh", "etc/app.conf"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda src: (src / "stray.txt").write_text("x"), "stray.txt is in"),
        (lambda src: (src / "link").symlink_to(src / "install.sh"), "symbolic link"),
        (
            lambda src: (src / "manifest.json").write_text(json.dumps({"name": "x", "version": "1.x"})),
            "version",
        ),
        (lambda src: (src / "manifest.json").write_text("{"), "manifest.json"),
        (lambda src: (src / "manifest.json").unlink(), "missing"),
    ],
)
def test_build_refuses_with_one_line(tmp_path: Path, change, expected: str) -> None:
    manifest = {
        "name": "sensor-app",
        "version": "1.0.0",
        "device_types": ["*"],
        "install": {"path": "install.sh"},
        "files": [{"path": "install.sh"}, {"path": "etc/app.conf"}],
    }
    source = source_dir(tmp_path / "src", manifest)
    change(source)
    result = runner.invoke(cli, ["bundle", "build", str(source), "-o", str(tmp_path / "x.tar.gz")])
    assert result.exit_code == 1
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.tar.gz").exists()


def test_keygen_and_sign(tmp_path: Path) -> None:
    source = source_dir(tmp_path / "src")
    bundle = tmp_path / "b.tar.gz"
    assert runner.invoke(cli, ["bundle", "build", str(source), "-o", str(bundle)]).exit_code == 0
    key_path = tmp_path / "release.pem"
    made = runner.invoke(cli, ["bundle", "keygen", str(key_path)])
    assert made.exit_code == 0, made.output
    assert key_path.stat().st_mode & 0o777 == 0o600
    public = load_public_key_pem((tmp_path / "release.pem.pub").read_bytes())
    kid = release_key_id(public)
    assert kid in made.output
    assert runner.invoke(cli, ["bundle", "keygen", str(key_path)]).exit_code == 1  # never overwrites

    signed = runner.invoke(cli, ["bundle", "sign", str(bundle), "--key", str(key_path)])
    assert signed.exit_code == 0, signed.output
    signature = (tmp_path / "b.tar.gz.sig").read_text().strip()
    signer, claims = verify_release(signature, {kid: public})
    assert signer == kid
    assert claims.name == "sensor-app"
    assert claims.archive_sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert load_private_key_pem(key_path.read_bytes())

    not_a_bundle = tmp_path / "junk.tar.gz"
    not_a_bundle.write_bytes(os.urandom(100))
    refused = runner.invoke(cli, ["bundle", "sign", str(not_a_bundle), "--key", str(key_path)])
    assert refused.exit_code == 1
    assert "not a readable .tar.gz bundle" in refused.output


@pytest.fixture
def live_api(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[str, str, Path]]:
    """A real uvicorn serving the API on a free port; yields (url, operator token, trusted key)."""
    key_path = tmp_path / "offline.pem"
    assert runner.invoke(cli, ["bundle", "keygen", str(key_path)]).exit_code == 0
    settings = api_settings(tmp_path, sqlite_url, trusted_release_keys=[tmp_path / "offline.pem.pub"])
    FleetPKI.from_settings(settings).init()
    asyncio.run(add_user(sqlite_url, "release-bot", Role.OPERATOR))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        login = httpx.post(
            f"{url}/api/v1/auth/login",
            json={"username": "release-bot", "password": "correct horse battery staple"},
        )
        assert login.status_code == 200, login.text
        yield url, login.json()["access_token"], key_path
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_upload_with_progress_and_offline_signature(live_api, tmp_path: Path) -> None:
    url, token, key_path = live_api
    source = source_dir(tmp_path / "src")
    bundle = tmp_path / "b.tar.gz"
    assert runner.invoke(cli, ["bundle", "build", str(source), "-o", str(bundle)]).exit_code == 0

    uploaded = runner.invoke(cli, ["bundle", "upload", str(bundle), "--api", url, "--token", token])
    assert uploaded.exit_code == 0, uploaded.output
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() in uploaded.output
    assert "signed by rel-" in uploaded.output

    again = runner.invoke(cli, ["bundle", "upload", str(bundle), "--api", url, "--token", token, "-q"])
    assert again.exit_code == 1
    assert again.stderr.strip().splitlines() == [again.stderr.strip()]  # one line, on stderr
    assert "upload refused (409)" in again.stderr

    manifest = json.loads((source / "manifest.json").read_text()) | {"version": "0.9.1"}
    (source / "manifest.json").write_text(json.dumps(manifest))
    second = tmp_path / "c.tar.gz"
    assert runner.invoke(cli, ["bundle", "build", str(source), "-o", str(second)]).exit_code == 0
    assert runner.invoke(cli, ["bundle", "sign", str(second), "--key", str(key_path)]).exit_code == 0
    signed = runner.invoke(
        cli,
        ["bundle", "upload", str(second), "--api", url, "--token", token, "--signature", f"{second}.sig"],
    )
    assert signed.exit_code == 0, signed.output
    kid = release_key_id(load_private_key_pem(key_path.read_bytes()).public_key())
    assert f"signed by {kid}" in signed.output

    bad_token = runner.invoke(cli, ["bundle", "upload", str(second), "--api", url, "--token", "nope"])
    assert bad_token.exit_code == 1
    assert "upload refused (401)" in bad_token.output
    unreachable = runner.invoke(
        cli, ["bundle", "upload", str(second), "--api", f"http://127.0.0.1:{free_port()}", "--token", token]
    )
    assert unreachable.exit_code == 1
    assert "failed" in unreachable.output


def test_inspect_reads_only_the_first_member(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("install.sh")
        archive.addfile(info, io.BytesIO(b""))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(buffer.getvalue())
    key_path = tmp_path / "k.pem"
    assert runner.invoke(cli, ["bundle", "keygen", str(key_path)]).exit_code == 0
    result = runner.invoke(cli, ["bundle", "sign", str(bad), "--key", str(key_path)])
    assert result.exit_code == 1
    assert "first member" in result.output
