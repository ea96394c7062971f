"""`kernex agent install` / `uninstall`: a hardened systemd service for the agent.

The unit runs the agent as a dedicated system user with a read-only view of the system
(`ProtectSystem=strict`), no home directories, a private /tmp, no privilege escalation and no
capabilities; the only writable place is its state dir, /var/lib/kernex (`StateDirectory=`).
Bundles whose install scripts write elsewhere need those paths added (`--read-write-path`),
which keeps the widening explicit and visible in the unit rather than weakening the default.

Both operations are idempotent: a second install with the same options changes nothing, a
second uninstall finds nothing to remove. With `root` other than "/" (a scratch directory, for
tests and image builds) files are written under it and no user is created, no systemctl runs.
The device identity (the state dir) survives an uninstall unless `purge` is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath

from kernex.agent.exceptions import AgentError
from kernex.agent.settings import DEFAULT_CONFIG_FILE

UNIT_NAME = "kernex-agent.service"
UNIT_DIR = PurePosixPath("/etc/systemd/system")
SERVICE_USER = "kernex"
STATE_DIR_NAME = "kernex"  # StateDirectory=kernex: systemd creates /var/lib/kernex owned by the user
STATE_DIR = PurePosixPath("/var/lib") / STATE_DIR_NAME
CONFIG_FILE = PurePosixPath(str(DEFAULT_CONFIG_FILE))
RESTART_SEC = 10  # a crashed agent is back within seconds, without spinning on a persistent fault
STOP_TIMEOUT_S = 30  # the agent says "offline" and flushes its state on SIGTERM well within this
# Exit status 2 is invalid settings (see kernex.cli.agent): restarting cannot fix a bad config file.
EXIT_INVALID_SETTINGS = 2
SYSTEMCTL_TIMEOUT_S = 60
CONFIG_MODE = 0o640  # root-owned, readable by the agent's group: it may name a proxy with credentials
UNIT_MODE = 0o644


class InstallError(AgentError):
    """Installing or removing the service failed."""


class Change(StrEnum):
    """What an install or uninstall did to one path."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    KEPT = "kept"
    REMOVED = "removed"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One line of an install or uninstall report."""

    path: str
    change: Change
    note: str = ""


def unit_text(
    exec_start: list[str], *, user: str = SERVICE_USER, read_write_paths: tuple[str, ...] = ()
) -> str:
    """The unit file: sandboxed, restarted on failure, its state under /var/lib."""
    writable = " ".join([str(STATE_DIR), *read_write_paths])
    command = " ".join(_quote(part) for part in exec_start)
    return f"""\
# Written by `kernex agent install`; `kernex agent uninstall` removes it. See docs/agent.md.
[Unit]
Description=Kernex device agent
Wants=network-online.target
After=network-online.target time-sync.target

[Service]
Type=exec
User={user}
Group={user}
ExecStart={command}
Restart=on-failure
RestartSec={RESTART_SEC}
RestartPreventExitStatus={EXIT_INVALID_SETTINGS}
TimeoutStopSec={STOP_TIMEOUT_S}
StateDirectory={STATE_DIR_NAME}
StateDirectoryMode=0700
UMask=0077

# Sandbox: the agent writes only its state dir (plus any ReadWritePaths added for bundle installs).
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
PrivateDevices=true
ReadWritePaths={writable}
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictSUIDSGID=true
RestrictRealtime=true
RestrictNamespaces=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
LockPersonality=true
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
"""


def config_text(api_url: str) -> str:
    """A starting config file: the API URL and the state dir the unit provides; the rest commented."""
    return f"""\
# Kernex agent configuration (docs/agent.md lists every setting).
# KERNEX_AGENT_<SETTING> environment variables override these; `kernex agent check` validates them.
api_url = {json.dumps(api_url)}
state_dir = "{STATE_DIR}"
log_format = "json"

# key_type = "ecdsa-p256"          # ecdsa-p256, rsa-4096 or ed25519; only for a new device key
# heartbeat_interval_s = 60
# api_timeout_s = 30
# proxy = "http://proxy.example.com:3128"
# api_ca_file = "/etc/kernex/api-ca.pem"
# name = "pump-station-7"
# log_level = "INFO"
"""


def default_exec_start() -> list[str]:
    """The absolute command that runs this installation of Kernex."""
    interpreter = Path(sys.executable)
    script = interpreter.parent / "kernex"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(interpreter.absolute()), "-m", "kernex"]


def install(
    root: Path,
    *,
    api_url: str | None,
    exec_start: list[str],
    read_write_paths: tuple[str, ...] = (),
    start: bool = True,
) -> list[Outcome]:
    """Write the unit (and a config file when there is none); on the real root, also the user and systemd."""
    if not exec_start or not PurePosixPath(exec_start[0]).is_absolute():
        raise InstallError(f"ExecStart needs an absolute program path, got {exec_start!r}")
    for path in read_write_paths:
        if not PurePosixPath(path).is_absolute():
            raise InstallError(f"--read-write-path must be absolute, got {path!r}")
    real = _is_real_root(root)
    if real:
        _require_root_user("install")
    outcomes: list[Outcome] = [_ensure_user()] if real else []
    outcomes.append(_install_config(root, api_url, real=real))
    command = [*exec_start, "agent", "run", "--config", str(CONFIG_FILE)]
    unit = _under(root, UNIT_DIR / UNIT_NAME)
    try:
        unit.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create {unit.parent}: {exc.strerror or exc}") from None
    unit_outcome = _write_if_changed(unit, unit_text(command, read_write_paths=read_write_paths), UNIT_MODE)
    outcomes.append(unit_outcome)
    if real:
        _systemctl("daemon-reload")
        _systemctl("enable", UNIT_NAME)
        if start:
            # A changed unit takes effect only on restart; an unchanged one is just kept running.
            _systemctl("restart" if unit_outcome.change is Change.UPDATED else "start", UNIT_NAME)
    return outcomes


def _install_config(root: Path, api_url: str | None, *, real: bool) -> Outcome:
    config = _under(root, CONFIG_FILE)
    if config.exists():
        return Outcome(str(config), Change.KEPT, "an existing config file is never overwritten")
    if api_url is None:
        raise InstallError(f"no config file at {config} yet: pass --api URL to create one")
    try:
        config.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create {config.parent}: {exc.strerror or exc}") from None
    outcome = _write_if_changed(config, config_text(api_url), CONFIG_MODE)
    if real:
        shutil.chown(config, user="root", group=SERVICE_USER)
    return outcome


def uninstall(root: Path, *, purge: bool = False) -> list[Outcome]:
    """Stop, disable and remove the unit; with `purge`, also the config file and the state dir."""
    real = _is_real_root(root)
    if real:
        _require_root_user("uninstall")
    unit = _under(root, UNIT_DIR / UNIT_NAME)
    outcomes: list[Outcome] = []
    if real and unit.exists():
        _systemctl("disable", "--now", UNIT_NAME)
    outcomes.append(_remove(unit))
    if real:
        _systemctl("daemon-reload")
    config, state = _under(root, CONFIG_FILE), _under(root, STATE_DIR)
    if purge:
        outcomes.extend([_remove(config), _remove(state)])
    else:
        for path, what in ((config, "config"), (state, "device identity and state")):
            if path.exists():
                outcomes.append(Outcome(str(path), Change.KEPT, f"{what} kept; --purge removes it"))
    return outcomes


def _is_real_root(root: Path) -> bool:
    return root.resolve() == Path("/")


def _under(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


def _quote(part: str) -> str:
    # systemd splits ExecStart on whitespace and honours double quotes.
    if part and not any(c.isspace() or c in "\"'\\;$%" for c in part):
        return part
    escaped = part.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _write_if_changed(path: Path, text: str, mode: int) -> Outcome:
    data = text.encode("utf-8")
    try:
        if path.exists():
            if path.read_bytes() == data:
                return Outcome(str(path), Change.UNCHANGED)
            change = Change.UPDATED
        else:
            change = Change.CREATED
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}") from None
    return Outcome(str(path), change)


def _remove(path: Path) -> Outcome:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            return Outcome(str(path), Change.ABSENT)
    except OSError as exc:
        raise InstallError(f"cannot remove {path}: {exc.strerror or exc}") from None
    return Outcome(str(path), Change.REMOVED)


def _require_root_user(what: str) -> None:
    if os.geteuid() != 0:
        raise InstallError(f"{what} on this system needs root (sudo), or --root DIR for a scratch root")


def _ensure_user() -> Outcome:
    if _run(["getent", "passwd", SERVICE_USER], check=False).returncode == 0:
        return Outcome(f"user {SERVICE_USER}", Change.UNCHANGED)
    _run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            str(STATE_DIR),
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            SERVICE_USER,
        ]
    )
    return Outcome(f"user {SERVICE_USER}", Change.CREATED)


def _systemctl(*args: str) -> None:
    _run(["systemctl", *args])


def _run(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    program = shutil.which(command[0])
    if program is None:
        raise InstallError(f"{command[0]} is not installed: is this a systemd system?")
    try:
        result = subprocess.run(  # noqa: S603 - fixed programs, arguments from this module
            [program, *command[1:]], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise InstallError(f"{' '.join(command)} did not finish within {SYSTEMCTL_TIMEOUT_S} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise InstallError(f"{' '.join(command)} failed: {detail[-1] if detail else result.returncode}")
    return result
