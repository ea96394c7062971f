"""Downloading a bundle from the API: resumable, capped at the size the signed command announced.

`GET {api_url}{download_path}` with a device JWT. The bytes go to `staging/<sha256>.part`; an
interrupted download resumes from that file's size with `Range` (and `If-Range` on the ETag, the
bundle's SHA-256, so a changed object restarts instead of splicing two). A `200` answer to a
range request means the server starts over, and so do we. The release signature header is kept
beside the part (`<sha256>.sig`), so a download completed before a restart needs no request.
5xx, 408, 429 and transport errors are retried with backoff; other answers are final.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

import httpx

from kernex.agent.bundles.archive import refused
from kernex.agent.bundles.errors import BundleStorageError, DownloadError
from kernex.agent.http import request_slot
from kernex.agent.identity import Identity
from kernex.kit.backoff import Backoff
from kernex.kit.logs import get_logger
from kernex.protocol import devicetoken

DOWNLOAD_PATH = "/api/v1/bundles/{bundle_id}/download"
SHA256_HEADER = "X-Kernex-Sha256"
SIGNATURE_HEADER = "X-Kernex-Release-Signature"
RETRY_INITIAL_S = 1.0  # as registration: from a second ...
RETRY_MAX_S = 60.0  # ... up to a minute, so a fleet never hammers a recovering API
# Attempts in a row that add no byte before the deployment is reported failed: with the
# backoff above that is several minutes of outage; any progress starts the count again.
ATTEMPTS_WITHOUT_PROGRESS = 8
# Request Timeout and Too Many Requests say "try again later"; every other 4xx is final.
TRANSIENT_CLIENT_ERRORS = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
ERROR_BODY_CHARS = 300  # enough to show a proxy's error page in a report
SIGNATURE_MAX_BYTES = 16 * 1024  # an RS4096 JWS over four short claims is under 1 KiB
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Download:
    """A complete download: the archive in staging and the release signature the API sent."""

    archive: Path
    signature_file: Path
    signature: str


class _TransientError(Exception):
    """A failure worth retrying."""


class Downloader:
    """Fetches bundles into a staging directory."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_url: str,
        identity: Identity,
        staging: Path,
        *,
        backoff: Backoff | None = None,
        attempts_without_progress: int = ATTEMPTS_WITHOUT_PROGRESS,
    ) -> None:
        self._http = http
        self._api_url = api_url.rstrip("/")
        self._identity = identity
        self._staging = staging
        self._backoff = backoff or Backoff(initial_s=RETRY_INITIAL_S, max_s=RETRY_MAX_S)
        self._attempts_without_progress = attempts_without_progress
        self.requests = 0  # HTTP requests sent, for logs and tests

    def part_path(self, sha256: str) -> Path:
        """Where the bytes of the bundle with this SHA-256 accumulate."""
        return self._staging / f"{sha256}.part"

    def signature_path(self, sha256: str) -> Path:
        """Where the release signature of the bundle with this SHA-256 is kept."""
        return self._staging / f"{sha256}.sig"

    async def fetch(self, *, bundle_id: str, download_path: str | None, sha256: str, size: int) -> Download:
        """Download the whole bundle (resuming a previous part); raises DownloadError or refuses it."""
        url = self._api_url + (download_path or DOWNLOAD_PATH.format(bundle_id=bundle_id))
        part, sig = self.part_path(sha256), self.signature_path(sha256)
        failures = 0
        last_have = -1
        self._backoff.reset()
        while True:
            have = await asyncio.to_thread(_size_or_zero, part)
            if have > size:
                await asyncio.to_thread(part.unlink, missing_ok=True)
                have = 0
            if have == size:
                signature = await asyncio.to_thread(_read_signature, sig)
                if signature is not None:
                    return Download(archive=part, signature_file=sig, signature=signature)
            if have > last_have >= 0:
                # The last attempt added bytes before it failed: the link works, keep going.
                failures = 0
                self._backoff.reset()
            last_have = have
            try:
                async with request_slot(self._http):
                    await self._attempt(url, part, sig, sha256=sha256, size=size, have=have)
            except _TransientError as exc:
                failures += 1
                if failures >= self._attempts_without_progress:
                    raise DownloadError(f"download failed after {failures} attempts: {exc}") from None
                delay = self._backoff.next_delay()
                log.warning(
                    "bundle download interrupted, retrying", reason=str(exc), retry_in_s=round(delay, 2)
                )
                await asyncio.sleep(delay)

    async def _attempt(self, url: str, part: Path, sig: Path, *, sha256: str, size: int, have: int) -> None:
        """One request that ends with the whole bundle in the part, or raises _TransientError to retry."""
        token = await asyncio.to_thread(devicetoken.issue, self._identity.key, self._identity.device_id)
        # identity: the archive is already compressed, and a transfer encoding would change its bytes.
        headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = f'"{sha256}"'
        self.requests += 1
        added = 0
        try:
            async with self._http.stream("GET", url, headers=headers) as response:
                offset = await self._check_response(response, part, sig, sha256=sha256, size=size, have=have)
                handle = await asyncio.to_thread(_open_at, part, offset)
                try:
                    async for chunk in response.aiter_raw():
                        if offset + added + len(chunk) > size:
                            # The command's size is signed; Content-Length is only the server's word.
                            raise refused(
                                f"the download is larger than the {size} bytes the command announced"
                            )
                        await asyncio.to_thread(_write, handle, chunk)
                        added += len(chunk)
                finally:
                    await asyncio.to_thread(handle.close)
        except httpx.TransportError as exc:
            if added:
                log.info("bundle download cut, keeping the part to resume", bytes=have + added)
            raise _TransientError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise BundleStorageError(f"cannot write the download {part}: {exc}") from None
        if offset + added < size:
            # A clean end before the announced size: the server sent less than it promised.
            raise _TransientError(f"the response ended at {offset + added} of {size} bytes")

    async def _check_response(
        self, response: httpx.Response, part: Path, sig: Path, *, sha256: str, size: int, have: int
    ) -> int:
        """Decide where the body goes (the offset in the part) or raise."""
        status = response.status_code
        if status >= HTTPStatus.INTERNAL_SERVER_ERROR or status in TRANSIENT_CLIENT_ERRORS:
            raise _TransientError(f"HTTP {status}")
        if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
            # Our part does not fit the object: throw it away and start over.
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise _TransientError("HTTP 416: the partial download does not fit, starting over")
        if status not in {HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT}:
            body = (await _error_body(response)).decode("utf-8", "replace").strip()[:ERROR_BODY_CHARS]
            raise DownloadError(f"download refused: HTTP {status}" + (f": {body}" if body else ""))
        announced = response.headers.get(SHA256_HEADER)
        if announced is not None and announced.lower() != sha256:
            raise refused(f"the API serves sha256 {announced}, the command says {sha256}")
        signature = response.headers.get(SIGNATURE_HEADER)
        if not signature or len(signature) > SIGNATURE_MAX_BYTES or not signature.isascii():
            raise refused(f"the download came without a usable {SIGNATURE_HEADER} header")
        await asyncio.to_thread(_write_signature, sig, signature)
        length = response.headers.get("Content-Length")
        offset = 0
        if status == HTTPStatus.PARTIAL_CONTENT:
            offset = _range_start(response.headers.get("Content-Range"), size)
            if offset != have:
                await asyncio.to_thread(part.unlink, missing_ok=True)
                raise _TransientError(f"the server resumed at byte {offset}, we asked for {have}")
        elif have:
            log.info("the server ignored the range request: downloading from the start", had=have)
        if length is not None and length.isdigit() and offset + int(length) > size:
            raise refused(f"the download is larger than the {size} bytes the command announced")
        return offset


async def _error_body(response: httpx.Response) -> bytes:
    """The start of an error body: enough to explain, never the whole of a hostile one."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= ERROR_BODY_CHARS * 4:  # up to 4 bytes per UTF-8 character
            break
    return data


def _range_start(value: str | None, size: int) -> int:
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        raise _TransientError(f"a 206 answer with an unusable Content-Range {value!r}")
    start, end, total = match.groups()
    if total != "*" and int(total) != size:
        raise refused(f"the API serves {total} bytes, the command announced {size}")
    if int(end) >= size:
        raise refused(f"the download is larger than the {size} bytes the command announced")
    return int(start)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _open_at(path: Path, offset: int) -> BinaryIO:
    # "wb" when starting over truncates whatever was there; "ab" appends to a resumed part.
    handle = path.open("ab" if offset else "wb")
    if handle.tell() != offset:
        handle.close()
        raise OSError(f"{path} is {handle.tell()} bytes, expected {offset}")
    return handle


def _write(handle: BinaryIO, chunk: bytes) -> None:
    handle.write(chunk)


def _read_signature(path: Path) -> str | None:
    try:
        return path.read_text("ascii").strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleStorageError(f"cannot read {path}: {exc}") from None


def _write_signature(path: Path, signature: str) -> None:
    try:
        path.write_text(signature, "ascii")
    except (OSError, UnicodeEncodeError) as exc:
        raise BundleStorageError(f"cannot keep the release signature in {path}: {exc}") from None
