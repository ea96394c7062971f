"""The operator commands' way to the REST API: one authenticated call, errors as one line.

Every operator command takes `--api` and `--token` (or KERNEX_API_URL and KERNEX_API_TOKEN), as
`kernex bundle upload` does. An API refusal ends the command with exit code 1 and the API's own
message (`kernex: 409 conflict: ...`); nothing is retried, since operator commands mutate.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer

from kernex.protocol.exceptions import KernexError

TIMEOUT = httpx.Timeout(30.0, connect=10.0)  # a deployment to a large fleet answers within this

ApiOption = Annotated[str, typer.Option("--api", envvar="KERNEX_API_URL", help="The Kernex API URL")]
TokenOption = Annotated[
    str, typer.Option("--token", envvar="KERNEX_API_TOKEN", help="Operator access token or API token")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer")]


class ApiCallError(KernexError):
    """The API refused a call, or could not be reached."""


def call(
    api: str,
    token: str,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """One API call; its JSON answer, or ApiCallError with the API's code and message."""
    url = api.rstrip("/") + path
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            response = client.request(
                method,
                url,
                json=body,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers={"Authorization": f"Bearer {token}"},
            )
    except httpx.HTTPError as exc:
        raise ApiCallError(f"{method} {url}: {exc}") from None
    if response.is_error:
        raise ApiCallError(f"{response.status_code} {_error_text(response)}")
    return response.json() if response.content else None


def request(
    api: str,
    token: str,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """`call`, ending the command with the API's one-line reason (exit 1) when it fails."""
    try:
        return call(api, token, method, path, body=body, params=params)
    except ApiCallError as exc:
        raise fail(exc) from None


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        text = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
    for detail in error.get("details") or []:
        where = ".".join(str(part) for part in detail.get("loc", []))
        text += f" ({where}: {detail.get('msg')})" if where else f" ({detail.get('msg')})"
    return str(text)


USAGE_EXIT = 2  # as click exits on a bad option: the command line, not the API, was wrong


def fail(error: Exception) -> typer.Exit:
    """Print the one-line reason and return the exit to raise (code 1)."""
    typer.echo(f"kernex: {error}", err=True)
    return typer.Exit(1)


def usage(error: Exception) -> typer.Exit:
    """Print the one-line reason a command line is wrong and return the exit to raise (code 2)."""
    typer.echo(f"kernex: {error}", err=True)
    return typer.Exit(USAGE_EXIT)


def show_json(data: Any) -> None:
    """The API's answer, as it came, indented."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def table(rows: list[list[str]], header: list[str]) -> None:
    """Columns padded to their widest cell (plain text: pipes and scripts read it too)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
