"""Is this archive the bundle the signed command names, vouched for by a pinned release key?

Checked in this order, so nothing is parsed before it is authentic:
1. the archive's SHA-256 equals the command's (the command itself is signed by the control plane);
2. the release signature verifies against a release key pinned at registration, and its claims
   name this archive's SHA-256 (from here on the archive is the one the release key signed);
3. the manifest (the archive's first member) hashes to the signed `manifest_sha256`, and its
   name and version are the signed ones and the command's; the device type fits; the declared
   sizes fit the unpacked limit; the scripts are listed, executable files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from kernex.agent.bundles.archive import refused
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import InvalidKeyError, MessageError, SignatureError
from kernex.protocol.keys import PublicKey, load_public_key_pem
from kernex.protocol.manifest import MANIFEST_NAME, Manifest, parse_manifest
from kernex.protocol.messages import CommandKey
from kernex.protocol.release import ReleaseClaims, check_release, verify_release

log = get_logger(__name__)


def release_keys_from(keys: Sequence[CommandKey]) -> dict[str, PublicKey]:
    """The pinned release keys by kid, as RegistrationResponse.release_keys lists them."""
    trusted: dict[str, PublicKey] = {}
    for key in keys:
        try:
            trusted[key.kid] = load_public_key_pem(key.public_key_pem)
        except InvalidKeyError as exc:
            # A control-plane fault, said loudly; bundles signed by the other keys still verify.
            log.exception("a pinned release key is unusable: ignoring it", kid=key.kid, error=str(exc))
    return trusted


def check_archive_hash(actual: str, expected: str) -> None:
    """Step 1: the downloaded bytes are the ones the command names."""
    if actual != expected:
        raise refused(f"the archive's sha256 is {actual}, the command says {expected}")


def check_signature(
    signature: str, trusted: Mapping[str, PublicKey], *, archive_sha256: str
) -> ReleaseClaims:
    """Step 2: a pinned release key signed this archive; returns the signed claims."""
    if not trusted:
        raise refused("no release keys are pinned (register again with a control plane that has one)")
    try:
        _kid, claims = verify_release(signature, trusted)
    except SignatureError as exc:
        raise refused(f"bad release signature: {exc}") from None
    if claims.archive_sha256 != archive_sha256:
        raise refused("the release signature is for a different archive")
    return claims


def check_manifest(
    manifest_bytes: bytes,
    claims: ReleaseClaims,
    *,
    archive_sha256: str,
    version: str,
    name: str | None,
    device_type: str,
    max_unpacked_bytes: int,
) -> Manifest:
    """Step 3: the signed manifest, for this command and this device; returns it parsed."""
    try:
        manifest = parse_manifest(manifest_bytes)
    except MessageError as exc:
        raise refused(f"invalid manifest: {exc}") from None
    try:
        check_release(
            claims,
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            archive_sha256=archive_sha256,
        )
    except SignatureError as exc:
        raise refused(f"{exc} (the signed claims do not match the manifest)") from None
    if manifest.version != version:
        raise refused(f"the bundle is version {manifest.version}, the command says {version}")
    if name is not None and manifest.name != name:
        raise refused(f"the bundle is {manifest.name!r}, the command says {name!r}")
    if not manifest.supports(device_type):
        raise refused(
            f"the bundle is for device types {manifest.device_types}, this device is {device_type!r}"
        )
    declared = sum(entry.size for entry in manifest.files)
    if declared > max_unpacked_bytes:
        raise refused(
            f"the manifest declares {declared} unpacked bytes, over the {max_unpacked_bytes}-byte limit"
        )
    executables = {entry.path for entry in manifest.files if entry.executable}
    if any(entry.path == MANIFEST_NAME for entry in manifest.files):
        raise refused(f"the manifest lists a file named {MANIFEST_NAME}, which is reserved")
    for label, script in (
        ("install", manifest.install),
        ("rollback", manifest.rollback),
        ("health_check", manifest.health_check),
    ):
        if script is not None and script.path not in executables:
            raise refused(f"the {label} script {script.path!r} is not marked executable in the manifest")
    return manifest
