"""The entry point a deploy command calls: `BundleInstaller.apply(InstallRequest) -> InstallReport`.

download -> verify (hash, release signature, manifest) -> extract into staging and publish as
versions/<version> -> install script -> switch `current` -> health check -> commit. Any failure
before the install script leaves the device exactly as it was (outcome `failed`). A failing
install script or health check rolls back: `current` goes back to the previous version, then
the FAILED version's rollback script runs (outcome `rolled_back`, or `failed` on a first install
with nothing to go back to).

Why the failed version's rollback script and not the previous version's: the rollback script
undoes what its own install script did (units enabled, migrations applied, files placed outside
the bundle); the previous version's scripts know nothing about a newer version's changes. It
runs after `current` is back on the previous version, so a script that restarts services
starts the previous version; `KERNEX_PREVIOUS_VERSION`/`KERNEX_PREVIOUS_DIR` name it.

`apply` never raises for a bundle's faults: every refusal and failure is in the report (and in
the `progress` events, which the caller turns into signed device events).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import httpx
import semver
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernex.agent.bundles.archive import BundleArchive, refused, sha256_file
from kernex.agent.bundles.download import Download, Downloader
from kernex.agent.bundles.errors import (
    BundleError,
    BundleRefusedError,
    BundleStorageError,
    DownloadError,
    ScriptError,
    VersionRefusedError,
)
from kernex.agent.bundles.layout import BundlePaths, Installed, VersionRecord, remove_tree
from kernex.agent.bundles.scripts import (
    TERMINATE_GRACE_S,
    Phase,
    ScriptResult,
    run_script,
    script_environment,
    stop_leftover_script,
)
from kernex.agent.bundles.verify import check_archive_hash, check_manifest, check_signature, release_keys_from
from kernex.agent.files import write_atomic
from kernex.agent.identity import Identity
from kernex.agent.settings import AgentSettings
from kernex.kit.logs import get_logger
from kernex.protocol.exceptions import MessageError
from kernex.protocol.keys import PublicKey
from kernex.protocol.manifest import MANIFEST_NAME, Manifest, Script, compare_versions, parse_manifest
from kernex.protocol.messages import ID_MAX_LEN, RegistrationResponse, utc_now

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_API_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")  # RFC 3986 path characters, no query

log = get_logger(__name__)


class Stage(StrEnum):
    """Where an installation is; each change is reported through the progress callback."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECKING = "health_checking"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class Outcome(StrEnum):
    """How an installation ended."""

    SUCCEEDED = "succeeded"  # the version is current (or already was)
    FAILED = "failed"  # refused or failed; the device runs what it ran before (if anything)
    ROLLED_BACK = "rolled_back"  # the version was installed, failed, and the previous one is back


class InstallRequest(BaseModel):
    """What a signed deploy command asks for (DESIGN.md "Message format", deploy body)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN)]
    bundle_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_LEN)]
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    version: str
    sha256: str
    size: Annotated[int, Field(ge=1)]
    # A path on the configured API (default /api/v1/bundles/{bundle_id}/download), never a full
    # URL: the device token must not be sent to any other host.
    download_path: Annotated[str, Field(max_length=1024)] | None = None
    # Only an explicit rollback may install a version older than the current one.
    rollback: bool = False

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not semver.Version.is_valid(value):
            raise ValueError("must be a semantic version")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError("must be 64 lowercase hex characters")
        return value

    @field_validator("download_path")
    @classmethod
    def _download_path(cls, value: str | None) -> str | None:
        if value is not None and (
            not _API_PATH_RE.match(value) or value.startswith("//") or ".." in value.split("/")
        ):
            raise ValueError("must be an absolute path on the API, such as /api/v1/bundles/<id>/download")
        return value


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One stage change of one deployment."""

    stage: Stage
    deployment_id: str
    bundle_id: str
    version: str
    detail: Mapping[str, Any] = field(default_factory=dict)


Progress = Callable[[ProgressEvent], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class InstallReport:
    """How an installation ended, for the deployment's result event."""

    deployment_id: str
    bundle_id: str
    version: str
    outcome: Outcome
    current_version: str | None  # what `current` points at now
    previous_version: str | None  # what a later rollback would go back to
    error: str | None = None
    failed_stage: Stage | None = None
    scripts: tuple[ScriptResult, ...] = ()
    # The bundle was refused (BundleRefusedError: a verification or safety check, an older
    # version without rollback) rather than failing; nothing of it was installed.
    refused: bool = False

    @property
    def output(self) -> str:
        """The (truncated) output of every script that ran, each under a heading."""
        return "\n".join(
            f"--- {result.phase} ({result.path}) ---\n{result.output}" for result in self.scripts
        )


class BundleInstaller:
    """Installs bundles into `<state dir>/bundles`, one at a time."""

    def __init__(
        self,
        paths: BundlePaths,
        downloader: Downloader,
        release_keys: Mapping[str, PublicKey],
        *,
        device_type: str,
        max_bundle_bytes: int,
        max_unpacked_bytes: int,
        progress: Progress | None = None,
        script_grace_s: float = TERMINATE_GRACE_S,
    ) -> None:
        self.paths = paths
        self._downloader = downloader
        self._release_keys = dict(release_keys)
        self._device_type = device_type
        self._max_bundle_bytes = max_bundle_bytes
        self._max_unpacked_bytes = max_unpacked_bytes
        self._progress = progress
        self._script_grace_s = script_grace_s
        # Limits the device's configuration sets (None: none). Read at each installation, so a
        # config command changes them for the next one.
        self.max_script_timeout_s: int | None = None
        self.download_timeout_s: float | None = None
        # One installation at a time: two would race for `current` and installed.json.
        self._lock = asyncio.Lock()

    @classmethod
    def for_agent(
        cls,
        settings: AgentSettings,
        identity: Identity,
        registration: RegistrationResponse,
        http: httpx.AsyncClient,
        *,
        progress: Progress | None = None,
    ) -> Self:
        """Wire an installer from the agent's settings, identity and pinned release keys."""
        paths = BundlePaths.under(settings.state_dir)
        return cls(
            paths,
            Downloader(http, settings.api_url, identity, paths.staging),
            release_keys_from(registration.release_keys),
            device_type=settings.device_type,
            max_bundle_bytes=settings.max_bundle_bytes,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            progress=progress,
        )

    async def installed(self) -> Installed:
        """What installed.json says (current, previous, and an interrupted install if any)."""
        return await asyncio.to_thread(self.paths.read_installed)

    async def recover(self) -> InstallReport | None:
        """Roll back an install a crash interrupted (call once at start); None when there was none."""
        async with self._lock:
            installed = await asyncio.to_thread(self.paths.prepare)
            return await self._recover(installed)

    async def apply(self, request: InstallRequest) -> InstallReport:
        """Install the requested bundle, or refuse it, or roll it back; the report says which."""
        async with self._lock:
            run = _Run(request.deployment_id, request.bundle_id, request.version, self._progress)
            try:
                installed = await asyncio.to_thread(self.paths.prepare)
                if await self._recover(installed) is not None:
                    installed = await asyncio.to_thread(self.paths.read_installed)
            except BundleStorageError as exc:
                # Without a readable record there is no safe way to switch or roll back anything.
                return await run.finish(Outcome.FAILED, Installed(), error=exc)
            log.info("installing bundle", deployment_id=request.deployment_id, version=request.version)
            try:
                if self._already_installed(request, installed.current):
                    return await run.finish(Outcome.SUCCEEDED, installed, already_installed=True)
                manifest = await self._fetch_and_unpack(run, request)
            except BundleError as exc:
                return await run.finish(Outcome.FAILED, installed, error=exc)
            return await self._install(run, request, manifest, installed)

    def _already_installed(self, request: InstallRequest, current: VersionRecord | None) -> bool:
        if current is None:
            return False
        order = compare_versions(request.version, current.version)
        if order == 0:
            if request.sha256 == current.sha256:
                return True
            raise refused(
                f"version {request.version} is installed with other content: publish it under a new version"
            )
        if order < 0 and not request.rollback:
            raise VersionRefusedError(
                f"bundle refused: version {request.version} is older than the installed {current.version} "
                "and the command is not a rollback"
            )
        return False

    async def _fetch_and_unpack(self, run: _Run, request: InstallRequest) -> Manifest:
        """Download, verify, extract and publish versions/<version>; the device runs what it ran."""
        if request.size > self._max_bundle_bytes:
            raise refused(f"the bundle is {request.size} bytes, over the {self._max_bundle_bytes}-byte limit")
        await run.emit(Stage.DOWNLOADING, size=request.size)
        try:
            # Run in this task (no TaskGroup): the timeout cancels only the download.
            async with asyncio.timeout(self.download_timeout_s):
                download = await self._downloader.fetch(
                    bundle_id=request.bundle_id,
                    download_path=request.download_path,
                    sha256=request.sha256,
                    size=request.size,
                )
        except TimeoutError:
            # The part stays in staging: the next attempt at this bundle resumes from it.
            raise DownloadError(f"the download did not finish within {self.download_timeout_s:g} s") from None
        except BundleRefusedError:
            # What was downloaded is wrong, not merely incomplete: do not resume from it.
            await asyncio.to_thread(_remove_download, self._downloader, request.sha256)
            raise
        try:
            return await self._verify_and_extract(run, request, download)
        finally:
            # Verified and unpacked, or refused: either way the archive has served its purpose.
            await asyncio.to_thread(_remove_download, self._downloader, request.sha256)

    async def _verify_and_extract(self, run: _Run, request: InstallRequest, download: Download) -> Manifest:
        await run.emit(Stage.VERIFYING)
        check_archive_hash(await asyncio.to_thread(sha256_file, download.archive), request.sha256)
        claims = check_signature(download.signature, self._release_keys, archive_sha256=request.sha256)
        archive = await asyncio.to_thread(BundleArchive, download.archive)
        try:
            manifest_bytes = await asyncio.to_thread(archive.read_manifest)
            manifest = check_manifest(
                manifest_bytes,
                claims,
                archive_sha256=request.sha256,
                version=request.version,
                name=request.name,
                device_type=self._device_type,
                max_unpacked_bytes=self._max_unpacked_bytes,
            )
            await run.emit(Stage.INSTALLING, name=manifest.name)
            staged = await asyncio.to_thread(self.paths.new_extract_dir)
            try:
                await asyncio.to_thread(
                    archive.extract, manifest, staged, max_unpacked_bytes=self._max_unpacked_bytes
                )
                # Kept with the version: after a crash, recover() needs its rollback script.
                await asyncio.to_thread(write_atomic, staged / MANIFEST_NAME, manifest_bytes)
                await asyncio.to_thread(self.paths.publish_version, staged, manifest.version)
            except BundleError:
                await asyncio.to_thread(_remove_staged, staged)
                raise
        finally:
            await asyncio.to_thread(archive.close)
        return manifest

    async def _install(
        self, run: _Run, request: InstallRequest, manifest: Manifest, installed: Installed
    ) -> InstallReport:
        """Run the install script, switch, health-check and commit; roll back on any failure."""
        previous = installed.current
        record = VersionRecord(
            name=manifest.name,
            version=manifest.version,
            bundle_id=request.bundle_id,
            sha256=request.sha256,
            deployment_id=request.deployment_id,
            installed_at=utc_now(),
        )
        try:
            # From here until commit or rollback, a restarted agent knows an install was under way.
            await asyncio.to_thread(
                self.paths.write_installed, installed.model_copy(update={"pending": record})
            )
            install = await self._run(run, manifest.install, Phase.INSTALL, record, previous)
            if not install.ok:
                raise ScriptError(install.describe())
            await asyncio.to_thread(self.paths.switch_current, record.version)
            await run.emit(Stage.HEALTH_CHECKING)
            if manifest.health_check is not None:
                health = await self._run(run, manifest.health_check, Phase.HEALTH_CHECK, record, previous)
                if not health.ok:
                    raise ScriptError(health.describe())
            committed = Installed(current=record, previous=previous)
            await asyncio.to_thread(self.paths.write_installed, committed)
        except BundleError as exc:
            return await self._roll_back(run, manifest, record, installed, exc)
        await self._prune(committed)
        return await run.finish(Outcome.SUCCEEDED, committed)

    async def _roll_back(
        self,
        run: _Run,
        manifest: Manifest | None,
        record: VersionRecord,
        installed: Installed,
        error: BundleError,
    ) -> InstallReport:
        """Back to installed.current, then the failed version's rollback script, then clean up."""
        previous = installed.current
        notes: list[str] = [str(error)]
        log.warning("rolling back", version=record.version, to=previous.version if previous else None)
        try:
            await asyncio.to_thread(self.paths.switch_current, previous.version if previous else None)
            if manifest is not None and manifest.rollback is not None:
                result = await self._run(run, manifest.rollback, Phase.ROLLBACK, record, previous)
                if not result.ok:
                    notes.append(result.describe())
            restored = installed.model_copy(update={"pending": None})
            await asyncio.to_thread(self.paths.write_installed, restored)
        except BundleStorageError as exc:
            # installed.json still names the install as pending: the next start tries again.
            notes.append(f"rollback incomplete: {exc}")
            return await run.finish(Outcome.FAILED, installed, error="; ".join(notes))
        keep = {r.version for r in (restored.current, restored.previous) if r is not None}
        if record.version not in keep:
            try:
                await asyncio.to_thread(self.paths.remove_version, record.version)
            except BundleStorageError as exc:
                log.warning("cannot remove the failed version", version=record.version, error=str(exc))
        outcome = Outcome.ROLLED_BACK if previous is not None else Outcome.FAILED
        return await run.finish(outcome, restored, error="; ".join(notes))

    async def _recover(self, installed: Installed) -> InstallReport | None:
        pending = installed.pending
        if pending is None:
            return None
        log.warning("an install was interrupted: rolling it back", version=pending.version)
        # First the interrupted script, if it outlived the agent: it must not race the rollback.
        await stop_leftover_script(self.paths.script_pid_file, self._script_grace_s)
        run = _Run(pending.deployment_id or "", pending.bundle_id, pending.version, self._progress)
        run.stage = Stage.INSTALLING
        manifest = await asyncio.to_thread(self._stored_manifest, pending.version)
        error = BundleStorageError(f"the agent stopped while installing version {pending.version}")
        return await self._roll_back(run, manifest, pending, installed, error)

    def _stored_manifest(self, version: str) -> Manifest | None:
        path = self.paths.manifest_of(version)
        try:
            return parse_manifest(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, MessageError) as exc:
            log.warning("cannot read the interrupted version's manifest", path=str(path), error=str(exc))
            return None

    async def _run(
        self, run: _Run, script: Script, phase: Phase, record: VersionRecord, previous: VersionRecord | None
    ) -> ScriptResult:
        version_dir = self.paths.version_dir(record.version)
        cap = self.max_script_timeout_s
        if cap is not None and script.timeout_s > cap:
            script = script.model_copy(update={"timeout_s": cap})
        env = script_environment(
            name=record.name,
            version=record.version,
            version_dir=version_dir,
            previous=previous.version if previous else None,
            previous_dir=self.paths.version_dir(previous.version) if previous else None,
            phase=phase,
            deployment_id=record.deployment_id,
        )
        result = await run_script(
            script,
            phase=phase,
            version=record.version,
            cwd=version_dir,
            env=env,
            grace_s=self._script_grace_s,
            pid_file=self.paths.script_pid_file,
        )
        run.scripts.append(result)
        return result

    async def _prune(self, installed: Installed) -> None:
        keep = {r.version for r in (installed.current, installed.previous) if r is not None}
        try:
            await asyncio.to_thread(self.paths.prune, keep)
        except BundleStorageError as exc:
            # The install stands; an old version left on disk is only wasted space.
            log.warning("cannot remove old versions", error=str(exc))


class _Run:
    """One installation's progress reporting and collected script results."""

    def __init__(self, deployment_id: str, bundle_id: str, version: str, progress: Progress | None) -> None:
        self.deployment_id = deployment_id
        self.bundle_id = bundle_id
        self.version = version
        self.progress = progress
        self.stage: Stage | None = None
        self.scripts: list[ScriptResult] = []

    async def emit(self, stage: Stage, **detail: Any) -> None:
        if stage not in {Stage.SUCCEEDED, Stage.FAILED, Stage.ROLLED_BACK}:
            self.stage = stage
        if self.progress is None:
            return
        event = ProgressEvent(
            stage=stage,
            deployment_id=self.deployment_id,
            bundle_id=self.bundle_id,
            version=self.version,
            detail=detail,
        )
        try:
            await self.progress(event)
        except Exception:  # a reporting fault must never stop or undo an installation
            log.exception("progress callback failed", stage=stage, deployment_id=self.deployment_id)

    async def finish(
        self,
        outcome: Outcome,
        installed: Installed,
        *,
        error: BundleError | str | None = None,
        already_installed: bool = False,
    ) -> InstallReport:
        report = InstallReport(
            deployment_id=self.deployment_id,
            bundle_id=self.bundle_id,
            version=self.version,
            outcome=outcome,
            current_version=installed.current.version if installed.current else None,
            previous_version=installed.previous.version if installed.previous else None,
            error=None if error is None else str(error),
            failed_stage=None if outcome is Outcome.SUCCEEDED else self.stage,
            scripts=tuple(self.scripts),
            refused=isinstance(error, BundleRefusedError),
        )
        detail: dict[str, Any] = {"current_version": report.current_version}
        if report.error is not None:
            detail |= {"error": report.error, "failed_stage": report.failed_stage, "refused": report.refused}
        if already_installed:
            detail["already_installed"] = True
        await self.emit(Stage(outcome.value), **detail)
        log.info("bundle installation ended", outcome=outcome, error=report.error, version=self.version)
        return report


def _remove_download(downloader: Downloader, sha256: str) -> None:
    for path in (downloader.part_path(sha256), downloader.signature_path(sha256)):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # Not fatal to the installation; the next download of this bundle truncates it anyway.
            log.warning("cannot remove a used download", path=str(path), error=str(exc))


def _remove_staged(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError as exc:
        # Not fatal: prepare() removes leftovers in staging before the next installation.
        log.warning("cannot remove a refused extraction", path=str(path), error=str(exc))
