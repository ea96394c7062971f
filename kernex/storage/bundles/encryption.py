"""Segment-wise AES-256-GCM for bundles at rest in the filesystem store.

The plaintext is cut into fixed-size segments, each sealed on its own, so a Range read decrypts
only the segments it touches. Layout (the "STREAM" construction of Hoang, Reyhanitabar, Rogaway
and Vizár, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015):

    header  = magic "KXB\\x01" | segment size (u32 BE) | nonce prefix (7 random bytes) | 0x00
    segment = AES-256-GCM(key, nonce = prefix | index (u32 BE) | last flag (1 byte),
                          aad = header | object key) = ciphertext | 16-byte tag

Every segment but the last holds exactly `segment size` bytes; the last flag makes truncation
after a segment boundary detectable, the index makes reordering detectable, and the object key
in the AAD stops one stored bundle from being swapped for another.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kernex.storage.bundles.exceptions import StoredObjectCorruptError

MAGIC = b"KXB\x01"
SEGMENT_BYTES = 64 * 1024  # a Range read decrypts at most one extra segment at either end
TAG_BYTES = 16  # AES-GCM's full-length tag
HEADER_BYTES = 16
PREFIX_BYTES = 7  # + 4 bytes of index + 1 flag byte = GCM's 12-byte nonce
MAX_SEGMENTS = 2**32  # the index is a u32: 256 TiB at 64 KiB segments
_HEADER = struct.Struct(">4sI7sx")


class SegmentEncryptor:
    """Turns a plaintext stream into the sealed layout; feed with update(), end with finalize()."""

    def __init__(self, key: bytes, object_key: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self._aead = AESGCM(key)
        self._segment = segment_bytes
        self._prefix = os.urandom(PREFIX_BYTES)  # fresh per object: nonces never repeat under a key
        self.header = _HEADER.pack(MAGIC, segment_bytes, self._prefix)
        self._aad = self.header + object_key.encode("utf-8")
        self._pending = bytearray()
        self._index = 0

    def update(self, data: bytes) -> bytes:
        """Ciphertext of the segments completed so far (a segment is sealed once more data follows)."""
        self._pending += data
        out = bytearray()
        # Keep at least one byte back: only finalize() knows which segment is the last.
        while len(self._pending) > self._segment:
            out += self._seal(bytes(self._pending[: self._segment]), last=False)
            del self._pending[: self._segment]
        return bytes(out)

    def finalize(self) -> bytes:
        """The last segment (possibly empty)."""
        sealed = self._seal(bytes(self._pending), last=True)
        self._pending.clear()
        return sealed

    def _seal(self, plaintext: bytes, *, last: bool) -> bytes:
        if self._index >= MAX_SEGMENTS:
            raise ValueError("object too large for the segment index")
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last=last), plaintext, self._aad)
        self._index += 1
        return sealed


def plaintext_size(stored_size: int, segment_bytes: int = SEGMENT_BYTES) -> int:
    """The plaintext length of a sealed object of stored_size bytes."""
    body = stored_size - HEADER_BYTES
    if body < TAG_BYTES:
        raise StoredObjectCorruptError("encrypted bundle is truncated")
    segments = -(-body // (segment_bytes + TAG_BYTES))
    return body - segments * TAG_BYTES


class SegmentReader:
    """Decrypts the plaintext range [start, end) of a sealed file, a batch of segments per call."""

    def __init__(self, handle: BinaryIO, key: bytes, object_key: str, start: int, end: int) -> None:
        header = handle.read(HEADER_BYTES)
        if len(header) != HEADER_BYTES:
            raise StoredObjectCorruptError("encrypted bundle is truncated")
        magic, segment_bytes, prefix = _HEADER.unpack(header)
        if magic != MAGIC or segment_bytes <= 0:
            raise StoredObjectCorruptError("not an encrypted Kernex bundle (bad header)")
        stored_size = os.fstat(handle.fileno()).st_size
        self._aead = AESGCM(key)
        self._handle = handle
        self._segment = segment_bytes
        self._prefix = prefix
        self._aad = header + object_key.encode("utf-8")
        self._segments = -(-(stored_size - HEADER_BYTES) // (segment_bytes + TAG_BYTES))
        self.size = plaintext_size(stored_size, segment_bytes)
        self._position = start
        self._end = min(end, self.size)
        self._index = start // segment_bytes
        handle.seek(HEADER_BYTES + self._index * (segment_bytes + TAG_BYTES))

    def read(self, at_least: int) -> bytes:
        """The next plaintext bytes of the range (about at_least of them); b"" at its end."""
        out = bytearray()
        while self._position < self._end and len(out) < at_least:
            sealed = self._handle.read(self._segment + TAG_BYTES)
            last = self._index == self._segments - 1
            try:
                plain = self._aead.decrypt(_nonce(self._prefix, self._index, last=last), sealed, self._aad)
            except InvalidTag:
                raise StoredObjectCorruptError(
                    f"encrypted bundle segment {self._index} fails authentication (tampered or wrong key)"
                ) from None
            offset = self._position - self._index * self._segment
            piece = plain[offset : offset + self._end - self._position]
            out += piece
            self._position += len(piece)
            self._index += 1
            if not piece:
                raise StoredObjectCorruptError("encrypted bundle ends early")
        return bytes(out)


def _nonce(prefix: bytes, index: int, *, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)
