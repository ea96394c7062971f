"""`kernex bundle build | keygen | sign | upload`: make, sign offline and publish update bundles.

Device-side safe: only the protocol package, httpx and rich (which typer brings) are imported,
so release engineers need no server extra. Every command exits 1 with a one-line reason.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer
from cryptography.hazmat.primitives.asymmetric import ec
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from kernex.protocol.exceptions import KernexError, MessageError
from kernex.protocol.keys import load_private_key_pem, private_key_to_pem, public_key_to_pem
from kernex.protocol.manifest import MANIFEST_MAX_BYTES, MANIFEST_NAME, Manifest, parse_manifest
from kernex.protocol.release import ReleaseClaims, release_key_id, sign_release

app = typer.Typer(no_args_is_help=True)

HASH_CHUNK = 1024 * 1024
UPLOAD_CHUNK = 1024 * 1024  # one progress step and one socket write per megabyte
GZIP_LEVEL = 6  # gzip's default: the usual size/speed balance
# Connecting is quick or never; a slow link may take long between writes of a large upload.
UPLOAD_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=10.0)
EXECUTABLE_MODE, FILE_MODE = 0o755, 0o644
SIGNATURE_SUFFIX = ".sig"


class BundleCliError(KernexError):
    """A bundle command cannot proceed; the message is the one line shown."""


@dataclass(frozen=True)
class BundleFacts:
    """What identifies a bundle archive for a release signature."""

    manifest: Manifest
    manifest_sha256: str
    archive_sha256: str


def _fail(message: str) -> typer.Exit:
    typer.echo(f"kernex: {message}", err=True)
    return typer.Exit(1)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _walk_files(root: Path) -> list[Path]:
    """Regular files under root (not the manifest), sorted by path; links and special files refused."""
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        # os.walk lists a symlink to a directory among dirnames and never enters it: refuse it too.
        for name in filenames + [d for d in dirnames if (Path(directory) / d).is_symlink()]:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if relative == MANIFEST_NAME:
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleCliError(f"{relative} is a symbolic link: bundles hold only regular files")
            if not stat.S_ISREG(mode):
                raise BundleCliError(f"{relative} is not a regular file")
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _file_entry(root: Path, path: Path, given: dict[str, Any] | None) -> dict[str, Any]:
    relative = path.relative_to(root).as_posix()
    entry = dict(given or {"path": relative})
    sha256, size = _sha256_file(path), path.stat().st_size
    for field, actual in (("sha256", sha256), ("size", size)):
        if field in entry and entry[field] != actual:
            raise BundleCliError(f"files.{relative}: {field} in manifest.json does not match {path}")
        entry[field] = actual
    entry.setdefault("executable", bool(path.stat().st_mode & 0o111))
    return entry


def prepare_manifest(source: Path) -> Manifest:
    """The manifest of DIR/manifest.json, its `files` generated (or completed and checked) from DIR."""
    manifest_path = source / MANIFEST_NAME
    try:
        raw = json.loads(manifest_path.read_bytes())
    except FileNotFoundError:
        raise BundleCliError(f"{manifest_path} is missing") from None
    except (OSError, ValueError) as exc:
        raise BundleCliError(f"{manifest_path}: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleCliError(f"{manifest_path}: must be a JSON object")
    on_disk = {p.relative_to(source).as_posix(): p for p in _walk_files(source)}
    listed = raw.get("files")
    if listed is None:
        raw["files"] = [_file_entry(source, path, None) for path in on_disk.values()]
    else:
        if not isinstance(listed, list) or not all(isinstance(e, dict) and "path" in e for e in listed):
            raise BundleCliError("manifest files: a list of objects with a `path` each")
        paths = [str(e["path"]) for e in listed]
        missing = [p for p in paths if p not in on_disk]
        extra = sorted(set(on_disk) - set(paths))
        if missing:
            raise BundleCliError(f"files: {missing[0]} is listed but not in {source}")
        if extra:
            raise BundleCliError(
                f"{extra[0]} is in {source} but not listed in manifest.json files (list it, or omit `files`)"
            )
        raw["files"] = [_file_entry(source, on_disk[str(e["path"])], e) for e in listed]
    try:
        return parse_manifest(json.dumps(raw).encode("utf-8"))
    except MessageError as exc:
        raise BundleCliError(str(exc)) from None


def build_bundle(source: Path, output: Path | None = None) -> tuple[Path, Manifest]:
    """Write a reproducible bundle (fixed times and owners) with manifest.json first; returns its path."""
    manifest = prepare_manifest(source)
    target = output or Path.cwd() / f"{manifest.name}-{manifest.version}.tar.gz"
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with (
            temp.open("wb") as raw,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL
            ) as compressed,
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
        ):
            manifest_bytes = manifest.to_json_bytes()
            archive.addfile(
                _member(MANIFEST_NAME, len(manifest_bytes), executable=False), _bytes_io(manifest_bytes)
            )
            for entry in manifest.files:
                with (source / entry.path).open("rb") as handle:
                    archive.addfile(_member(entry.path, entry.size, executable=entry.executable), handle)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target, manifest


def _member(name: str, size: int, *, executable: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = EXECUTABLE_MODE if executable else FILE_MODE
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _bytes_io(data: bytes) -> IO[bytes]:
    return io.BytesIO(data)


class _HashingReader:
    """A file wrapper that hashes every byte tarfile pulls through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._handle.read(n)
        self.digest.update(data)
        return data


def inspect_bundle(path: Path) -> BundleFacts:
    """The manifest (the archive's first member) and the two digests a release signature covers."""
    try:
        with path.open("rb") as handle:
            reader = _HashingReader(handle)
            with tarfile.open(fileobj=reader, mode="r|gz") as archive:  # type: ignore[call-overload] # a duck-typed stream is what "r|" mode takes
                first = archive.next()
                if first is None or first.name != MANIFEST_NAME or not first.isreg():
                    raise BundleCliError(f"{path}: manifest.json must be the archive's first member")
                member = archive.extractfile(first)
                assert member is not None
                manifest_bytes = member.read(MANIFEST_MAX_BYTES + 1)
            while reader.read(HASH_CHUNK):
                pass  # the rest of the archive, for its hash
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BundleCliError(f"{path}: not a readable .tar.gz bundle: {exc}") from None
    try:
        manifest = parse_manifest(manifest_bytes)
    except MessageError as exc:
        raise BundleCliError(f"{path}: {exc}") from None
    return BundleFacts(
        manifest=manifest,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        archive_sha256=reader.digest.hexdigest(),
    )


def load_release_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM ECDSA P-256 private key (keep it offline, mode 0600)."""
    try:
        key = load_private_key_pem(path.read_bytes())
    except OSError as exc:
        raise BundleCliError(f"{path}: {exc.strerror}") from None
    except KernexError as exc:
        raise BundleCliError(f"{path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BundleCliError(f"{path}: release keys are ECDSA P-256 (ES256)")
    return key


def sign_bundle(path: Path, key: ec.EllipticCurvePrivateKey, kid: str | None = None) -> tuple[str, str]:
    """A release signature for the bundle; returns (compact JWS, kid)."""
    facts = inspect_bundle(path)
    key_id = kid or release_key_id(key.public_key())
    claims = ReleaseClaims(
        name=facts.manifest.name,
        version=facts.manifest.version,
        manifest_sha256=facts.manifest_sha256,
        archive_sha256=facts.archive_sha256,
    )
    return sign_release(claims, key, key_id), key_id


def _multipart(
    archive: Path, signature: str | None, boundary: str, on_chunk: Any
) -> tuple[int, Iterator[bytes]]:
    """The form body (`signature` first, then `file`) and its length, streamed from disk."""
    head = b""
    if signature:
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="signature"\r\n\r\n{signature}\r\n'
        ).encode()
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{archive.name}"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = archive.stat().st_size

    def body() -> Iterator[bytes]:
        yield head
        with archive.open("rb") as handle:
            while block := handle.read(UPLOAD_CHUNK):
                on_chunk(len(block))
                yield block
        yield tail

    return len(head) + size + len(tail), body()


def upload_bundle(
    archive: Path, *, api: str, token: str, signature: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """POST the bundle to the API with a progress bar; returns the stored bundle's JSON."""
    boundary = uuid.uuid4().hex
    size = archive.stat().st_size
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task(f"uploading {archive.name}", total=size)
        length, body = _multipart(archive, signature, boundary, lambda n: bar.advance(task, n))
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(length),
        }
        try:
            with httpx.Client(timeout=UPLOAD_TIMEOUT) as client:
                response = client.post(f"{api.rstrip('/')}/api/v1/bundles", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise BundleCliError(f"upload to {api} failed: {exc}") from None
    if response.status_code != httpx.codes.CREATED:
        raise BundleCliError(f"upload refused ({response.status_code}): {_error_message(response)}")
    result: dict[str, Any] = response.json()
    return result


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


# --- commands -------------------------------------------------------------------------------


@app.command("build")
def build(
    source: Annotated[Path, typer.Argument(help="Directory with manifest.json and the bundle's files")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Archive path (default: NAME-VERSION.tar.gz)")
    ] = None,
) -> None:
    """Build a bundle from DIR: manifest.json first, its files with their SHA-256 (generated if omitted)."""
    try:
        path, manifest = build_bundle(source, output)
    except (BundleCliError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{path}  {manifest.name} {manifest.version}  sha256 {_sha256_file(path)}")


@app.command("keygen")
def keygen(
    output: Annotated[Path, typer.Argument(help="Where to write the private key (PEM, 0600)")],
) -> None:
    """Create an offline release key; its public half (OUTPUT.pub) goes in KERNEX_TRUSTED_RELEASE_KEYS."""
    if output.exists():
        raise _fail(f"{output} exists; refusing to overwrite a key")
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_key_to_pem(key))
        output.with_name(output.name + ".pub").write_text(public_key_to_pem(key.public_key()))
    except OSError as exc:
        raise _fail(f"cannot write {output}: {exc.strerror}") from None
    typer.echo(f"{output} (kid {release_key_id(key.public_key())}); public key {output}.pub")


@app.command("sign")
def sign(
    bundle: Annotated[Path, typer.Argument(help="The .tar.gz bundle")],
    key: Annotated[Path, typer.Option("--key", help="Release private key (PEM, ECDSA P-256)")],
    kid: Annotated[str | None, typer.Option("--kid", help="Key id (default: rel- + SPKI SHA-256)")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default: BUNDLE.sig")] = None,
) -> None:
    """Sign a release offline; upload it with `kernex bundle upload --signature`."""
    try:
        signature, key_id = sign_bundle(bundle, load_release_key(key), kid)
        target = output or bundle.with_name(bundle.name + SIGNATURE_SUFFIX)
        target.write_text(signature + "\n")
    except (BundleCliError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{target} (signed by {key_id})")


@app.command("upload")
def upload(
    bundle: Annotated[Path, typer.Argument(help="The .tar.gz bundle")],
    api: Annotated[str, typer.Option("--api", envvar="KERNEX_API_URL", help="The Kernex API URL")],
    token: Annotated[
        str, typer.Option("--token", envvar="KERNEX_API_TOKEN", help="Operator access token or API token")
    ],
    signature: Annotated[
        Path | None, typer.Option("--signature", help="Offline release signature (from `kernex bundle sign`)")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Upload a bundle with a progress bar."""
    try:
        jws = signature.read_text().strip() if signature is not None else None
        result = upload_bundle(bundle, api=api, token=token, signature=jws, progress=not quiet)
    except (BundleCliError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"{result['id']}  {result['name']} {result['version']}  sha256 {result['sha256']}  "
        f"signed by {result['signed_by']}"
    )
