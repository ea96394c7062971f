"""`/api/v1/bundles`: upload and delete (operators), list (viewers), download (devices and operators).

Upload form (multipart/form-data, streamed; never buffered whole):
- `signature` (optional, FIRST): a release signature made offline with `kernex bundle sign` by a
  trusted release key. Without it the server signs the release with its own key.
- `file`: the `.tar.gz` bundle, `manifest.json` its first member.
The signature must precede the file because the archive is stored as it arrives; a signature
arriving after it is refused with 422.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from kernex.api.auth.deps import OperatorDep, ViewerDep
from kernex.api.bundles import service
from kernex.api.bundles.deps import DownloadCallerDep
from kernex.api.bundles.runtime import RuntimeDep, lifespan
from kernex.api.bundles.schemas import BundleOut, BundlePage
from kernex.api.deps import SessionDep, StateDep
from kernex.kit.logs import get_logger
from kernex.protocol.manifest import Manifest

log = get_logger(__name__)

PAGE_MAX = 500  # bounds one response's size and query cost
DOWNLOAD_MEDIA_TYPE = "application/gzip"

router = APIRouter(prefix="/api/v1/bundles", tags=["bundles"], lifespan=lifespan)

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "signature": {
                            "type": "string",
                            "description": "Optional offline release signature (JWS); must come first",
                        },
                        "file": {"type": "string", "format": "binary", "description": "The .tar.gz bundle"},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    response_model=BundleOut,
    status_code=status.HTTP_201_CREATED,
    operation_id="uploadBundle",
    openapi_extra=_UPLOAD_BODY,
    responses={
        409: {"description": "A bundle with this name and version exists"},
        413: {"description": "Over KERNEX_MAX_BUNDLE_BYTES"},
        422: {"description": "Not a valid bundle or signature; the message names the field or member"},
    },
)
async def upload_bundle(
    request: Request, session: SessionDep, runtime: RuntimeDep, principal: OperatorDep
) -> BundleOut:
    """Upload a bundle; it is validated, signed and stored as it streams in."""
    length = request.headers.get("content-length")
    bundle = await service.upload(
        session,
        runtime,
        actor=principal,
        content_type=request.headers.get("content-type"),
        content_length=int(length) if length is not None and length.isdigit() else None,
        body=request.stream(),
        request=request,
    )
    return service.to_out(bundle)


@router.get("", response_model=BundlePage, operation_id="listBundles")
async def list_bundles(
    session: SessionDep,
    _principal: ViewerDep,
    name: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> BundlePage:
    """Bundles, newest first, optionally of one name."""
    bundles, total = await service.list_bundles(session, name=name, limit=limit, offset=offset)
    return BundlePage(items=[service.to_out(b) for b in bundles], total=total, limit=limit, offset=offset)


@router.get("/manifest-schema", operation_id="bundleManifestSchema")
async def manifest_schema(_principal: ViewerDep) -> dict[str, Any]:
    """The JSON Schema every bundle's manifest.json is validated against."""
    return Manifest.model_json_schema(by_alias=True)


@router.get("/{bundle_id}", response_model=BundleOut, operation_id="getBundle")
async def get_bundle(bundle_id: str, session: SessionDep, _principal: ViewerDep) -> BundleOut:
    """One bundle with its manifest and release signature."""
    return service.to_out(await service.get_bundle(session, bundle_id))


@router.delete(
    "/{bundle_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteBundle",
    responses={409: {"description": "A deployment uses the bundle"}},
)
async def delete_bundle(
    bundle_id: str, request: Request, session: SessionDep, runtime: RuntimeDep, principal: OperatorDep
) -> Response:
    """Delete a bundle that no deployment refers to."""
    await service.delete_bundle(session, runtime, bundle_id, actor=principal, request=request)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{bundle_id}/download",
    operation_id="downloadBundle",
    response_class=StreamingResponse,
    responses={
        200: {"content": {DOWNLOAD_MEDIA_TYPE: {}}, "description": "The whole bundle"},
        206: {"content": {DOWNLOAD_MEDIA_TYPE: {}}, "description": "The requested byte range"},
        307: {"description": "A presigned URL of the S3 object (when enabled)"},
        403: {"description": "The device is not a target of an active deployment of this bundle"},
        410: {"description": "The bundle is quarantined"},
        416: {"description": "The range starts past the end"},
    },
)
async def download_bundle(
    bundle_id: str,
    request: Request,
    session: SessionDep,
    state: StateDep,
    runtime: RuntimeDep,
    caller: DownloadCallerDep,
) -> Response:
    """Stream the bundle (Range: bytes=N- resumes), or redirect to a presigned S3 URL."""
    bundle = await service.authorize_download(session, bundle_id, caller)
    await service.ensure_intact(session, runtime, bundle, request)
    etag = f'"{bundle.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "X-Kernex-Sha256": bundle.sha256,
        "X-Kernex-Release-Signature": bundle.signature or "",
    }
    filename = f"{bundle.name}-{bundle.version}.tar.gz"
    if runtime.presigned_downloads:
        url = await runtime.store.presigned_url(
            bundle.storage_key, ttl_s=runtime.presign_ttl_s, filename=filename
        )
        if url is not None:
            log.info("bundle download redirected", bundle_id=bundle.id, caller=caller.actor)
            return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers)
    byte_range = service.requested_range(
        request.headers.get("range"), request.headers.get("if-range"), etag, bundle.size
    )
    status_code = status.HTTP_200_OK
    if byte_range is None:
        byte_range = service.ByteRange(0, bundle.size)
    else:
        status_code = status.HTTP_206_PARTIAL_CONTENT
        headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end - 1}/{bundle.size}"
    headers["Content-Length"] = str(byte_range.end - byte_range.start)
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    log.info(
        "bundle download",
        bundle_id=bundle.id,
        caller=caller.actor,
        start=byte_range.start,
        end=byte_range.end,
    )
    return StreamingResponse(
        service.stream(runtime, state.sessions, bundle, byte_range),
        status_code=status_code,
        headers=headers,
        media_type=DOWNLOAD_MEDIA_TYPE,
    )
