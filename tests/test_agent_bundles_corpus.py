"""A corpus of malicious and broken bundles: each is refused with a clear error, the device keeps
running its version, and nothing is written outside the staging directory.

Archives are built here with tarfile/gzip and served by a real HTTP server. Most are signed by
the trusted release key (a compromised build pipeline), so the extraction checks, not the
signature, are what must stop them; the signature cases are signed wrongly on purpose.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kernex.agent.bundles import InstallReport, Outcome
from kernex.protocol.keys import KeyType, generate_private_key
from tests.fixtures.bundles import (
    INSTALL_SH,
    Bundle,
    Lab,
    good_bundle,
    gzip_of_zeros_after,
    manifest_bytes,
    open_lab,
    reg,
    sh,
    sign,
    snapshot,
    special,
    tar_gz,
    tar_prefix,
)

GIB = 1024**3
BOMB_BYTES = 10 * GIB
OUTSIDE = f"/tmp/kernex-escape-{uuid.uuid4().hex}"  # the absolute path an attack aims at


@pytest.fixture
async def lab(tmp_path, monkeypatch) -> AsyncIterator[Lab]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with httpx.AsyncClient(timeout=30) as http:
        with open_lab(tmp_path, http) as lab:
            report = await lab.install(good_bundle("1.0.0"))
            assert report.outcome is Outcome.SUCCEEDED, report.error
            yield lab


def _with_install(
    version: str, *extra: tuple[tarfile.TarInfo, bytes | None], files=None, **manifest
) -> Bundle:
    """A bundle whose manifest lists install.sh (and `files`), followed by hostile members."""
    listed = {"install.sh": sh(INSTALL_SH)} | (files or {})
    manifest_data = manifest_bytes(version, listed, executable=["install.sh"], **manifest)
    members = [reg("manifest.json", manifest_data), reg("install.sh", listed["install.sh"], 0o755)]
    members += [reg(path, data) for path, data in listed.items() if path != "install.sh"]
    return Bundle(tar_gz([*members, *extra]), manifest_data, version=version)


def traversal() -> Bundle:
    return _with_install("2.0.0", reg("../../../escape.sh", b"#!/bin/sh\n"))


def absolute() -> Bundle:
    return _with_install("2.0.0", reg(OUTSIDE, b"owned\n"))


def symlink_escape() -> Bundle:
    return _with_install(
        "2.0.0", special("app/passwd", tarfile.SYMTYPE, linkname="../../../../../etc/passwd")
    )


def hardlink_escape() -> Bundle:
    return _with_install("2.0.0", special("app/shadow", tarfile.LNKTYPE, linkname="/etc/shadow"))


def device_file() -> Bundle:
    info, _ = special("dev/sda", tarfile.BLKTYPE)
    info.devmajor, info.devminor = 8, 0
    return _with_install("2.0.0", (info, None))


def char_device() -> Bundle:
    info, _ = special("dev/mem", tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 1
    return _with_install("2.0.0", (info, None))


def fifo() -> Bundle:
    return _with_install("2.0.0", special("app/pipe", tarfile.FIFOTYPE))


def setuid_file() -> Bundle:
    tool = b"#!/bin/sh\nid\n"
    manifest_data = manifest_bytes(
        "2.0.0", {"install.sh": sh(INSTALL_SH), "bin/tool": tool}, executable=["install.sh"]
    )
    members = [reg("manifest.json", manifest_data), reg("install.sh", sh(INSTALL_SH), 0o755)]
    return Bundle(tar_gz([*members, reg("bin/tool", tool, 0o4755)]), manifest_data, version="2.0.0")


def content_mismatch() -> Bundle:
    """The manifest lists app.bin's hash; the archive carries other bytes of the same size."""
    honest, evil = b"good firmware!!\n", b"evil firmware!!\n"
    manifest_data = manifest_bytes(
        "2.0.0", {"install.sh": sh(INSTALL_SH), "app.bin": honest}, executable=["install.sh"]
    )
    members = [reg("manifest.json", manifest_data), reg("install.sh", sh(INSTALL_SH), 0o755)]
    return Bundle(tar_gz([*members, reg("app.bin", evil)]), manifest_data, version="2.0.0")


def unlisted_file() -> Bundle:
    return _with_install("2.0.0", reg("app/backdoor.sh", b"#!/bin/sh\n"))


def listed_but_missing() -> Bundle:
    manifest_data = manifest_bytes(
        "2.0.0", {"install.sh": sh(INSTALL_SH), "app/needed.bin": b"x" * 10}, executable=["install.sh"]
    )
    members = [reg("manifest.json", manifest_data), reg("install.sh", sh(INSTALL_SH), 0o755)]
    return Bundle(tar_gz(members), manifest_data, version="2.0.0")


def manifest_not_first() -> Bundle:
    manifest_data = manifest_bytes("2.0.0", {"install.sh": sh(INSTALL_SH)}, executable=["install.sh"])
    members = [reg("install.sh", sh(INSTALL_SH), 0o755), reg("manifest.json", manifest_data)]
    return Bundle(tar_gz(members), manifest_data, version="2.0.0")


def other_device_type() -> Bundle:
    return _with_install("2.0.0", device_types=["x86-server"])


def hundred_thousand_members() -> Bundle:
    """100,000 directory members: each one is harmless, their number is the attack."""
    manifest_data = manifest_bytes("2.0.0", {"install.sh": sh(INSTALL_SH)}, executable=["install.sh"])
    members = [reg("manifest.json", manifest_data), reg("install.sh", sh(INSTALL_SH), 0o755)]
    # One ustar header as a template, renamed d/00000 ... d/99999 with its checksum redone:
    # tarfile's tobuf() for each would take seconds.
    template = tarfile.TarInfo("d/00000")
    template.type, template.mode = tarfile.DIRTYPE, 0o755
    base = bytearray(template.tobuf(tarfile.USTAR_FORMAT))
    headers = bytearray()
    for index in range(100_000):
        header = bytearray(base)
        header[2:7] = b"%05d" % index
        header[148:156] = b"        "
        header[148:155] = b"%06o\0" % sum(header)
        headers += header
    tarfile.TarInfo.frombuf(bytes(headers[-512:]), "utf-8", "surrogateescape")  # a valid header
    prefix = tar_prefix(members) + bytes(headers) + bytes(2 * tarfile.BLOCKSIZE)
    return Bundle(gzip.compress(prefix, compresslevel=1), manifest_data, version="2.0.0")


def _bomb(declared: int) -> Bundle:
    """10 GiB of zeros as one member, ~10 MB gzipped; the manifest declares `declared` bytes."""
    manifest_data = manifest_bytes(
        "2.0.0",
        {"install.sh": sh(INSTALL_SH), "payload.bin": b""},
        executable=["install.sh"],
        sizes={"payload.bin": declared},
        sha256s={"payload.bin": hashlib.sha256(b"not computed").hexdigest()},
    )
    payload = tarfile.TarInfo("payload.bin")
    payload.size = BOMB_BYTES
    prefix = tar_prefix(
        [reg("manifest.json", manifest_data), reg("install.sh", sh(INSTALL_SH), 0o755), (payload, None)]
    )
    # The zeros are the payload's data, then the end-of-archive blocks (zeros as well).
    archive = gzip_of_zeros_after(prefix, BOMB_BYTES + (1 << 20))
    return Bundle(archive, manifest_data, version="2.0.0")


def pax_header_bomb() -> Bundle:
    """A PAX extended header announcing 10 GiB: tarfile would read it whole into memory."""
    manifest_data = manifest_bytes("2.0.0", {"install.sh": sh(INSTALL_SH)}, executable=["install.sh"])
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = BOMB_BYTES
    header = pax.tobuf(tarfile.GNU_FORMAT)  # base-256 size: ustar cannot say 10 GiB
    prefix = tar_prefix([reg("manifest.json", manifest_data), reg("install.sh", sh(INSTALL_SH), 0o755)])
    archive = gzip_of_zeros_after(prefix + header, BOMB_BYTES)
    return Bundle(archive, manifest_data, version="2.0.0")


def bomb_declared() -> Bundle:
    return _bomb(BOMB_BYTES)


def bomb_understated() -> Bundle:
    return _bomb(1024)


def truncated_archive() -> Bundle:
    """Cut in the middle of a file's data; signed as it is, so only the archive itself is wrong."""
    noise = hashlib.shake_256(b"incompressible").digest(256 * 1024)
    full = _with_install("2.0.0", files={"app/blob.bin": noise})
    return Bundle(full.archive[: len(full.archive) * 6 // 10], full.manifest, version="2.0.0")


CORPUS: dict[str, tuple[Callable[[], Bundle], str]] = {
    "path traversal": (traversal, r"bundle refused: member '\.\./\.\./\.\./escape\.sh' escapes the bundle"),
    "absolute path": (absolute, r"bundle refused: member '/tmp/kernex-escape-\w+' is an absolute path"),
    "symlink escape": (symlink_escape, r"member 'app/passwd' is a symbolic link \(to '\.\./.*etc/passwd'\)"),
    "hard-link escape": (hardlink_escape, r"member 'app/shadow' is a hard link \(to '/etc/shadow'\)"),
    "block device": (device_file, r"member 'dev/sda' is a device file"),
    "character device": (char_device, r"member 'dev/mem' is a device file"),
    "fifo": (fifo, r"member 'app/pipe' is a FIFO"),
    "setuid file": (setuid_file, r"member 'bin/tool' has setuid, setgid or sticky bits \(mode 4755\)"),
    "10 GiB bomb": (bomb_declared, r"manifest declares 10737418\d+ unpacked bytes, over the \d+-byte limit"),
    "10 GiB bomb, manifest understates": (
        bomb_understated,
        r"member 'payload\.bin' is 10737418240 bytes, the manifest says 1024",
    ),
    "10 GiB PAX header bomb": (
        pax_header_bomb,
        r"a 10737418240-byte tar metadata header \(PAX or GNU long name\)",
    ),
    "100k members": (hundred_thousand_members, r"more than 10001 members .* too many members"),
    "file hash mismatch": (
        content_mismatch,
        r"the content of 'app\.bin' does not match its sha256 in the manifest",
    ),
    "unlisted file": (unlisted_file, r"member 'app/backdoor\.sh' is not listed in the manifest"),
    "listed but missing": (
        listed_but_missing,
        r"1 listed file\(s\) missing from the archive: 'app/needed\.bin'",
    ),
    "manifest not first": (manifest_not_first, r"the first member is 'install\.sh', not manifest\.json"),
    "other device type": (other_device_type, r"for device types \['x86-server'\], this device is 'rpi4'"),
    "truncated archive": (
        truncated_archive,
        r"the archive is truncated or corrupt \(unexpected end of data\)",
    ),
}


async def _assert_refused(lab: Lab, report: InstallReport, pattern: str, before: dict[str, Any]) -> None:
    assert report.outcome is Outcome.FAILED
    assert report.error is not None
    assert re.search(pattern, report.error), report.error
    assert report.error.startswith("bundle refused: "), report.error
    assert report.current_version == "1.0.0"
    assert report.scripts == ()
    assert lab.paths.current_target() == "1.0.0"
    installed = await lab.installer.installed()
    assert installed.current is not None
    assert installed.current.version == "1.0.0"
    assert installed.pending is None
    # Nothing changed outside staging, and staging itself holds no leftovers either.
    assert snapshot(lab.root, exclude=lab.paths.staging) == before
    assert sorted(p.name for p in lab.paths.staging.iterdir()) == []
    assert not Path(OUTSIDE).exists()
    assert not (lab.root / "escape.sh").exists()
    assert lab.events[-1].stage == "failed"


@pytest.mark.parametrize("case", list(CORPUS))
async def test_malicious_bundle_is_refused_and_nothing_is_written(lab, case):
    build, pattern = CORPUS[case]
    bundle = build()
    before = snapshot(lab.root, exclude=lab.paths.staging)

    started = time.monotonic()
    report = await lab.install(bundle)

    await _assert_refused(lab, report, pattern, before)
    assert time.monotonic() - started < 10, "refused quickly, without inflating the whole archive"
    assert lab.journal() == ["install 1.0.0 prev=", "health 1.0.0"], "no script of a refused bundle ran"


async def test_unknown_release_key_is_refused_before_extraction(lab):
    bundle = good_bundle("2.0.0")
    stranger = generate_private_key(KeyType.ECDSA_P256)
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.install(bundle, signature=sign(bundle, stranger, kid="someone-else"))

    await _assert_refused(
        lab, report, r"bad release signature: release signed by unknown key 'someone-else'", before
    )
    assert [e.stage for e in lab.events[-3:]] == ["downloading", "verifying", "failed"], (
        "never reached installing"
    )


async def test_trusted_kid_with_a_forged_signature_is_refused(lab):
    bundle = good_bundle("2.0.0")
    forger = generate_private_key(KeyType.ECDSA_P256)
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.install(bundle, signature=sign(bundle, forger))  # claims the trusted kid

    await _assert_refused(lab, report, r"bad release signature: .*[Ss]ignature", before)


async def test_tampered_signature_bytes_are_refused(lab):
    bundle = good_bundle("2.0.0")
    header, payload, signature = sign(bundle, lab.release_key).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.install(bundle, signature=f"{header}.{payload}.{flipped}")

    await _assert_refused(lab, report, r"bad release signature", before)


@pytest.mark.parametrize(
    ("claims", "pattern"),
    [
        ({"manifest_sha256": "0" * 64}, r"signed claims do not match the manifest"),
        ({"version": "9.9.9"}, r"signed claims do not match the manifest"),
        ({"name": "other-app"}, r"signed claims do not match the manifest"),
        ({"archive_sha256": "0" * 64}, r"the release signature is for a different archive"),
    ],
)
async def test_signature_for_other_claims_is_refused_before_extraction(lab, claims, pattern):
    bundle = good_bundle("2.0.0")
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.install(bundle, signature=sign(bundle, lab.release_key, **claims))

    await _assert_refused(lab, report, pattern, before)
    assert "installing" not in [e.stage for e in lab.events[-3:]]


async def test_archive_other_than_the_command_names_is_refused(lab):
    bundle = good_bundle("2.0.0")
    request = lab.publish(bundle)
    # The server swaps in other bytes of the same size under the same name (a compromised store).
    served = lab.server.bundles[request.bundle_id]
    served.data = bytes(len(bundle.archive))
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.installer.apply(request)

    await _assert_refused(
        lab, report, rf"the archive's sha256 is [0-9a-f]{{64}}, the command says {bundle.sha256}", before
    )


async def test_api_announcing_another_sha256_is_refused(lab):
    bundle = good_bundle("2.0.0")
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.install(bundle, announce_sha256="f" * 64)

    await _assert_refused(lab, report, r"the API serves sha256 f{64}, the command says", before)


async def test_download_beyond_the_announced_size_is_cut(lab):
    bundle = good_bundle("2.0.0")
    request = lab.publish(bundle)
    lab.server.bundles[request.bundle_id].data = bundle.archive + bytes(100_000)
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await lab.installer.apply(request)

    await _assert_refused(lab, report, rf"larger than the {request.size} bytes the command announced", before)


async def test_bundle_over_the_size_limit_is_refused_before_download(lab):
    installer = lab.make_installer(max_bundle_bytes=100)
    request = lab.publish(good_bundle("2.0.0"))
    before = snapshot(lab.root, exclude=lab.paths.staging)

    report = await installer.apply(request)

    await _assert_refused(lab, report, r"over the 100-byte limit", before)
    assert not any(r.path.startswith(f"/api/v1/bundles/{request.bundle_id}") for r in lab.server.requests)


def test_bomb_generator_makes_a_real_gzip_stream():
    """The cheap bomb is a valid gzip stream: the same construction, small enough to inflate."""
    prefix = b"header" * 100
    stream = gzip_of_zeros_after(prefix, 4 << 20)
    assert gzip.decompress(stream) == prefix + bytes(4 << 20)
