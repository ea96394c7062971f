"""An incremental multipart/form-data reader: request chunks in, part events out.

Starlette's `request.form()` spools each file part to a SpooledTemporaryFile before the route
sees it (a full extra write of every upload); this hands each part's bytes on as they arrive,
so the route can stream them to the bundle store while the next chunk is still on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from kernex.api.bundles.errors import BundleFormatError

MAX_PART_HEADERS = 8  # Content-Disposition, Content-Type and a few more
MAX_HEADER_BYTES = 4096


@dataclass(frozen=True)
class PartStart:
    """A part begins: its form field name and, for files, the file name."""

    name: str
    filename: str | None


@dataclass(frozen=True)
class PartData:
    """Bytes of the current part."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete."""


Event = PartStart | PartData | PartEnd


class MultipartReader:
    """Feed the body with feed(); each call returns the events that chunk completed."""

    def __init__(self, content_type: str | None) -> None:
        media, params = parse_options_header(content_type or "")
        boundary = params.get(b"boundary")
        if media != b"multipart/form-data" or not boundary:
            raise BundleFormatError("send the bundle as multipart/form-data with a `file` field")
        self._events: list[Event] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_end": self._on_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_HEADER_BYTES,
        )

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse a chunk of the body."""
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BundleFormatError(f"malformed multipart body: {exc}") from None
        events, self._events = self._events, []
        return events

    def finish(self) -> None:
        """The body ended: it must have ended with the closing boundary."""
        if not self._ended:
            raise BundleFormatError("the multipart body ended before its closing boundary")

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise MultipartParseError("every part needs Content-Disposition: form-data; name=...")
        filename = params.get(b"filename")
        self._events.append(
            PartStart(
                name=name.decode("utf-8", "replace"),
                filename=filename.decode("utf-8", "replace") if filename is not None else None,
            )
        )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(PartData(bytes(data[start:end])))

    def _on_part_end(self) -> None:
        self._events.append(PartEnd())

    def _on_end(self) -> None:
        self._ended = True
