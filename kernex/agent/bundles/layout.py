"""The bundles directory under the agent's state dir, and the record of what is installed.

```
bundles/
  staging/                 downloads (`<sha256>.part`, `<sha256>.sig`) and extractions in progress
  versions/<version>/      complete, verified versions (each with the manifest it was verified against)
  current -> versions/<version>
  installed.json           current and previous version records, and the install in progress
```

A version directory appears only once it is complete (extracted in staging, then renamed), and
`current` is switched with a rename over the old link, so a crash at any point leaves `current`
on a whole version. `installed.json` names an install in progress (`pending`) from before its
script runs until it is committed or rolled back: an agent that restarts with `pending` set
knows the install was interrupted and rolls it back (`BundleInstaller.recover`).

Every function here blocks (file I/O): call them with `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from kernex.agent.bundles.errors import BundleStorageError
from kernex.agent.files import write_atomic
from kernex.kit.logs import get_logger
from kernex.protocol.manifest import MANIFEST_NAME

BUNDLES_DIR = "bundles"
STAGING_DIR = "staging"
VERSIONS_DIR = "versions"
CURRENT_LINK = "current"
INSTALLED_FILE = "installed.json"
SCRIPT_PID_FILE = "script.pid"  # the running script's pid and start time (kernex.agent.bundles.scripts)
EXTRACT_PREFIX = "extract-"  # staging/extract-<uuid>/: a version being unpacked
TRASH_PREFIX = "trash-"  # staging/trash-<uuid>/: a version dir on its way out
LINK_TMP_PREFIX = ".current."  # bundles/.current.<uuid>.tmp: the link before it is renamed into place

log = get_logger(__name__)


class VersionRecord(BaseModel):
    """One installed (or installing) bundle version."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: Annotated[str, Field(min_length=1, max_length=128)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    bundle_id: Annotated[str, Field(min_length=1, max_length=128)]
    sha256: Annotated[str, Field(min_length=64, max_length=64)]
    deployment_id: str | None = None
    installed_at: AwareDatetime


class Installed(BaseModel):
    """The content of `installed.json`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    current: VersionRecord | None = None
    previous: VersionRecord | None = None
    # Set from before the install script runs until the install is committed or rolled back.
    pending: VersionRecord | None = None


@dataclass(frozen=True, slots=True)
class BundlePaths:
    """Where the bundles of one agent live."""

    root: Path

    @classmethod
    def under(cls, state_dir: Path) -> BundlePaths:
        """The bundles directory of an agent state dir."""
        return cls(state_dir / BUNDLES_DIR)

    @property
    def staging(self) -> Path:
        """Downloads and extractions in progress."""
        return self.root / STAGING_DIR

    @property
    def versions(self) -> Path:
        """Complete versions, one directory each."""
        return self.root / VERSIONS_DIR

    @property
    def current(self) -> Path:
        """The symlink to the running version."""
        return self.root / CURRENT_LINK

    @property
    def installed_file(self) -> Path:
        """The installed.json record."""
        return self.root / INSTALLED_FILE

    @property
    def script_pid_file(self) -> Path:
        """Names the script running right now, so a restarted agent can stop an orphaned one."""
        return self.root / SCRIPT_PID_FILE

    def version_dir(self, version: str) -> Path:
        """The directory of a complete version (semver strings are safe directory names)."""
        return self.versions / version

    def manifest_of(self, version: str) -> Path:
        """The verified manifest kept with a version, for its rollback script later."""
        return self.version_dir(version) / MANIFEST_NAME

    def prepare(self) -> Installed:
        """Create the directories, drop leftovers of an interrupted run, read installed.json."""
        try:
            for path in (self.root, self.staging, self.versions):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            for leftover in self.staging.iterdir():
                if leftover.name.startswith((EXTRACT_PREFIX, TRASH_PREFIX)):
                    log.info("removing a leftover of an interrupted install", path=str(leftover))
                    remove_tree(leftover)
            for link in self.root.glob(f"{LINK_TMP_PREFIX}*"):
                link.unlink(missing_ok=True)
        except OSError as exc:
            raise BundleStorageError(f"cannot prepare the bundles directory {self.root}: {exc}") from None
        return self.read_installed()

    def read_installed(self) -> Installed:
        """The installed.json record (a missing file means nothing is installed yet)."""
        try:
            raw = self.installed_file.read_bytes()
        except FileNotFoundError:
            return Installed()
        except OSError as exc:
            raise BundleStorageError(f"cannot read {self.installed_file}: {exc}") from None
        try:
            return Installed.model_validate_json(raw)
        except ValidationError as exc:
            # Guessing would risk rolling back to a version that is not there: stop and say so.
            raise BundleStorageError(
                f"{self.installed_file} is corrupt ({exc.error_count()} errors)"
            ) from None

    def write_installed(self, installed: Installed) -> None:
        """Replace installed.json atomically and durably."""
        try:
            write_atomic(self.installed_file, installed.model_dump_json(indent=2).encode("utf-8"))
        except OSError as exc:
            raise BundleStorageError(f"cannot write {self.installed_file}: {exc}") from None

    def current_target(self) -> str | None:
        """The version `current` points at, or None when there is no link."""
        try:
            target = self.current.readlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BundleStorageError(f"cannot read the link {self.current}: {exc}") from None
        return target.name

    def switch_current(self, version: str | None) -> None:
        """Point `current` at a version (None removes it); atomic: rename a new link over the old."""
        try:
            if version is None:
                self.current.unlink(missing_ok=True)
            else:
                tmp = self.root / f"{LINK_TMP_PREFIX}{uuid.uuid4().hex}.tmp"
                # Relative, so the state dir can move without breaking the link.
                tmp.symlink_to(Path(VERSIONS_DIR) / version)
                try:
                    tmp.replace(self.current)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
            fsync_dir(self.root)
        except OSError as exc:
            raise BundleStorageError(f"cannot switch {self.current} to {version}: {exc}") from None

    def new_extract_dir(self) -> Path:
        """A fresh, empty directory in staging to unpack a version into."""
        path = self.staging / f"{EXTRACT_PREFIX}{uuid.uuid4().hex}"
        try:
            path.mkdir(mode=0o755)
        except OSError as exc:
            raise BundleStorageError(f"cannot create {path}: {exc}") from None
        return path

    def publish_version(self, extracted: Path, version: str) -> Path:
        """Rename a complete extraction to versions/<version>, replacing an older copy of it."""
        target = self.version_dir(version)
        try:
            if target.exists():
                # Rename it out of the way first: a directory cannot be renamed over a non-empty one.
                trash = self.staging / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
                target.rename(trash)
                remove_tree(trash)
            extracted.rename(target)
            fsync_dir(self.versions)
        except OSError as exc:
            raise BundleStorageError(f"cannot move version {version} into place: {exc}") from None
        return target

    def remove_version(self, version: str) -> None:
        """Delete a version directory (never the one `current` points at)."""
        if self.current_target() == version:
            raise BundleStorageError(f"refusing to remove version {version}: it is current")
        target = self.version_dir(version)
        if not target.exists():
            return
        try:
            trash = self.staging / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
            target.rename(trash)
            remove_tree(trash)
        except OSError as exc:
            raise BundleStorageError(f"cannot remove version {version}: {exc}") from None

    def prune(self, keep: set[str]) -> None:
        """Remove every version directory except those kept (current and previous)."""
        try:
            present = [path.name for path in self.versions.iterdir() if path.is_dir()]
        except OSError as exc:
            raise BundleStorageError(f"cannot list {self.versions}: {exc}") from None
        for version in present:
            if version not in keep:
                log.info("removing an old version", version=version)
                self.remove_version(version)


def remove_tree(path: Path) -> None:
    """Delete a directory tree (OSError propagates: callers say what they were removing)."""
    shutil.rmtree(path)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
