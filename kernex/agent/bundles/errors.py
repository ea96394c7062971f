"""Errors of bundle installation: each becomes the `error` of an InstallReport, never an agent crash.

Unlike the rest of `AgentError`, these do not stop the agent: a refused or failed bundle is
reported to the control plane and the device keeps running the version it had.
"""

from kernex.agent.exceptions import AgentError


class BundleError(AgentError):
    """Root of the errors a bundle installation reports."""


class DownloadError(BundleError):
    """The bundle could not be downloaded (refused by the API, or retries exhausted)."""


class BundleRefusedError(BundleError):
    """The bundle failed verification or a safety check; nothing of it was installed."""


class VersionRefusedError(BundleRefusedError):
    """The bundle is older than the installed version and the command is not a rollback."""


class ScriptError(BundleError):
    """A bundle script exited non-zero, timed out, or could not be started."""


class BundleStorageError(BundleError):
    """The bundles directory cannot be read or written (disk full, permissions, corrupt record)."""
