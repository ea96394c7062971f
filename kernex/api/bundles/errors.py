"""Domain errors of the bundles API (mapped to HTTP by kernex.api.errors' handler)."""

from __future__ import annotations

from http import HTTPStatus

from kernex.api.errors import ApiError


class BundleFormatError(ApiError):
    """The upload is not a well-formed bundle; the message names the field or member at fault."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_bundle"


class ReleaseSignatureError(ApiError):
    """The offline release signature is malformed, from an untrusted key, or for another bundle."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_signature"


class BundleTooLargeError(ApiError):
    """The bundle is over KERNEX_MAX_BUNDLE_BYTES."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "bundle_too_large"


class BundleQuarantinedError(ApiError):
    """The stored bundle no longer matches its recorded SHA-256 and is refused."""

    status_code = HTTPStatus.GONE
    code = "quarantined"


class RangeNotSatisfiableError(ApiError):
    """The requested byte range starts at or past the end of the bundle."""

    status_code = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
    code = "range_not_satisfiable"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size

    @property
    def headers(self) -> dict[str, str]:
        # RFC 9110 §15.5.17: tell the client the current length so it can start over.
        return {"Content-Range": f"bytes */{self.size}"}
