"""Secrets generated into the data dir in development (production supplies them via settings)."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from kernex.broker._files import ensure_private_dir
from kernex.broker.exceptions import BrokerError

SECRETS_DIR = "secrets"
SECRET_BYTES = 32  # 256 bits of entropy


def development_secret(data_dir: Path, name: str, *, nbytes: int = SECRET_BYTES) -> str:
    """The secret `name` in `<data_dir>/secrets/`, generated (0600) on first use and then reused.

    Safe when several processes start at once: the first to link its file wins and the others
    read that value.
    """
    path = data_dir / SECRETS_DIR / name
    if not path.exists():
        ensure_private_dir(path.parent)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_urlsafe(nbytes).encode("ascii"))
                handle.flush()
                os.fsync(handle.fileno())
            # link() fails if another process created the file first: both then use its value.
            with contextlib.suppress(FileExistsError):
                os.link(tmp_name, path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerError(f"cannot read {path}: {exc}") from None
    if not value:
        raise BrokerError(f"{path} is empty: remove it to generate a new development secret")
    return value
