"""Operator commands over the REST API: `kernex devices`, `kernex groups`, `kernex deployments`.

What the dashboard does, for scripts and terminals: list and tag devices, define groups, deploy a
bundle (at once or as a phased rollout), watch, approve and cancel. Each call is one API request
with the operator's token (kernex.cli.client); the API checks roles and writes the audit log.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from kernex.cli.client import (
    ApiOption,
    JsonOption,
    TokenOption,
    fail,
    request,
    show_json,
    table,
    usage,
)

devices_app = typer.Typer(no_args_is_help=True)
groups_app = typer.Typer(no_args_is_help=True)
deployments_app = typer.Typer(no_args_is_help=True)

_RATE_RE = re.compile(r"^(\d+)/(\d+)s$")
_WINDOW_RE = re.compile(r"^(\d{1,2}:\d{2})-(\d{1,2}:\d{2})$")


def _phase(text: str) -> dict[str, Any]:
    """`10%` (cumulative share of the selection) or `25` (a batch of devices)."""
    try:
        if text.endswith("%"):
            return {"percent": float(text[:-1])}
        return {"devices": int(text)}
    except ValueError:
        raise ValueError(f"{text!r}: a phase is a percentage (10%) or a device count (25)") from None


def _rate(text: str) -> dict[str, int]:
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r}: write DEVICES/SECONDSs, for example 50/60s")
    return {"devices": int(match[1]), "period_s": int(match[2])}


def _window(text: str) -> dict[str, str]:
    match = _WINDOW_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r}: write HH:MM-HH:MM in UTC, for example 01:00-04:00")
    return {"start": match[1], "end": match[2]}


def _selector(device: list[str], tag: list[str], group: str | None) -> dict[str, Any]:
    chosen = [name for name, given in (("--device", device), ("--tag", tag), ("--group", group)) if given]
    if len(chosen) != 1:
        raise ValueError("choose the devices with exactly one of --device, --tag or --group")
    if device:
        return {"device_ids": device}
    if tag:
        return {"tags": tag}
    return {"group_id": group}


def _deployment_body(
    bundle_id: str,
    selector: dict[str, Any],
    phases: str | None,
    settings: dict[str, Any],
    *,
    rate: str | None,
    window: str | None,
    abort: dict[str, Any],
    rollback: bool,
    dry_run: bool,
) -> dict[str, Any]:
    """The API's deployment body from the command line (unset options left to the API's defaults)."""
    body: dict[str, Any] = {"bundle_id": bundle_id, **selector}
    if phases is None:
        if dry_run or settings["require_approval"] or rate or window or rollback:
            raise ValueError("--dry-run, --approval, --rate, --window and --rollback need --phases")
        return body
    strategy: dict[str, Any] = {"phases": [_phase(p.strip()) for p in phases.split(",") if p.strip()]}
    strategy |= {key: value for key, value in settings.items() if value is not None}
    if rate is not None:
        strategy["rate_limit"] = _rate(rate)
    if window is not None:
        strategy["maintenance_window"] = _window(window)
    strategy["abort"] = {key: value for key, value in abort.items() if value is not None} | {
        "rollback": rollback
    }
    body["rollout"] = strategy
    return body


# --- devices ---------------------------------------------------------------------------------


@devices_app.command("list")
def list_devices(
    *,
    api: ApiOption,
    token: TokenOption,
    status: Annotated[str | None, typer.Option(help="online, offline or unknown")] = None,
    search: Annotated[str | None, typer.Option("--search", "-q", help="Part of a name or id")] = None,
    sort: Annotated[str, typer.Option(help="registered, name, status, last_seen or version")] = "registered",
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    as_json: JsonOption = False,
) -> None:
    """Devices with their status, version and tags."""
    page = request(
        api,
        token,
        "GET",
        "/api/v1/devices",
        params={"status": status, "q": search, "sort": sort, "limit": limit},
    )
    if as_json:
        show_json(page)
        return
    rows = [
        [
            d["id"],
            d["name"] or "",
            d["status"],
            d["state"],
            (d.get("bundle") or {}).get("version") or "",
            ",".join(d["tags"]),
        ]
        for d in page["items"]
    ]
    table(rows, ["ID", "NAME", "STATUS", "STATE", "VERSION", "TAGS"])
    typer.echo(f"{len(rows)} of {page['total']}", err=True)


@devices_app.command("tag")
def tag_device(
    device_id: str,
    tags: Annotated[list[str], typer.Argument(help="The device's tags after this (replaces them)")],
    api: ApiOption,
    token: TokenOption,
) -> None:
    """Set a device's tags (operators)."""
    device = request(api, token, "PUT", f"/api/v1/devices/{device_id}/tags", body={"tags": tags})
    typer.echo(f"{device['id']}: {','.join(device['tags'])}")


# --- groups ----------------------------------------------------------------------------------


@groups_app.command("create")
def create_group(
    name: str,
    *,
    api: ApiOption,
    token: TokenOption,
    device: Annotated[list[str], typer.Option("--device", help="A static group: its members")] = [],  # noqa: B006 - typer reads list defaults, never mutates them
    all_tags: Annotated[
        list[str], typer.Option("--all-tags", help="Dynamic: devices with every one of these")
    ] = [],  # noqa: B006 - as above
    any_tags: Annotated[
        list[str], typer.Option("--any-tags", help="Dynamic: devices with one of these")
    ] = [],  # noqa: B006 - as above
    status: Annotated[list[str], typer.Option("--status", help="Dynamic: online, offline, unknown")] = [],  # noqa: B006 - as above
    version: Annotated[list[str], typer.Option("--version", help="Dynamic: bundle version ('none')")] = [],  # noqa: B006 - as above
    device_type: Annotated[list[str], typer.Option("--device-type", help="Dynamic: device types")] = [],  # noqa: B006 - as above
) -> None:
    """A static group (--device ...) or a dynamic one (a filter, evaluated whenever it is used)."""
    criteria = {
        "tags_all": all_tags,
        "tags_any": any_tags,
        "status": status,
        "bundle_versions": version,
        "device_types": device_type,
    }
    filter_ = {key: values for key, values in criteria.items() if values}
    if device and filter_:
        raise fail(ValueError("a group is static (--device) or dynamic (a filter), not both"))
    body: dict[str, Any] = {"name": name, "kind": "dynamic" if filter_ else "static"}
    if filter_:
        body["filter"] = filter_
    else:
        body["device_ids"] = device
    group = request(api, token, "POST", "/api/v1/groups", body=body)
    typer.echo(f"{group['id']}  {group['name']}  {group['kind']}  {group['size']} devices")


@groups_app.command("list")
def list_groups(api: ApiOption, token: TokenOption, as_json: JsonOption = False) -> None:
    """Groups and how many devices each holds now."""
    page = request(api, token, "GET", "/api/v1/groups", params={"limit": 500})
    if as_json:
        show_json(page)
        return
    table(
        [[g["id"], g["name"], g["kind"], str(g["size"])] for g in page["items"]],
        ["ID", "NAME", "KIND", "DEVICES"],
    )


# --- deployments -----------------------------------------------------------------------------


@deployments_app.command("create")
def create_deployment(
    bundle_id: str,
    *,
    api: ApiOption,
    token: TokenOption,
    device: Annotated[list[str], typer.Option("--device", help="Target these devices")] = [],  # noqa: B006 - typer reads list defaults, never mutates them
    tag: Annotated[list[str], typer.Option("--tag", help="Target devices with every one of these tags")] = [],  # noqa: B006 - as above
    group: Annotated[str | None, typer.Option("--group", help="Target a group's devices")] = None,
    phases: Annotated[
        str | None, typer.Option(help="A phased rollout: 1%,10%,100% or batch sizes 5,50,500")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Success %% a phase needs to pass")] = None,
    soak_s: Annotated[
        int | None, typer.Option("--soak-s", help="Healthy seconds before the next phase")
    ] = None,
    approval: Annotated[bool, typer.Option("--approval", help="Wait for approval between phases")] = False,
    rate: Annotated[str | None, typer.Option(help="Start at most DEVICES per SECONDS, e.g. 50/60s")] = None,
    window: Annotated[str | None, typer.Option(help="Maintenance window HH:MM-HH:MM (UTC)")] = None,
    abort_failures: Annotated[int | None, typer.Option(help="Abort after this many failures")] = None,
    abort_percent: Annotated[float | None, typer.Option(help="Abort past this failure %%")] = None,
    min_finished: Annotated[int | None, typer.Option(help="Finished devices before the %% counts")] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="On abort, revert the updated devices")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what each phase would touch")] = False,
    as_json: JsonOption = False,
) -> None:
    """Deploy a bundle: to every chosen device at once, or as a phased rollout (--phases)."""
    try:
        body = _deployment_body(
            bundle_id,
            _selector(device, tag, group),
            phases,
            {"success_threshold_percent": threshold, "soak_s": soak_s, "require_approval": approval},
            rate=rate,
            window=window,
            abort={
                "after_failures": abort_failures,
                "after_failure_percent": abort_percent,
                "min_finished": min_finished,
            },
            rollback=rollback,
            dry_run=dry_run,
        )
    except ValueError as exc:
        raise usage(exc) from None
    if dry_run:
        preview = request(api, token, "POST", "/api/v1/deployments/preview", body=body)
        if as_json:
            show_json(preview)
            return
        typer.echo(f"{preview['selected']} devices selected")
        for phase in preview["phases"]:
            typer.echo(
                f"phase {phase['index'] + 1}: {len(phase['devices'])} devices  {' '.join(phase['devices'])}"
            )
        return
    created = request(api, token, "POST", "/api/v1/deployments", body=body)
    if as_json:
        show_json(created)
        return
    typer.echo(created["id"])
    typer.echo(f"{created['total']} devices, {created['status']}", err=True)


@deployments_app.command("list")
def list_deployments(
    *,
    api: ApiOption,
    token: TokenOption,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: JsonOption = False,
) -> None:
    """Deployments, newest first, with their status and counts."""
    page = request(api, token, "GET", "/api/v1/deployments", params={"limit": limit})
    if as_json:
        show_json(page)
        return
    rows = [
        [
            d["id"],
            f"{d['bundle_name']} {d['bundle_version']}",
            d["status"],
            (d.get("rollout") or {}).get("state") or "",
            " ".join(f"{k}={v}" for k, v in sorted(d["counts"].items())),
        ]
        for d in page["items"]
    ]
    table(rows, ["ID", "BUNDLE", "STATUS", "ROLLOUT", "COUNTS"])


@deployments_app.command("show")
def show_deployment(
    deployment_id: str, api: ApiOption, token: TokenOption, as_json: JsonOption = False
) -> None:
    """A deployment's status and, for a rollout, each phase and why it stopped."""
    deployment = request(api, token, "GET", f"/api/v1/deployments/{deployment_id}")
    rollout = (
        request(api, token, "GET", f"/api/v1/deployments/{deployment_id}/rollout")
        if deployment.get("rollout")
        else None
    )
    if as_json:
        show_json({"deployment": deployment, "rollout": rollout})
        return
    bundle = f"{deployment['bundle_name']} {deployment['bundle_version']}"
    typer.echo(f"{deployment['id']}  {bundle}  {deployment['status']}")
    typer.echo("counts: " + " ".join(f"{k}={v}" for k, v in sorted(deployment["counts"].items())))
    if rollout is None:
        return
    stopped = f"  ({rollout['stop_reason']})" if rollout.get("stop_reason") else ""
    typer.echo(
        f"rollout: {rollout['state']}, phase {rollout['phase'] + 1} of {rollout['phases_total']}{stopped}"
    )
    table(
        [
            [
                str(p["index"] + 1),
                f"{p['percent']:g}%" if p["percent"] is not None else str(p["devices"]),
                p["state"],
                str(p["total"]),
                " ".join(f"{k}={v}" for k, v in sorted(p["counts"].items())),
            ]
            for p in rollout["phases"]
        ],
        ["PHASE", "SIZE", "STATE", "DEVICES", "COUNTS"],
    )


@deployments_app.command("approve")
def approve(deployment_id: str, api: ApiOption, token: TokenOption) -> None:
    """Let a rollout awaiting approval go on to its next phase."""
    rollout = request(api, token, "POST", f"/api/v1/deployments/{deployment_id}/approve")
    typer.echo(
        f"{deployment_id}: {rollout['state']}, phase {rollout['phase'] + 1} of {rollout['phases_total']}"
    )


@deployments_app.command("cancel")
def cancel(deployment_id: str, api: ApiOption, token: TokenOption) -> None:
    """Cancel a deployment (and stop its rollout): devices not started yet are not updated."""
    deployment = request(api, token, "POST", f"/api/v1/deployments/{deployment_id}/cancel")
    typer.echo(f"{deployment_id}: {deployment['status']}")


def register(app: typer.Typer) -> None:
    """Add the operator commands to the `kernex` app."""
    app.add_typer(devices_app, name="devices", help="List and tag devices (through the API).")
    app.add_typer(groups_app, name="groups", help="Static and dynamic device groups (through the API).")
    app.add_typer(
        deployments_app, name="deployments", help="Deploy bundles, run phased rollouts (through the API)."
    )
