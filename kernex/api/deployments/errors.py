"""Domain errors of the deployments API (mapped to HTTP by kernex.api.errors' handler)."""

from __future__ import annotations

from http import HTTPStatus

from kernex.api.errors import ApiError, ConflictError, NotFoundError


class BundleGoneError(ApiError):
    """The bundle's stored archive is missing or quarantined: nothing can be deployed from it."""

    status_code = HTTPStatus.GONE
    code = "bundle_gone"


class NoTargetsError(NotFoundError):
    """No active device carries all of the tags the deployment selects by."""

    code = "no_targets"


class DeploymentActiveError(ConflictError):
    """A device already has a deployment in progress (and the request did not supersede it)."""

    code = "deployment_active"


class NoRollbackTargetError(ConflictError):
    """The device has no earlier successful bundle to roll back to."""

    code = "no_rollback_target"
