"""Validate a bundle archive in one streaming pass, in a thread of its own, as its bytes arrive.

The contract (DESIGN.md "Bundles"; the agent checks the same before extracting): a gzip tar
whose FIRST member is `manifest.json`; every other regular file is listed in the manifest's
`files` with its size and SHA-256, and every listed file is present; directories are allowed;
nothing else (links, devices, FIFOs, sparse files). tarfile's stream mode ("r|gz") reads
forward only, so memory stays constant whatever the archive's size.

The upload handler pushes chunks with `feed()`; the inspector thread pulls them through a
bounded queue (back-pressure instead of buffering), hashes every raw byte (the archive's
SHA-256 is computed here, off the event loop), and reports the manifest as soon as it has it,
so a duplicate name+version can be refused before the rest of the upload is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import tarfile
import threading
import zlib
from dataclasses import dataclass

from kernex.api.bundles.errors import BundleFormatError
from kernex.protocol.exceptions import MessageError
from kernex.protocol.manifest import FILES_MAX, MANIFEST_MAX_BYTES, MANIFEST_NAME, Manifest, check_member_path
from kernex.protocol.manifest import parse_manifest as parse_manifest_bytes

QUEUE_CHUNKS = 16  # back-pressure after ~1 MiB of request chunks (uvicorn hands on ~64 KiB each)
POLL_S = 0.05  # how often an idle inspector checks whether the upload ended
HASH_CHUNK = 1024 * 1024
# Files plus the directories holding them: a tree of FILES_MAX files needs no more entries.
MEMBERS_MAX = 2 * FILES_MAX + 1
_KINDS = (
    (tarfile.TarInfo.issym, "a symbolic link"),
    (tarfile.TarInfo.islnk, "a hard link"),
    (tarfile.TarInfo.ischr, "a character device"),
    (tarfile.TarInfo.isblk, "a block device"),
    (tarfile.TarInfo.isfifo, "a FIFO"),
    (tarfile.TarInfo.issparse, "a sparse file"),
)


@dataclass(frozen=True)
class ArchiveReport:
    """What a valid archive is."""

    manifest: Manifest
    manifest_sha256: str
    archive_sha256: str
    size: int


class _Aborted(Exception):  # noqa: N818 - internal control flow, never leaves this module
    """The upload was abandoned; the inspector stops."""


class _QueueReader:
    """A blocking file-like view of the queued chunks that hashes every byte it hands out."""

    def __init__(self, chunks: queue.Queue[bytes], ended: threading.Event, aborted: threading.Event) -> None:
        self._chunks = chunks
        self._ended = ended
        self._aborted = aborted
        self._buffer = b""
        self._offset = 0
        self.digest = hashlib.sha256()
        self.size = 0

    def _next_chunk(self) -> bytes:
        while True:
            if self._aborted.is_set():
                raise _Aborted
            try:
                chunk = self._chunks.get(timeout=POLL_S)
            except queue.Empty:
                if self._ended.is_set() and self._chunks.empty():
                    return b""
                continue
            self.digest.update(chunk)
            self.size += len(chunk)
            return chunk

    def read(self, n: int = -1) -> bytes:
        if self._offset >= len(self._buffer):
            self._buffer, self._offset = self._next_chunk(), 0
        if n < 0:
            n = len(self._buffer) - self._offset
        piece = self._buffer[self._offset : self._offset + n]
        self._offset += len(piece)
        return piece

    def drain(self) -> None:
        """Consume (and hash) whatever follows the tar's end."""
        self._buffer, self._offset = b"", 0
        while self._next_chunk():
            pass


class ArchiveInspector:
    """Runs the validation thread for one upload; feed() chunks, then finish() or abort()."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._ended = threading.Event()
        self._aborted = threading.Event()
        self.manifest: Manifest | None = None
        self._result: asyncio.Future[ArchiveReport] = self._loop.create_future()
        # A dedicated thread, not the default executor: it lives as long as the upload, and the
        # executor's few workers are needed meanwhile for the store's writes.
        self._thread = threading.Thread(target=self._run, name="bundle-inspector", daemon=True)
        self._thread.start()

    async def feed(self, data: bytes) -> None:
        """Hand a chunk of the archive to the inspector; raises its error as soon as it has one."""
        self._raise_if_failed()
        try:
            self._chunks.put_nowait(data)
        except queue.Full:
            # The inspector is behind (hashing, a large member): wait for room in a thread.
            await asyncio.to_thread(self._chunks.put, data)

    async def finish(self) -> ArchiveReport:
        """The archive is complete: wait for the verdict."""
        self._ended.set()
        return await self._result

    def abort(self) -> None:
        """Stop the inspector (the upload failed elsewhere); idempotent."""
        self._aborted.set()
        if self._result.done() and not self._result.cancelled():
            self._result.exception()  # the upload's own error is what propagates; mark this one read

    def _raise_if_failed(self) -> None:
        if self._result.done():
            self._result.result()  # raises the inspector's error (a finished archive has none)

    def _publish_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def _settle(self, report: ArchiveReport | None, error: BaseException | None) -> None:
        if self._result.done():
            return
        if self._aborted.is_set():
            # Nobody awaits an abandoned upload's verdict: cancel rather than leave an unread error.
            self._result.cancel()
        elif error is not None:
            self._result.set_exception(error)
        else:
            assert report is not None
            self._result.set_result(report)

    def _run(self) -> None:
        reader = _QueueReader(self._chunks, self._ended, self._aborted)
        try:
            manifest, manifest_sha256 = self._inspect(reader)
            reader.drain()
        except _Aborted:
            self._loop.call_soon_threadsafe(self._settle, None, None)
            return
        except BundleFormatError as exc:
            self._fail_and_drain(reader, exc)
            return
        except (tarfile.TarError, zlib.error, EOFError, OSError, TypeError) as exc:
            # TypeError: CPython's tarfile calls ord() on an empty read when the gzip header ends
            # right after its method byte (found by tests/test_fuzz_bundles.py).
            self._fail_and_drain(reader, BundleFormatError(f"not a gzip-compressed tar archive: {exc}"))
            return
        except Exception as exc:
            # Anything else is a bug, but the thread must still settle the verdict: an unsettled
            # one leaves the upload request waiting forever. The handler re-raises it (a 500).
            self._loop.call_soon_threadsafe(self._settle, None, exc)
            raise
        report = ArchiveReport(
            manifest=manifest,
            manifest_sha256=manifest_sha256,
            archive_sha256=reader.digest.hexdigest(),
            size=reader.size,
        )
        self._loop.call_soon_threadsafe(self._settle, report, None)

    def _fail_and_drain(self, reader: _QueueReader, error: BundleFormatError) -> None:
        self._loop.call_soon_threadsafe(self._settle, None, error)
        # Keep taking chunks until the handler sees the error, so its feed() never blocks on us.
        try:
            reader.drain()
        except _Aborted:
            return

    def _inspect(self, reader: _QueueReader) -> tuple[Manifest, str]:
        with tarfile.open(fileobj=reader, mode="r|gz") as archive:  # type: ignore[call-overload] # a duck-typed stream is what "r|" mode takes
            first = archive.next()
            if first is None:
                raise BundleFormatError("the archive is empty: manifest.json must be its first member")
            if first.name != MANIFEST_NAME or not first.isreg():
                raise BundleFormatError(
                    f"manifest.json must be the archive's first member (found {first.name!r} first)"
                )
            if first.size > MANIFEST_MAX_BYTES:
                raise BundleFormatError(f"manifest.json is over {MANIFEST_MAX_BYTES} bytes")
            handle = archive.extractfile(first)
            assert handle is not None  # a regular file always has contents
            manifest_bytes = handle.read()
            try:
                manifest = parse_manifest_bytes(manifest_bytes)
            except MessageError as exc:
                raise BundleFormatError(str(exc)) from None
            if MANIFEST_NAME in {f.path for f in manifest.files}:
                raise BundleFormatError("manifest files: manifest.json cannot list itself")
            self._loop.call_soon_threadsafe(self._publish_manifest, manifest)
            self._check_members(archive, manifest)
        return manifest, hashlib.sha256(manifest_bytes).hexdigest()

    def _check_members(self, archive: tarfile.TarFile, manifest: Manifest) -> None:
        expected = {entry.path: entry for entry in manifest.files}
        seen: set[str] = set()
        count = 1
        while (member := archive.next()) is not None:
            count += 1
            if count > MEMBERS_MAX:
                raise BundleFormatError(f"the archive has more than {MEMBERS_MAX} members")
            path = _regular_file_path(member)
            if path is None:
                continue
            entry = expected.get(path)
            if entry is None:
                raise BundleFormatError(f"archive member {path!r} is not listed in the manifest's files")
            if path in seen:
                raise BundleFormatError(f"archive member {path!r} appears twice")
            seen.add(path)
            if member.size != entry.size:
                raise BundleFormatError(
                    f"files.{path}: the manifest says {entry.size} bytes, the archive holds {member.size}"
                )
            handle = archive.extractfile(member)
            assert handle is not None
            digest = hashlib.sha256()
            while block := handle.read(HASH_CHUNK):
                digest.update(block)
            if digest.hexdigest() != entry.sha256:
                raise BundleFormatError(f"files.{path}: sha256 does not match the file in the archive")
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleFormatError(f"files: {missing[0]!r} is listed in the manifest but not in the archive")


def _regular_file_path(member: tarfile.TarInfo) -> str | None:
    """The member's path if it is a regular file, None for a directory; BundleFormatError otherwise."""
    try:
        path = check_member_path(member.name)
    except ValueError as exc:
        raise BundleFormatError(f"archive member {member.name!r}: {exc}") from None
    for test, kind in _KINDS:
        if test(member):
            raise BundleFormatError(
                f"archive member {path!r} is {kind}: bundles hold only regular files and directories"
            )
    if member.isdir():
        return None
    if not member.isreg():
        raise BundleFormatError(f"archive member {path!r} has unsupported type {member.type!r}")
    return path
