"""Bundle manifests and release signatures, as both the API and the agent read them."""

from __future__ import annotations

import json
import re

import pytest

from kernex.protocol.exceptions import MessageError, SignatureError
from kernex.protocol.keys import KeyType, generate_private_key
from kernex.protocol.manifest import compare_versions, parse_manifest
from kernex.protocol.release import ReleaseClaims, check_release, sign_release, verify_release

SHA = "a" * 64


def manifest(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "schema": 1,
        "name": "edge-app",
        "version": "1.4.2",
        "device_types": ["*"],
        "files": [{"path": "install.sh", "sha256": SHA, "size": 10, "executable": True}],
        "install": {"path": "install.sh", "timeout_s": 60},
    }
    data.update(overrides)
    return data


def test_valid_manifest_round_trips() -> None:
    parsed = parse_manifest(json.dumps(manifest()).encode())
    assert parsed.name == "edge-app"
    assert parsed.supports("rpi4")
    assert parse_manifest(parsed.to_json_bytes()) == parsed


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"version": "1.4"}, "version"),
        ({"name": "Edge App"}, "name"),
        ({"device_types": []}, "device_types"),
        ({"files": [{"path": "../evil", "sha256": SHA, "size": 1}]}, "files.0.path"),
        ({"files": [{"path": "/etc/passwd", "sha256": SHA, "size": 1}]}, "files.0.path"),
        ({"files": [{"path": "a/./b", "sha256": SHA, "size": 1}]}, "files.0.path"),
        ({"files": [{"path": "install.sh", "sha256": "XYZ", "size": 1}]}, "files.0.sha256"),
        ({"install": {"path": "missing.sh"}}, "install.path"),
        ({"install": {"path": "install.sh", "timeout_s": 0}}, "install.timeout_s"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_manifests_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(MessageError, match=re.escape(field)):
        parse_manifest(json.dumps(manifest(**overrides)).encode())


def test_duplicate_paths_and_garbage_are_refused() -> None:
    entry = {"path": "install.sh", "sha256": SHA, "size": 1}
    with pytest.raises(MessageError, match="twice"):
        parse_manifest(json.dumps(manifest(files=[entry, entry])).encode())
    with pytest.raises(MessageError):
        parse_manifest(b"\xff not json")


def test_semver_ordering() -> None:
    assert compare_versions("1.10.0", "1.9.9") == 1
    assert compare_versions("1.0.0-rc.1", "1.0.0") == -1
    assert compare_versions("2.0.0", "2.0.0") == 0


def test_release_signatures() -> None:
    key = generate_private_key(KeyType.ECDSA_P256)
    claims = ReleaseClaims(name="edge-app", version="1.4.2", manifest_sha256=SHA, archive_sha256="b" * 64)
    signature = sign_release(claims, key, "rel-1")
    kid, verified = verify_release(signature, {"rel-1": key.public_key()})
    assert kid == "rel-1"
    check_release(verified, name="edge-app", version="1.4.2", manifest_sha256=SHA, archive_sha256="b" * 64)
    with pytest.raises(SignatureError, match="different bundle"):
        check_release(
            verified, name="edge-app", version="1.4.3", manifest_sha256=SHA, archive_sha256="b" * 64
        )
    with pytest.raises(SignatureError, match="unknown key"):
        verify_release(signature, {"rel-2": key.public_key()})
    other = generate_private_key(KeyType.ECDSA_P256)
    with pytest.raises(SignatureError):
        verify_release(signature, {"rel-1": other.public_key()})
