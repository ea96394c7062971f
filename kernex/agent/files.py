"""Crash-safe private files: a reader sees the old content or the new one, never a torn file.

Every file is created with `os.open(..., 0o600)`, so it is never readable by others, not even
for the instant between creation and a later chmod.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from kernex.kit.logs import get_logger

PRIVATE_FILE_MODE = 0o600  # DESIGN.md: key files are mode 0600; state and certs share the rule
PRIVATE_DIR_MODE = 0o700  # only the agent's user may list or enter its state dir

log = get_logger(__name__)


def ensure_private_dir(path: Path) -> None:
    """Create the directory (mode 0700), or tighten an existing one that others can access."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("state dir was accessible to others: restricting it", path=str(path), mode=oct(mode))
        path.chmod(PRIVATE_DIR_MODE)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (tmp file, fsync, rename, fsync dir)."""
    tmp = _write_tmp(path, data)
    try:
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless it exists; True when this call created it.

    Linking a complete temporary file into place never replaces an existing file and never
    exposes a partial one, so two racing agents cannot end up with two different keys.
    """
    tmp = _write_tmp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _write_tmp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
