"""Property-based fuzzing (hypothesis) of the bundle checks: the manifest parser, the API's
streaming archive inspector and the agent's extractor.

The properties: hostile archives end in the documented refusal (MessageError,
BundleFormatError, BundleRefusedError; BundleStorageError only for the device's own disk),
never another exception or a hang; and the agent never writes outside the directory it
extracts into, whatever the archive says.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kernex.agent.bundles.archive import BundleArchive
from kernex.agent.bundles.errors import BundleRefusedError, BundleStorageError
from kernex.api.bundles.archive import ArchiveInspector
from kernex.api.bundles.errors import BundleFormatError
from kernex.protocol.exceptions import MessageError
from kernex.protocol.manifest import parse_manifest
from tests.fixtures.bundles import good_bundle, manifest_bytes, reg, tar_gz

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INSPECT_TIMEOUT_S = 30  # a verdict on a few KiB: a hang, not a slow host, if it takes this long
CHUNK = 4096
GOOD = good_bundle("1.0.0")

# Names an archive may use to reach outside, or to confuse a path check.
hostile_names = st.sampled_from(
    [
        "manifest.json",
        "install.sh",
        "app/app.conf",
        "../escape",
        "/etc/passwd",
        "app/../../escape",
        "./install.sh",
        "app//x",
        "",
        ".",
        "app/",
        "a\x00b",
        "\udcff",
        "x" * 300,
        "app/sub/deep",
        "install.sh/child",
    ]
) | st.text(min_size=1, max_size=40)
kinds = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
        tarfile.GNUTYPE_SPARSE,
        b"Z",
    ]
)


@st.composite
def members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(draw(hostile_names))
    info.type = draw(kinds)
    info.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777, 0]))
    info.linkname = draw(st.sampled_from(["", "../escape", "/etc/passwd", "install.sh", "app"]))
    data = draw(st.binary(max_size=64)) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else None
    info.size = len(data) if data is not None else 0
    return info, data


def manifest_for(files: dict[str, bytes], **overrides: Any) -> bytes:
    manifest = json.loads(manifest_bytes("1.0.0", files, install=next(iter(files), "install.sh")))
    manifest.update(overrides)
    return json.dumps(manifest).encode()


@st.composite
def crafted_archives(draw: st.DrawFn) -> bytes:
    """A manifest (usually consistent with some files) followed by hostile members."""
    files = draw(
        st.dictionaries(
            st.sampled_from(["install.sh", "app/app.conf", "b"]), st.binary(max_size=32), max_size=3
        )
    )
    manifest = manifest_for(files) if files and draw(st.booleans()) else draw(st.binary(max_size=200))
    listed = [reg(path, data) for path, data in files.items()]
    rest = draw(st.lists(members(), max_size=6))
    order = draw(st.permutations(listed + rest)) if draw(st.booleans()) else listed + rest
    first = [] if draw(st.integers(0, 9)) == 0 else [reg("manifest.json", manifest)]
    try:
        return tar_gz(first + list(order))
    except (ValueError, UnicodeError, tarfile.TarError):
        # tarfile refused to write this combination; a raw mutation of a good bundle instead.
        return GOOD.archive[: len(GOOD.archive) // 2]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """The good bundle, gunzipped, with bytes flipped or cut, gzipped again (or the gzip itself cut)."""
    raw = bytearray(gzip.decompress(GOOD.archive))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    if draw(st.booleans()):
        raw = raw[:cut]
    packed = gzip.compress(bytes(raw))
    return packed[: draw(st.integers(0, len(packed)))] if draw(st.integers(0, 3)) == 0 else packed


archives = (
    st.binary(max_size=512) | st.binary(max_size=512).map(gzip.compress) | crafted_archives() | mutated()
)


@FUZZ
@given(
    st.binary(max_size=2048)
    | st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.text(max_size=12),
            st.recursive(
                st.none() | st.integers() | st.text() | st.floats(),
                lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                max_leaves=10,
            ),
            max_size=8,
        ),
    )
)
@example(b"{" * 50_000)
@example(manifest_for({"install.sh": b"x"}, version="1.0.0-" + "9" * 5000))
def test_the_manifest_parser_raises_only_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        parse_manifest(data)


async def _inspect(archive: bytes) -> None:
    inspector = ArchiveInspector()
    try:
        for i in range(0, len(archive), CHUNK):
            await inspector.feed(archive[i : i + CHUNK])
        await inspector.finish()
    except BundleFormatError:
        pass
    finally:
        inspector.abort()


@FUZZ
@given(archives)
@example(GOOD.archive)
@example(b"\x1f\x8b\x08")  # a gzip header cut after its method byte
def test_the_api_inspector_refuses_hostile_archives_only_with_bundle_format_error(archive: bytes) -> None:
    asyncio.run(asyncio.wait_for(_inspect(archive), INSPECT_TIMEOUT_S))


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file() and not p.is_symlink()
        else "-"
        for p in root.rglob("*")
    }


@FUZZ
@given(archives)
@example(GOOD.archive)
@example(b"\x1f\x8b\x08")  # a gzip header cut after its method byte: TypeError in tarfile
def test_the_agent_refuses_hostile_archives_and_never_writes_outside_its_directory(archive: bytes) -> None:
    with tempfile.TemporaryDirectory() as sandbox_name:
        sandbox = Path(sandbox_name)
        (sandbox / "outside").write_text("untouched")
        path = sandbox / "bundle.tar.gz"
        path.write_bytes(archive)
        dest = sandbox / "versions" / "1.0.0"
        dest.mkdir(parents=True)
        before = _tree(sandbox)
        try:
            with BundleArchive(path) as bundle:
                manifest = parse_manifest(bundle.read_manifest())
                bundle.extract(manifest, dest, max_unpacked_bytes=1 << 20)
        except (BundleRefusedError, MessageError):
            pass
        except BundleStorageError as exc:
            raise AssertionError(f"a hostile archive reported as a disk problem: {exc}") from exc
        after = _tree(sandbox)
        changed = set(set(before) ^ set(after) | {k for k in before if after.get(k) != before[k]})
        assert all(k.startswith("versions/1.0.0/") for k in changed), sorted(changed)
