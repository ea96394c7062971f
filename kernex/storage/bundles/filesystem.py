"""The embedded bundle store: a directory in the data dir, optionally AES-256-GCM encrypted.

Objects are written to `tmp/` and renamed into `objects/` on commit, so a reader never sees a
partial file and an aborted or crashed upload leaves at most a temp file, which start() sweeps:
at once when the process that wrote it (named in the file name: host and pid) is gone, by age
when it belongs to another host sharing the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol

from kernex.storage.bundles import encryption
from kernex.storage.bundles.exceptions import BundleStoreError, StoredObjectMissingError
from kernex.storage.bundles.store import CHUNK_BYTES, BundleStore, StoredObject, Upload, check_key

PRIVATE_DIR_MODE = 0o700  # bundles may carry secrets of their own: no other user may list them
STALE_TEMP_AGE_S = 24 * 3600  # older temp files belong to a crashed process, never a live upload
TEMP_SUFFIX = ".part"


def _temp_prefix() -> str:
    """`<host>.<pid>.`: whose upload a temp file is, so a restart can tell a crashed one."""
    return f"{socket.gethostname().replace('.', '_')}.{os.getpid()}."


def _abandoned(name: str) -> bool:
    """True for a temp file of this host whose writer is no longer running (or is this process,
    which at start has no upload of its own yet: the pid was reused after a crash)."""
    host, _, rest = name.partition(".")
    pid_text = rest.partition(".")[0]
    if host != socket.gethostname().replace(".", "_") or not pid_text.isdigit():
        return False  # another host's, or the old naming: left to the age rule
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


class _Reader(Protocol):
    def read(self, at_least: int) -> bytes: ...


class FilesystemStore(BundleStore):
    """Bundles as files under root; encrypted at rest when given a 32-byte key."""

    kind: ClassVar[str] = "filesystem"

    def __init__(self, root: Path, encryption_key: bytes | None = None) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self._key = encryption_key

    @property
    def encrypted(self) -> bool:
        """Whether objects are sealed with AES-256-GCM."""
        return self._key is not None

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        try:
            for directory in (self.root, self.objects, self.tmp):
                directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            cutoff = time.time() - STALE_TEMP_AGE_S
            for leftover in self.tmp.iterdir():
                if _abandoned(leftover.name) or leftover.stat().st_mtime < cutoff:
                    leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise BundleStoreError(f"bundle directory {self.root} unusable: {exc}") from None

    def path_of(self, key: str) -> Path:
        """Where the object with this key is stored."""
        return self.objects / check_key(key)

    async def begin(self, key: str) -> Upload:
        target = self.path_of(key)
        encryptor = encryption.SegmentEncryptor(self._key, key) if self._key is not None else None
        try:
            fd, name = await asyncio.to_thread(
                tempfile.mkstemp, dir=self.tmp, prefix=_temp_prefix(), suffix=TEMP_SUFFIX
            )
        except OSError as exc:
            raise BundleStoreError(f"cannot create a temp file in {self.tmp}: {exc}") from None
        upload = _FileUpload(os.fdopen(fd, "wb"), Path(name), target, encryptor)
        if encryptor is not None:
            await upload.write_raw(encryptor.header)
        return upload

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        path = self.path_of(key)
        handle, reader = await asyncio.to_thread(self._open_reader, path, key, start, end)
        try:
            while True:
                chunk = await asyncio.to_thread(reader.read, CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk
        except OSError as exc:
            raise BundleStoreError(f"cannot read {path}: {exc}") from None
        finally:
            await asyncio.to_thread(handle.close)

    def _open_reader(self, path: Path, key: str, start: int, end: int | None) -> tuple[BinaryIO, _Reader]:
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise StoredObjectMissingError(f"no stored object {key!r}") from None
        except OSError as exc:
            raise BundleStoreError(f"cannot open {path}: {exc}") from None
        try:
            if self._key is not None:
                limit = end if end is not None else encryption.MAX_SEGMENTS * encryption.SEGMENT_BYTES
                reader: _Reader = encryption.SegmentReader(handle, self._key, key, start, limit)
            else:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(start)
                reader = _PlainReader(handle, min(end, size) - start if end is not None else size - start)
        except BaseException:
            handle.close()
            raise
        return handle, reader

    async def stat(self, key: str) -> StoredObject:
        path = self.path_of(key)
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            raise StoredObjectMissingError(f"no stored object {key!r}") from None
        except OSError as exc:
            raise BundleStoreError(f"cannot stat {path}: {exc}") from None
        size = encryption.plaintext_size(st.st_size) if self._key is not None else st.st_size
        return StoredObject(size=size, version=f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")

    async def delete(self, key: str) -> None:
        path = self.path_of(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise BundleStoreError(f"cannot delete {path}: {exc}") from None


class _PlainReader:
    def __init__(self, handle: BinaryIO, remaining: int) -> None:
        self._handle = handle
        self._remaining = max(0, remaining)

    def read(self, at_least: int) -> bytes:
        data = self._handle.read(min(at_least, self._remaining))
        self._remaining -= len(data)
        return data


class _FileUpload(Upload):
    # Writes are batched to CHUNK_BYTES so one thread hop carries a megabyte, not a network read.
    def __init__(
        self,
        handle: BinaryIO,
        temp: Path,
        target: Path,
        encryptor: encryption.SegmentEncryptor | None,
    ) -> None:
        self._handle = handle
        self._temp = temp
        self._target = target
        self._encryptor = encryptor
        self._pending = bytearray()
        self._done = False
        self._renamed = False

    async def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= CHUNK_BYTES:
            await self._flush()

    async def write_raw(self, data: bytes) -> None:
        await self._run(self._handle.write, data)

    async def _flush(self) -> None:
        data, self._pending = bytes(self._pending), bytearray()
        await self._run(self._write_sync, data)

    def _write_sync(self, data: bytes) -> None:
        self._handle.write(self._encryptor.update(data) if self._encryptor is not None else data)

    async def commit(self) -> None:
        try:
            await self._flush()
            await self._run(self._commit_sync)
        except BaseException:
            await self.abort()
            raise
        self._done = True

    def _commit_sync(self) -> None:
        if self._encryptor is not None:
            self._handle.write(self._encryptor.finalize())
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._target.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self._temp.replace(self._target)
        self._renamed = True
        # The rename is durable only once the directory entry is on disk.
        fd = os.open(self._target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._pending.clear()
        await self._run(self._abort_sync)

    def _abort_sync(self) -> None:
        with contextlib.suppress(OSError):  # already closed or failing: the unlink below is what matters
            self._handle.close()
        self._temp.unlink(missing_ok=True)
        if self._renamed:  # the directory fsync failed after the rename: do not leave it visible
            self._target.unlink(missing_ok=True)

    async def _run(self, fn: Callable[..., object], *args: object) -> None:
        try:
            await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise BundleStoreError(f"writing {self._target.name} failed: {exc}") from None
