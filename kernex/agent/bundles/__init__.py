"""Bundle installation on the device (DESIGN.md "Bundles"): download, verify, extract, install,
switch, health-check, roll back.

The deploy command calls `BundleInstaller.apply(InstallRequest)` and gets an `InstallReport`;
`progress` events carry each stage. `BundleInstaller.recover()` rolls back an install that a
crash interrupted, once at agent start. See `layout` for the directory structure.
"""

from kernex.agent.bundles.errors import (
    BundleError,
    BundleRefusedError,
    BundleStorageError,
    DownloadError,
    ScriptError,
    VersionRefusedError,
)
from kernex.agent.bundles.installer import (
    BundleInstaller,
    InstallReport,
    InstallRequest,
    Outcome,
    Progress,
    ProgressEvent,
    Stage,
)
from kernex.agent.bundles.layout import BundlePaths, Installed, VersionRecord
from kernex.agent.bundles.scripts import Phase, ScriptResult

__all__ = [
    "BundleError",
    "BundleInstaller",
    "BundlePaths",
    "BundleRefusedError",
    "BundleStorageError",
    "DownloadError",
    "InstallReport",
    "InstallRequest",
    "Installed",
    "Outcome",
    "Phase",
    "Progress",
    "ProgressEvent",
    "ScriptError",
    "ScriptResult",
    "Stage",
    "VersionRecord",
    "VersionRefusedError",
]
