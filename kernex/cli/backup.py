"""`kernex backup` / `kernex restore`: the database, the fleet PKI and the release keys in one archive.

The archive (tar.gz, mode 0600) holds `manifest.json` (format, kernex version, schema revision,
SHA-256 of every member, whether secrets are inside), the database dump (`database/`), the PKI
files a fleet cannot be rebuilt without (`pki/`: the CA certificate and the CA, command-signing
and release keys, all three encrypted with the PKI passphrase), the filesystem bundle store
(`bundles/`, unless --no-bundles), and copies of the trusted offline release keys
(`trusted-release-keys/`).

Not inside unless --include-secrets (then said loudly): the PKI passphrase, the JWT secret and
the ingest share group. Without them the archive alone cannot mint a device certificate or sign a
command: keep the passphrase apart from the backups (a password manager, a KMS). Never inside:
KERNEX_BUNDLE_ENCRYPTION_KEY and S3 credentials (an S3 bundle store is backed up with the bucket).

Restoring onto a fresh data dir and a fresh database brings the fleet back as it was: the same CA
(devices keep trusting the broker, whose certificate `pki init` reissues from it), the same
command and release keys (devices keep their pinned keys), the same device registrations (no
device re-registers). Server packages are imported inside the commands, like `kernex db`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

import typer
from cryptography.hazmat.primitives import serialization

from kernex import __version__
from kernex.protocol.exceptions import KernexError

if TYPE_CHECKING:
    from kernex.api.settings import ApiSettings
    from kernex.broker.pki import FleetPKI

FORMAT = "kernex-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARCHIVE_MODE = 0o600
HASH_CHUNK = 1024 * 1024
SECRET_NAMES = ("pki-passphrase", "jwt-secret", "ingest-share-group")  # kernex.broker.secrets files
NOT_INCLUDED = (
    "KERNEX_BUNDLE_ENCRYPTION_KEY (filesystem bundles stay encrypted with it: keep it with the passphrase)",
    "S3 credentials and the S3 bucket (back the bucket up with the storage provider's tools)",
    "broker and service certificates and keys (reissued from the CA by `kernex pki init` / `kernex up`)",
)


class BackupError(KernexError):
    """A backup or restore cannot proceed; the message says why and what to do."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"kernex: {message}", err=True)
    return typer.Exit(1)


def backup(
    *,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Archive path (default: kernex-backup-<time>.tar.gz)."),
    ] = None,
    include_secrets: Annotated[
        bool,
        typer.Option("--include-secrets", help="Also store the PKI passphrase and JWT secret (dangerous)."),
    ] = False,
    bundles: Annotated[
        bool, typer.Option("--bundles/--no-bundles", help="Include the filesystem bundle store.")
    ] = True,
) -> None:
    """Back up the database, the fleet PKI (CA key encrypted) and the release keys into one archive."""
    settings = _server_settings()
    target = output or Path(f"kernex-backup-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.tar.gz")
    try:
        manifest = _write_backup(settings, target, include_secrets=include_secrets, bundles=bundles)
    except KernexError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"backup failed: {exc.strerror or exc} ({exc.filename or target})") from None
    if include_secrets:
        typer.echo(
            "WARNING: this archive holds the PKI passphrase and the JWT secret: whoever has it can issue "
            "device certificates, sign commands and releases, and forge operator tokens. Store it encrypted.",
            err=True,
        )
    typer.echo(
        f"backup written to {target} (database {manifest['database']['kind']} at schema "
        f"{manifest['database']['schema_revision']}, {len(manifest['files'])} files)"
    )
    if not include_secrets:
        typer.echo(
            "not included: the PKI passphrase and JWT secret; keep them apart from this archive", err=True
        )


def restore(
    archive: Annotated[Path, typer.Argument(help="A kernex backup archive.")],
    *,
    force: Annotated[
        bool, typer.Option("--force", help="Restore over a non-empty data dir or database.")
    ] = False,
) -> None:
    """Restore a backup into KERNEX_DATA_DIR and KERNEX_DATABASE_URL (fresh ones unless --force)."""
    settings = _server_settings()
    try:
        notes = _restore(settings, archive, force=force)
    except KernexError as exc:
        raise _fail(str(exc)) from None
    except (OSError, tarfile.TarError) as exc:
        raise _fail(f"restore failed: {exc}") from None
    typer.echo(f"restored {archive} into {settings.data_dir.resolve()}")
    for note in notes:
        typer.echo(note)


def register(app: typer.Typer) -> None:
    """Add the commands to the root app."""
    app.command("backup")(backup)
    app.command("restore")(restore)


# --- backup -----------------------------------------------------------------------------------


def _server_settings() -> ApiSettings:
    try:
        from kernex.api.settings import ApiSettings  # noqa: PLC0415 - server extra
    except ImportError as exc:
        raise _fail(
            f"server components are not installed ({exc.name}): pip install 'kernex[server]'"
        ) from None
    try:
        return ApiSettings()
    except ValueError as exc:
        raise _fail(f"invalid settings: {exc}") from None


def _write_backup(
    settings: ApiSettings, target: Path, *, include_secrets: bool, bundles: bool
) -> dict[str, Any]:
    from kernex.broker.pki import FleetPKI  # noqa: PLC0415 - server extra
    from kernex.storage import dump  # noqa: PLC0415 - server extra

    pki = FleetPKI.from_settings(settings)
    for path in pki.custody_paths:
        if not path.is_file():
            raise BackupError(f"{path} is missing: nothing to back up (run `kernex pki init` first?)")
    _refuse_unencrypted(pki)
    pki.check_keys()  # a backup whose keys do not open with the passphrase restores nothing
    url = settings.resolved_database_url
    members: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="kernex-backup-") as work:
        kind = dump.kind_of(url)
        dump_path = Path(work) / dump.dump_file_name(kind)
        revision = dump.schema_revision(url)
        dump.dump(url, dump_path)
        members[f"database/{dump_path.name}"] = dump_path
        for path in pki.custody_paths:
            # Relative paths: the command key ring keeps the keys rotation added in a subdirectory.
            members[f"pki/{path.relative_to(pki.directory).as_posix()}"] = path
        if bundles and settings.bundle_dir.is_dir():
            for path in sorted(
                p for p in settings.bundle_dir.rglob("*") if p.is_file() and not p.is_symlink()
            ):
                members[f"bundles/{path.relative_to(settings.bundle_dir).as_posix()}"] = path
        for index, path in enumerate(settings.trusted_release_keys):
            members[f"trusted-release-keys/{index:02d}-{path.name}"] = path
        secrets = _secrets(settings) if include_secrets else {}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "kernex_version": __version__,
            "database": {
                "kind": kind.value,
                "file": f"database/{dump_path.name}",
                "schema_revision": revision,
            },
            "includes_secrets": include_secrets,
            "not_included": [
                *([] if include_secrets else ["the PKI passphrase", "the JWT secret"]),
                *NOT_INCLUDED,
            ],
            "files": {name: _sha256_file(path) for name, path in members.items()}
            | {f"secrets/{name}": _sha256(value) for name, value in secrets.items()},
        }
        _write_archive(target, manifest, members, secrets)
    return manifest


def _refuse_unencrypted(pki: FleetPKI) -> None:
    for path in pki.custody_paths:
        if path.suffix != ".key":
            continue  # the CA certificate and the command key ring's (public) file
        try:
            serialization.load_pem_private_key(path.read_bytes(), password=None)
        except TypeError:
            continue  # "password was not given but private key is encrypted": as it must be
        except ValueError as exc:
            raise BackupError(f"{path} is not a PEM private key: {exc}") from None
        raise BackupError(
            f"{path} is not encrypted: refusing to back it up; encrypt it with the PKI passphrase first"
        )


def _secrets(settings: ApiSettings) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for name in SECRET_NAMES:
        path = settings.data_dir / "secrets" / name
        if path.is_file():
            found[name] = path.read_bytes()
    # Production supplies them in the environment: those are the ones in effect.
    if settings.pki_passphrase is not None:
        found["pki-passphrase"] = settings.pki_passphrase.get_secret_value().encode("utf-8")
    if settings.jwt_secret is not None:
        found["jwt-secret"] = settings.jwt_secret.get_secret_value().encode("utf-8")
    return found


def _write_archive(
    target: Path, manifest: dict[str, Any], members: dict[str, Path], secrets: dict[str, bytes]
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ARCHIVE_MODE)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
            for name, path in members.items():
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o600
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            for name, value in secrets.items():
                _add_bytes(tar, f"secrets/{name}", value)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(datetime.now(UTC).timestamp())
    tar.addfile(info, io.BytesIO(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- restore ----------------------------------------------------------------------------------


def _restore(settings: ApiSettings, archive: Path, *, force: bool) -> list[str]:
    from kernex.broker.pki import FleetPKI, broker_hosts_for  # noqa: PLC0415 - server extra
    from kernex.storage import dump  # noqa: PLC0415 - server extra
    from kernex.storage.migrate import upgrade  # noqa: PLC0415 - server extra

    data_dir = settings.data_dir
    if data_dir.exists() and any(data_dir.iterdir()) and not force:
        raise BackupError(
            f"the data dir {data_dir.resolve()} is not empty: restore into a fresh one, or pass --force"
        )
    url = settings.resolved_database_url
    with (
        tempfile.TemporaryDirectory(prefix="kernex-restore-") as work,
        _extracted(archive, Path(work)) as (
            root,
            manifest,
        ),
    ):
        kind = dump.DatabaseKind(manifest["database"]["kind"])
        if kind is not dump.kind_of(url):
            raise BackupError(
                f"the backup holds a {kind.value} database but KERNEX_DATABASE_URL names a "
                f"{dump.kind_of(url).value} one: restore onto the same kind"
            )
        if not force and not dump.is_empty(url):
            raise BackupError(
                "the target database already has tables: restore onto a fresh database, or pass --force"
            )
        passphrase = _passphrase(settings, root)
        try:
            FleetPKI(root / "pki", passphrase).check_keys()
        except KernexError as exc:
            raise BackupError(
                f"the backup's keys do not open with the PKI passphrase ({exc}); set "
                "KERNEX_PKI_PASSPHRASE to the passphrase of the backed-up platform"
            ) from None
        # Everything is checked: only now is the data dir written.
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _copy_tree(root / "secrets", data_dir / "secrets")
        _copy_tree(root / "pki", settings.pki_dir)
        _copy_tree(root / "bundles", settings.bundle_dir)
        _copy_tree(root / "trusted-release-keys", data_dir / "trusted-release-keys")
        dump.restore(url, root / manifest["database"]["file"], kind, force=force)
    upgrade(url)
    FleetPKI.from_settings(settings).init(
        broker_hosts_for(settings)
    )  # reissues the broker and service certificates from the CA
    notes = [
        f"database restored ({kind.value}) and migrated to the latest schema; broker certificate reissued"
    ]
    if (data_dir / "trusted-release-keys").is_dir():
        keys = sorted(str(p) for p in (data_dir / "trusted-release-keys").iterdir())
        notes.append(f"trusted release keys restored: set KERNEX_TRUSTED_RELEASE_KEYS={json.dumps(keys)}")
    if not manifest.get("includes_secrets"):
        notes.append(
            "secrets were not in the backup: set KERNEX_PKI_PASSPHRASE and KERNEX_JWT_SECRET as before"
        )
    return notes


def _passphrase(settings: ApiSettings, root: Path) -> bytes:
    """The PKI passphrase the restored platform will use: the environment's, else the backup's."""
    if settings.pki_passphrase is not None:
        return settings.pki_passphrase.get_secret_value().encode("utf-8")
    archived = root / "secrets" / "pki-passphrase"
    if archived.is_file():
        return archived.read_text(encoding="ascii").strip().encode("ascii")
    raise BackupError(
        "KERNEX_PKI_PASSPHRASE is not set and the backup holds no passphrase (made without "
        "--include-secrets): set KERNEX_PKI_PASSPHRASE to the backed-up platform's passphrase"
    )


@contextmanager
def _extracted(archive: Path, work: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Extract the members the manifest lists (regular files only), each checked against its hash."""
    root = work / "archive"
    with tarfile.open(archive, mode="r:gz") as tar:
        manifest = _manifest(tar)
        expected: dict[str, str] = manifest["files"]
        seen: set[str] = set()
        for info in tar:
            if info.name == MANIFEST:
                continue
            name = PurePosixPath(info.name)
            if info.name not in expected or not info.isfile() or name.is_absolute() or ".." in name.parts:
                raise BackupError(
                    f"the archive holds {info.name!r}, which its manifest does not list as a file"
                )
            source = tar.extractfile(info)
            if source is None:
                raise BackupError(f"cannot read {info.name} from the archive")
            destination = root.joinpath(*name.parts)
            destination.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            digest = hashlib.sha256()
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(HASH_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != expected[info.name]:
                raise BackupError(
                    f"{info.name} in the archive does not match its manifest hash: corrupt backup"
                )
            seen.add(info.name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BackupError(f"the archive lacks {missing[0]}, which its manifest lists: incomplete backup")
    yield root, manifest


def _manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise BackupError("not a kernex backup: no manifest.json") from None
    handle = tar.extractfile(member)
    if handle is None:
        raise BackupError("not a kernex backup: manifest.json is not a file")
    try:
        manifest = json.loads(handle.read())
    except ValueError as exc:
        raise BackupError(f"manifest.json does not parse: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("not a kernex backup: manifest.json has another format")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(
            f"backup format {manifest.get('format_version')} is not supported by kernex {__version__} "
            f"(it reads format {FORMAT_VERSION})"
        )
    return manifest


def _copy_tree(source: Path, target: Path) -> None:
    """Copy the files under `source` into `target`: directories 0700, files 0600, written atomically."""
    if not source.is_dir():
        return
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = destination.with_name(f".{destination.name}.restore")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, path.open("rb") as src:
            while chunk := src.read(HASH_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(destination)
