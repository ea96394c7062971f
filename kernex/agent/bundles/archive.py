"""Reading a bundle archive safely: the manifest first, then every file checked as it is written.

The archive is read once, as a stream (`r|gz`), so a decompression bomb is refused at the
header that announces it, before its data is inflated. Each member is checked by our rules
(path confinement, regular files and directories only, no setuid/setgid/sticky bits, listed in
the manifest with its size, member count and total size capped) and then by the standard
library's `data` filter as a second opinion. Files are written by this module, never by
`TarFile.extract`: created exclusively without following links, their mode taken from the
manifest, their SHA-256 checked as the bytes are written.

Every function here blocks (decompression, hashing, file I/O): call them with `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Self

from kernex.agent.bundles.errors import BundleRefusedError, BundleStorageError
from kernex.agent.bundles.layout import fsync_dir
from kernex.protocol.manifest import (
    FILES_MAX,
    MANIFEST_MAX_BYTES,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_member_path,
)

CHUNK_BYTES = 1024 * 1024  # big enough for fast hashing, small enough to keep memory flat
# Every file may sit in its own directory; more directory members than that is abuse.
DIRS_MAX = FILES_MAX
FILE_MODE = 0o644
EXECUTABLE_MODE = 0o755
DIR_MODE = 0o755
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
# PAX and GNU long-name members carry names and attributes: kilobytes. tarfile reads them whole
# into memory before any check of ours could run, so their size is checked as the header is read.
METADATA_MAX_BYTES = 1024 * 1024
_METADATA_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
# Everything a damaged or truncated gzip/tar stream can raise while it is read. TypeError:
# CPython's tarfile calls ord() on an empty read when the gzip header ends right after its
# method byte (found by tests/test_fuzz_bundles.py).
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, TypeError)
# The data filter exists from 3.11.4 on (PEP 706); our own checks stand alone without it.
_DATA_FILTER = getattr(tarfile, "data_filter", None)


def refused(reason: str) -> BundleRefusedError:
    """The error for a bundle that breaks a rule, in one wording everywhere."""
    return BundleRefusedError(f"bundle refused: {reason}")


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise BundleStorageError(f"cannot read the downloaded bundle {path}: {exc}") from None
    return digest.hexdigest()


class BundleArchive:
    """One pass over a bundle `.tar.gz`: `read_manifest()`, then `extract()`."""

    def __init__(self, path: Path) -> None:
        try:
            # Stream mode: members are read strictly in order, data inflated only as it is read.
            self._tar = tarfile.open(path, mode="r|gz", tarinfo=_GuardedTarInfo)  # noqa: SIM115 - closed by close()
        except _READ_ERRORS as exc:
            raise refused(f"the archive is not a readable .tar.gz ({_reason(exc)})") from None
        self._manifest_read = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the archive file."""
        self._tar.close()

    def read_manifest(self) -> bytes:
        """The raw bytes of `manifest.json`, which must be the first member."""
        member = self._next()
        if member is None:
            raise refused("the archive is empty")
        if member.name != MANIFEST_NAME:
            raise refused(f"the first member is {member.name!r}, not {MANIFEST_NAME}")
        if not member.isreg():
            raise refused(f"{MANIFEST_NAME} is not a regular file")
        if member.size > MANIFEST_MAX_BYTES:
            raise refused(f"{MANIFEST_NAME} is over {MANIFEST_MAX_BYTES} bytes")
        source = self._open_member(member)
        data = self._read(source, member.size)
        if len(data) != member.size:
            raise refused("the archive is truncated (in manifest.json)")
        self._manifest_read = True
        return data

    def extract(self, manifest: Manifest, dest: Path, *, max_unpacked_bytes: int) -> None:
        """Unpack every other member into the empty directory `dest`, or refuse the bundle.

        On refusal `dest` may hold part of the bundle: the caller owns it and removes it.
        """
        if not self._manifest_read:
            raise RuntimeError("read_manifest() must come first")
        entries = {entry.path: entry for entry in manifest.files}
        max_members = len(entries) + DIRS_MAX
        written: set[str] = set()
        dirs: set[str] = set()
        unpacked = 0
        for count, member in enumerate(self._members(), start=1):
            if count > max_members:
                raise refused(
                    f"more than {max_members} members (the manifest lists {len(entries)} files): "
                    "too many members"
                )
            name = _checked_name(member)
            _check_kind(member, name)
            _second_opinion(member, dest)
            if member.isdir():
                if name in entries:
                    raise refused(f"member {name!r} is a directory, the manifest lists a file")
                dirs.add(name)
                continue
            entry = _listed_entry(member, name, entries, written)
            unpacked += member.size
            if unpacked > max_unpacked_bytes:
                raise refused(
                    f"the archive unpacks to more than the {max_unpacked_bytes}-byte limit "
                    f"(at member {name!r}): decompression bomb?"
                )
            self._write_file(member, dest / name, sha256=entry.sha256, executable=entry.executable)
            written.add(name)
        missing = sorted(entries.keys() - written)
        if missing:
            listed = ", ".join(repr(path) for path in missing[:5])
            raise refused(f"{len(missing)} listed file(s) missing from the archive: {listed}")
        _make_dirs(dest, dirs)

    def _members(self) -> Iterator[tarfile.TarInfo]:
        while (member := self._next()) is not None:
            yield member

    def _next(self) -> tarfile.TarInfo | None:
        try:
            return self._tar.next()
        except _READ_ERRORS as exc:
            raise refused(f"the archive is truncated or corrupt ({_reason(exc)})") from None

    def _open_member(self, member: tarfile.TarInfo) -> IO[bytes]:
        try:
            source = self._tar.extractfile(member)
        except _READ_ERRORS as exc:
            raise refused(f"the archive is truncated or corrupt ({_reason(exc)})") from None
        if source is None:  # only for non-regular members, which never get here
            raise refused(f"member {member.name!r} has no data")
        return source

    @staticmethod
    def _read(source: IO[bytes], size: int) -> bytes:
        try:
            return source.read(size)
        except _READ_ERRORS as exc:
            raise refused(f"the archive is truncated or corrupt ({_reason(exc)})") from None

    def _write_file(self, member: tarfile.TarInfo, target: Path, *, sha256: str, executable: bool) -> None:
        source = self._open_member(member)
        mode = EXECUTABLE_MODE if executable else FILE_MODE
        digest = hashlib.sha256()
        size = 0
        try:
            target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # O_EXCL and O_NOFOLLOW: never write through anything already there, link or file.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except (FileExistsError, NotADirectoryError):
            raise refused(f"member {member.name!r} collides with another member's path") from None
        except OSError as exc:
            raise BundleStorageError(f"cannot create {target}: {exc}") from None
        with os.fdopen(fd, "wb") as out:
            while chunk := self._read(source, CHUNK_BYTES):
                size += len(chunk)
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise BundleStorageError(f"cannot write {target}: {exc}") from None
            try:
                out.flush()
                # The umask must not decide whether an install script is executable.
                os.fchmod(out.fileno(), mode)
                # Durable before the version is published: a power cut must not leave empty files.
                os.fsync(out.fileno())
            except OSError as exc:
                raise BundleStorageError(f"cannot write {target}: {exc}") from None
        if size != member.size:
            raise refused(f"the archive is truncated (member {member.name!r})")
        if digest.hexdigest() != sha256:
            raise refused(f"the content of {member.name!r} does not match its sha256 in the manifest")


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an oversized metadata member before tarfile reads it into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # The hook tarfile calls for each header it reads (private, but the same from 3.8 to 3.13).
        if self.type in _METADATA_TYPES and self.size > METADATA_MAX_BYTES:
            raise refused(
                f"a {self.size}-byte tar metadata header (PAX or GNU long name): decompression bomb?"
            )
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]  # private: not in typeshed
        return member


def _checked_name(member: tarfile.TarInfo) -> str:
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise refused(f"member {name!r} is an absolute path")
    if ".." in name.split("/"):
        raise refused(f"member {name!r} escapes the bundle")
    try:
        checked = check_member_path(name)
    except ValueError:
        raise refused(f"member {name!r} has an invalid path (not relative and normalised)") from None
    if checked == MANIFEST_NAME:
        raise refused(f"{MANIFEST_NAME} appears twice in the archive")
    return checked


def _listed_entry(
    member: tarfile.TarInfo, name: str, entries: Mapping[str, FileEntry], written: set[str]
) -> FileEntry:
    entry = entries.get(name)
    if entry is None:
        raise refused(f"member {name!r} is not listed in the manifest")
    if name in written:
        raise refused(f"member {name!r} appears twice in the archive")
    if member.size != entry.size:
        raise refused(f"member {name!r} is {member.size} bytes, the manifest says {entry.size}")
    return entry


def _check_kind(member: tarfile.TarInfo, name: str) -> None:
    if member.issym():
        raise refused(f"member {name!r} is a symbolic link (to {member.linkname!r}): links are not allowed")
    if member.islnk():
        raise refused(f"member {name!r} is a hard link (to {member.linkname!r}): links are not allowed")
    if member.ischr() or member.isblk():
        raise refused(f"member {name!r} is a device file")
    if member.isfifo():
        raise refused(f"member {name!r} is a FIFO")
    if member.issparse() or not (member.isreg() or member.isdir()):
        raise refused(f"member {name!r} has an unsupported type {member.type!r}")
    if member.mode & SPECIAL_BITS:
        raise refused(f"member {name!r} has setuid, setgid or sticky bits (mode {member.mode:o})")


def _second_opinion(member: tarfile.TarInfo, dest: Path) -> None:
    """The standard library's `data` filter: it must agree with our checks."""
    if _DATA_FILTER is None:
        return
    try:
        _DATA_FILTER(member, str(dest))
    except tarfile.FilterError as exc:
        raise refused(f"member {member.name!r} fails the tarfile data filter: {exc}") from None


def _make_dirs(dest: Path, dirs: set[str]) -> None:
    """Create the archive's directories (including empty ones) and make the tree durable."""
    try:
        for name in sorted(dirs):
            (dest / name).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for directory, _subdirs, _files in os.walk(dest):
            fsync_dir(Path(directory))
    except (FileExistsError, NotADirectoryError):
        raise refused("a directory member collides with a file") from None
    except OSError as exc:
        raise BundleStorageError(f"cannot create the directories of {dest}: {exc}") from None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
