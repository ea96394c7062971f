"""The web dashboard at /ui: a small hand-written single-page app served by the API process.

No build step and no third-party code: `static/` holds plain ES modules and CSS, served as they
are. The page lives on the API's origin and calls the same REST routes with the same bearer
tokens as every other client (see static/api.js), and follows the fleet live through
GET /api/v1/events/stream (stream.py).

Assets are served from memory under a path that carries a digest of their contents
(/ui/assets/<digest>/app.js), so browsers may cache them for good (`immutable`) and a reload
costs one request for the page, not one per module: the API's per-address rate limit counts
every request. Only files present at start are served: no path ever reaches the filesystem.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from kernex.api.dashboard import stream
from kernex.api.errors import ERROR_RESPONSES, NotFoundError

STATIC_DIR = Path(__file__).parent / "static"
UI_PATH = "/ui/"
ASSETS_PATH = "/ui/assets"
DIGEST_CHARS = 16
IMMUTABLE = "public, max-age=31536000, immutable"  # a year: the digest changes with the content
# Scripts, styles, images and requests from our own origin only: no inline script, no eval, no
# inline style attributes (the app sets styles through the CSSOM, which CSP allows).
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


@dataclass(frozen=True)
class Asset:
    """One file of the app, read at start."""

    body: bytes
    media_type: str
    etag: str


@dataclass(frozen=True)
class Assets:
    """Every file of the app, the digest over all of them, and the page that loads them."""

    files: dict[str, Asset]
    digest: str
    index: str


def load_assets(directory: Path = STATIC_DIR) -> Assets:
    """Read the app's files; the page references them under their combined digest."""
    files: dict[str, Asset] = {}
    combined = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        body = path.read_bytes()
        combined.update(name.encode() + b"\0" + hashlib.sha256(body).digest())
        media_type = _TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        files[name] = Asset(body=body, media_type=media_type, etag=etag)
    digest = combined.hexdigest()[:DIGEST_CHARS]
    page = files.pop("index.html")
    index = page.body.decode().replace("{{ASSETS}}", f"{ASSETS_PATH}/{digest}")
    return Assets(files=files, digest=digest, index=index)


def _headers(cache: str) -> dict[str, str]:
    return {"Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": cache}


def build_router(assets: Assets) -> APIRouter:
    """/, /ui, /ui/ and /ui/assets/<digest>/<file>."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse(UI_PATH)

    @router.get("/ui")
    async def ui_redirect() -> RedirectResponse:
        return RedirectResponse(UI_PATH)

    @router.get(UI_PATH)
    async def index() -> HTMLResponse:
        # Revalidated on every load, so a new release's digest is picked up at once.
        return HTMLResponse(assets.index, headers=_headers("no-cache"))

    @router.get(ASSETS_PATH + "/{digest}/{name:path}")
    async def asset(digest: str, name: str, request: Request) -> Response:
        found = assets.files.get(name)
        if found is None:
            raise NotFoundError(f"no dashboard asset {name!r}")
        # A page from before a restart may ask for an older digest: serve today's file, uncached.
        cache = IMMUTABLE if digest == assets.digest else "no-cache"
        headers = _headers(cache) | {"ETag": found.etag}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, media_type=found.media_type, headers=headers)

    return router


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard and its live events stream."""
    app.include_router(build_router(load_assets()))
    app.include_router(stream.router, responses=ERROR_RESPONSES)
