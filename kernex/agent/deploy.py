"""Deploy commands: one installation at a time in the background, each stage a signed event.

At most once: the command's revision and a `DeployRecord` are persisted in one state write
before the installer starts, so neither a retained command seen again after a reconnect nor a
restart can run it twice. A crash mid-install leaves the record without an outcome; at the next
start `BundleInstaller.recover()` rolls the install back and the outcome is reported instead of
running the command again. The record keeps the outcome until the platform acknowledged the
terminal event; an agent restarted before that sends it once more (the platform keeps the
first terminal report of a deployment and ignores a repeat).

While an installation runs, a newer deploy command waits (only the newest one) until it ends:
an installation is never abandoned half way, so every command gets exactly one terminal report.
The MQTT connection, heartbeats and config commands carry on meanwhile. A command withdrawn (an
empty retained message) before it started is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from kernex.agent.bundles import (
    BundleInstaller,
    BundleStorageError,
    InstallReport,
    InstallRequest,
    Outcome,
    Progress,
    ProgressEvent,
    Stage,
)
from kernex.agent.config import LiveSettings
from kernex.agent.events import EventPublisher
from kernex.agent.state import DeployRecord, StateStore
from kernex.agent.wakeup import Wakeup
from kernex.kit.logs import get_logger
from kernex.protocol.commands import TERMINAL_STAGES, Command, DeploymentProgress, DeploymentStage, EventType
from kernex.protocol.messages import BundleRef, utc_now
from kernex.protocol.topics import CommandKind

OUTPUT_MAX_CHARS = 16_384  # DeploymentProgress.output's bound; the end says why a script failed
ERROR_MAX_CHARS = 4096  # DeploymentProgress.error's bound
TRUNCATED_MARK = "[...]\n"
INTERRUPTED_ERROR = "the agent stopped before the installation finished; the device runs what it ran before"

_OUTCOME_STAGES = {
    Outcome.SUCCEEDED: DeploymentStage.SUCCEEDED,
    Outcome.FAILED: DeploymentStage.FAILED,
    Outcome.ROLLED_BACK: DeploymentStage.ROLLED_BACK,
}
_TERMINAL_INSTALL_STAGES = frozenset({Stage.SUCCEEDED, Stage.FAILED, Stage.ROLLED_BACK})

log = get_logger(__name__)


def install_request(command: Command) -> InstallRequest:
    """The installer's request for a deploy command; raises ValidationError when it cannot be one."""
    body = command.deploy
    if body is None:  # Command guarantees the body matching its kind
        raise ValueError("a deploy command without a deploy body")
    return InstallRequest(
        deployment_id=body.deployment_id,
        bundle_id=body.bundle_id,
        name=body.name or None,
        version=body.version,
        sha256=body.sha256,
        size=body.size,
        download_path=body.download_path,
        rollback=body.rollback,
    )


def tail(text: str | None, limit: int) -> str | None:
    """The end of `text` within `limit` characters (marked when cut); None for nothing."""
    if not text:
        return None
    if len(text) <= limit:
        return text
    return TRUNCATED_MARK + text[-(limit - len(TRUNCATED_MARK)) :]


def outcome_stage(report: InstallReport) -> DeploymentStage:
    """The terminal deployment stage of an installation report."""
    if report.outcome is Outcome.FAILED and report.refused:
        return DeploymentStage.REFUSED
    return _OUTCOME_STAGES[report.outcome]


class Deployer:
    """Runs deploy commands one at a time and reports them; `run()` is its task."""

    def __init__(
        self,
        store: StateStore,
        installer_for: Callable[[Progress], BundleInstaller],
        events: EventPublisher,
        live: LiveSettings,
    ) -> None:
        """`installer_for` builds the installer around this deployer's progress callback."""
        self._store = store
        self._installer = installer_for(self._on_progress)
        self._events = events
        self._live = live
        self._queued: Command | None = None
        self._running: DeployRecord | None = None
        self._wake = Wakeup()
        self._delivered: set[str] = set()  # command ids whose terminal event the platform took
        self.executed = 0  # commands taken up by this run, for tests and status displays

    @property
    def installer(self) -> BundleInstaller:
        """The bundle installer."""
        return self._installer

    @property
    def newest_revision(self) -> int:
        """The newest deploy revision taken up or waiting; an offer must be newer to count."""
        taken = self._store.state.revisions.get(CommandKind.DEPLOY.value, 0)
        return max(taken, self._queued.revision if self._queued is not None else 0)

    def offer(self, command: Command) -> bool:
        """Queue a verified deploy command newer than everything seen; False if it is not newer."""
        if command.revision <= self.newest_revision:
            return False
        if self._queued is not None:
            log.info(
                "a newer deploy command replaces the one waiting",
                replaced=self._queued.command_id,
                command_id=command.command_id,
            )
        self._queued = command
        self._wake.ring()
        return True

    def withdraw(self) -> None:
        """The platform withdrew its deploy command: drop the one waiting, if any (a running one runs on)."""
        if self._queued is not None:
            log.info("a deploy command was withdrawn before it started", command_id=self._queued.command_id)
            self._queued = None

    async def recover(self) -> None:
        """Settle what a previous run left (call once at start, before any command runs)."""
        try:
            report = await self._installer.recover()
        except BundleStorageError as exc:
            # Installations will fail (and report why) until the storage is fixed; the agent runs on.
            log.error("cannot recover the bundles directory", error=str(exc))  # noqa: TRY400 - reported, no traceback
            report = None
        record = self._store.state.deploy
        if record is None:
            if report is not None:
                log.warning(
                    "rolled back an interrupted install no deploy command names", version=report.version
                )
            await self._sync_bundle()
        elif record.stage is None:
            log.warning(
                "a deploy command was interrupted: reporting its outcome, not running it again",
                command_id=record.command_id,
                deployment_id=record.deployment_id,
            )
            await self._finish(await self._settle_interrupted(record, report))
        else:
            log.info(
                "reporting the last deploy outcome again", command_id=record.command_id, stage=record.stage
            )
            await self._sync_bundle()
            await self._report(record)

    async def run(self) -> None:
        """Execute queued deploy commands, one at a time, until cancelled."""
        while True:
            await self._wake.wait(None)
            await self._forget_delivered()
            command, self._queued = self._queued, None
            if command is not None:
                await self._execute(command)

    async def _execute(self, command: Command) -> None:
        state = self._store.state
        taken = state.revisions.get(CommandKind.DEPLOY.value, 0)
        if command.revision <= taken:
            log.info(
                "deploy command already taken up", command_id=command.command_id, revision=command.revision
            )
            return
        if command.expires_at <= utc_now():
            log.warning("command refused", reason="expired", command_id=command.command_id, kind="deploy")
            return
        body = command.deploy
        if body is None:  # Command guarantees the body matching its kind
            raise ValueError("a deploy command without a deploy body")
        record = DeployRecord(
            command_id=command.command_id,
            revision=command.revision,
            deployment_id=body.deployment_id,
            bundle_id=body.bundle_id,
            version=body.version,
        )
        # Before anything runs: from here on, this command is never started again.
        await self._store.update(
            revisions={**state.revisions, CommandKind.DEPLOY.value: command.revision}, deploy=record
        )
        self.executed += 1
        log.info(
            "executing deploy command",
            command_id=command.command_id,
            deployment_id=body.deployment_id,
            version=body.version,
            rollback=body.rollback,
        )
        try:
            request = install_request(command)
        except ValidationError as exc:
            error = f"deploy command refused: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}"
            log.warning("command refused", reason="invalid", command_id=command.command_id, error=error)
            installed = await self._current_version()
            refused = record.model_copy(
                update={"stage": DeploymentStage.REFUSED, "error": error, "current_version": installed}
            )
            await self._finish(refused)
            return
        self._installer.max_script_timeout_s = self._live.install_timeout_s
        self._installer.download_timeout_s = self._live.download_timeout_s
        self._running = record
        try:
            report = await self._installer.apply(request)
        finally:
            self._running = None
        await self._finish(
            record.model_copy(
                update={
                    "stage": outcome_stage(report),
                    "error": tail(report.error, ERROR_MAX_CHARS),
                    "output": tail(report.output, OUTPUT_MAX_CHARS),
                    "current_version": report.current_version,
                }
            )
        )

    async def _settle_interrupted(self, record: DeployRecord, report: InstallReport | None) -> DeployRecord:
        if report is not None and report.deployment_id == record.deployment_id:
            return record.model_copy(
                update={
                    "stage": outcome_stage(report),
                    "error": tail(report.error, ERROR_MAX_CHARS),
                    "output": tail(report.output, OUTPUT_MAX_CHARS),
                    "current_version": report.current_version,
                }
            )
        try:
            current = (await self._installer.installed()).current
        except BundleStorageError as exc:
            log.warning("cannot read what is installed", error=str(exc))
            current = None
        if current is not None and (current.deployment_id, current.version) == (
            record.deployment_id,
            record.version,
        ):
            # The install had committed; the agent stopped before it recorded the outcome.
            return record.model_copy(
                update={"stage": DeploymentStage.SUCCEEDED, "current_version": current.version}
            )
        return record.model_copy(
            update={
                "stage": DeploymentStage.FAILED,
                "error": INTERRUPTED_ERROR,
                "current_version": current.version if current else None,
            }
        )

    async def _finish(self, record: DeployRecord) -> None:
        """Persist the outcome and what now runs, then report it."""
        await self._store.update(deploy=record, bundle=await self._installed_bundle())
        log.info(
            "deploy command finished",
            command_id=record.command_id,
            stage=record.stage,
            version=record.version,
            current_version=record.current_version,
            error=record.error,
        )
        await self._report(record)

    async def _report(self, record: DeployRecord) -> None:
        stage = record.stage
        if stage is None or stage not in TERMINAL_STAGES:
            raise ValueError("only a finished deploy is reported")
        command_id = record.command_id

        def delivered() -> None:
            self._delivered.add(command_id)
            self._wake.ring()

        await self._events.publish(
            EventType.DEPLOYMENT,
            DeploymentProgress(
                deployment_id=record.deployment_id,
                command_id=record.command_id,
                bundle_id=record.bundle_id,
                version=record.version,
                stage=stage,
                error=record.error,
                output=record.output,
                current_version=record.current_version,
            ),
            on_delivered=delivered,
        )

    async def _forget_delivered(self) -> None:
        record = self._store.state.deploy
        if record is not None and record.stage is not None and record.command_id in self._delivered:
            await self._store.update(deploy=None)
        self._delivered.clear()

    async def _on_progress(self, event: ProgressEvent) -> None:
        # Terminal stages are reported from the installer's report, which has the scripts' output.
        record = self._running
        if event.stage in _TERMINAL_INSTALL_STAGES or record is None:
            return
        if event.deployment_id != record.deployment_id:
            log.debug("progress of another deployment ignored", deployment_id=event.deployment_id)
            return
        await self._events.publish(
            EventType.DEPLOYMENT,
            DeploymentProgress(
                deployment_id=record.deployment_id,
                command_id=record.command_id,
                bundle_id=record.bundle_id,
                version=record.version,
                stage=DeploymentStage(event.stage.value),
            ),
        )

    async def _installed_bundle(self) -> BundleRef | None:
        """What `current` runs per installed.json (the truth), or the stored bundle if unreadable."""
        try:
            current = (await self._installer.installed()).current
        except BundleStorageError as exc:
            log.warning("cannot read what is installed", error=str(exc))
            return self._store.state.bundle
        return BundleRef(id=current.bundle_id, version=current.version) if current is not None else None

    async def _current_version(self) -> str | None:
        bundle = await self._installed_bundle()
        return bundle.version if bundle is not None else None

    async def _sync_bundle(self) -> None:
        bundle = await self._installed_bundle()
        if bundle != self._store.state.bundle:
            await self._store.update(bundle=bundle)
