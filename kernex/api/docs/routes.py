"""Swagger UI at /docs, served from the `swagger-ui-bundle` package: Kernex runs offline, so no CDN.

The page loads only same-origin scripts (the bundle and a small initialiser), which lets /docs
keep a strict Content-Security-Policy without 'unsafe-inline' for scripts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from kernex.api.errors import ServiceUnavailableError

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
INIT_PATH = "/docs/init.js"

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title} - API</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script src="{init}"></script>
</body>
</html>
"""

_INIT = """window.ui = SwaggerUIBundle({
  url: %s,
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: false,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});
"""


def swagger_ui_dir() -> Path | None:
    """The vendored Swagger UI directory of the installed `swagger-ui-bundle`, if any."""
    try:
        vendor = Path(str(resources.files("swagger_ui_bundle") / "vendor"))
    except ModuleNotFoundError:
        return None
    found = sorted(vendor.glob("swagger-ui-*/swagger-ui-bundle.js"))
    return found[-1].parent if found else None


def install_docs(app: FastAPI) -> None:
    """Serve /docs and its assets; create the app with docs_url=None and redoc_url=None."""
    assets = swagger_ui_dir()
    openapi_url = app.openapi_url or "/openapi.json"

    async def docs() -> HTMLResponse:
        if assets is None:
            raise ServiceUnavailableError("Swagger UI is not installed: pip install 'kernex[server]'")
        return HTMLResponse(_PAGE.format(title=app.title, assets=ASSETS_PATH, init=INIT_PATH))

    async def init() -> Response:
        return Response(_INIT % f'"{openapi_url}"', media_type="text/javascript")

    app.add_api_route(DOCS_PATH, docs, methods=["GET"], include_in_schema=False)
    app.add_api_route(INIT_PATH, init, methods=["GET"], include_in_schema=False)
    if assets is not None:
        app.mount(ASSETS_PATH, StaticFiles(directory=assets), name="swagger-ui")
