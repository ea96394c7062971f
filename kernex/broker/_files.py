"""Private-file helpers shared by the PKI and the config renderer: 0700 dirs, atomic 0600 writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE_DIR_MODE = 0o700  # keys live here: no other user may list or enter
PRIVATE_FILE_MODE = 0o600  # what mkstemp creates; asserted by the tests


def ensure_private_dir(path: Path) -> None:
    """Create path with mode 0700, tightening it if it already exists."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for an existing directory.
    path.chmod(PRIVATE_DIR_MODE)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a 0600 file so that readers see the old content or the new, never a torn one."""
    ensure_private_dir(path.parent)
    # mkstemp creates the file 0600 before any byte is written, so a key is never world-readable.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in path durable: it is on disk only once the directory entry is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
