"""The bundle manifest (`manifest.json` at the root of a bundle's `.tar.gz`; DESIGN.md "Bundles").

Both sides read it: the API validates it on upload (422 naming the field), the agent again
before it extracts anything. Paths are relative, normalised and confined to the bundle.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Self

import semver
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernex.protocol.exceptions import MessageError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
MANIFEST_MAX_BYTES = 1024 * 1024  # a manifest lists files; a megabyte is ~10,000 entries
FILES_MAX = 10_000  # also bounds the archive's member count the agent accepts
DEFAULT_INSTALL_TIMEOUT_S = 300  # DESIGN.md / issue: install scripts time out after 5 minutes
TIMEOUT_MAX_S = 24 * 3600
ANY_DEVICE_TYPE = "*"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DEVICE_TYPE_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


def check_member_path(value: str) -> str:
    """A relative POSIX path inside the bundle: no absolute paths, no `..`, no empty parts."""
    if not value or len(value) > 4096 or "\x00" in value or "\\" in value:  # noqa: PLR2004 - PATH_MAX
        raise ValueError(f"invalid path {value!r}")
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", ".", "") for part in value.split("/")):
        raise ValueError(f"path {value!r} must be relative, normalised and stay inside the bundle")
    return str(path)


MemberPath = Annotated[str, Field(min_length=1, max_length=4096)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One regular file of the bundle and its SHA-256."""

    path: MemberPath
    sha256: str
    size: Annotated[int, Field(ge=0, le=2**40)]
    executable: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_member_path(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError("must be 64 lowercase hex characters")
        return value


class Script(_Strict):
    """A script shipped in the bundle, run with a timeout."""

    path: MemberPath
    timeout_s: Annotated[int, Field(ge=1, le=TIMEOUT_MAX_S)] = DEFAULT_INSTALL_TIMEOUT_S
    args: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=32)] = Field(
        default_factory=list
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_member_path(value)


class Manifest(_Strict):
    """What a bundle is, what it contains, and how to install, check and undo it."""

    schema_version: Annotated[int, Field(alias="schema", ge=1, le=MANIFEST_SCHEMA)] = MANIFEST_SCHEMA
    name: str
    version: str
    description: Annotated[str, Field(max_length=1024)] = ""
    device_types: Annotated[list[str], Field(min_length=1, max_length=256)]
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=FILES_MAX)]
    install: Script
    rollback: Script | None = None
    health_check: Script | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("must be 1-128 of a-z 0-9 . _ - starting with a letter or digit")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if len(value) > 64 or not semver.Version.is_valid(value):  # noqa: PLR2004 - column width
            raise ValueError("must be a semantic version such as 1.4.2 (semver.org)")
        return value

    @field_validator("device_types")
    @classmethod
    def _device_types(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _DEVICE_TYPE_RE.match(item):
                raise ValueError(f"invalid device type {item!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files: a path is listed twice")
        listed = set(paths)
        for field_name in ("install", "rollback", "health_check"):
            script: Script | None = getattr(self, field_name)
            if script is not None and script.path not in listed:
                raise ValueError(f"{field_name}.path: {script.path!r} is not one of the listed files")
        return self

    @property
    def semver(self) -> semver.Version:
        """The parsed version, for ordering (pre-releases sort before their release)."""
        return semver.Version.parse(self.version)

    def supports(self, device_type: str) -> bool:
        """Whether a device of this type may install the bundle."""
        return ANY_DEVICE_TYPE in self.device_types or device_type in self.device_types

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (by alias), as `kernex bundle build` writes it."""
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2).encode("utf-8") + b"\n"


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes; MessageError names the first offending field."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise MessageError(f"manifest.json is over {MANIFEST_MAX_BYTES} bytes")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise MessageError(f"manifest {where}: {first['msg']}") from None


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as semantic version a is older, equal or newer than b."""
    return semver.Version.parse(a).compare(b)
