"""Running a bundle's install, health-check and rollback scripts.

Each script runs in its version directory with a clean environment, in its own session (so its
process group can be signalled as a whole), with stdin closed and stdout+stderr captured into a
bounded tail. On timeout the group gets SIGTERM, then SIGKILL after a grace period. When the
script exits, whatever it left running in its process group is killed: a script's work ends
when it exits, and a straggler holding the output pipe would otherwise hang the agent. Long-
running services belong to the init system (`systemctl restart ...`), which is not affected.

While a script runs, its pid and start time are kept in a file (`pid_file`): if the agent is
killed (kill -9, power cut of the agent's cgroup only), the script's session outlives it, and the
restarted agent stops that session (`stop_leftover_script`) before rolling the install back,
so an orphaned install script cannot go on changing a version that is being rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kernex.kit.logs import get_logger
from kernex.protocol.manifest import Script

OUTPUT_TAIL_BYTES = 64 * 1024  # the end of the output says why a script failed; reports stay small
READ_CHUNK_BYTES = 16 * 1024
TERMINATE_GRACE_S = 5.0  # time to clean up after SIGTERM before SIGKILL
SCRIPT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the system's tools only, never the agent's venv
LEFTOVER_POLL_S = 0.05  # how often a leftover script's exit is checked after SIGTERM
# proc(5): starttime is field 22; counted from field 3 (the first after the command name), index 19.
STAT_STARTTIME_INDEX = 19

log = get_logger(__name__)


class Phase(StrEnum):
    """Which of a bundle's scripts ran."""

    INSTALL = "install"
    HEALTH_CHECK = "health_check"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class ScriptResult:
    """How a script ended and the tail of what it printed."""

    phase: Phase
    version: str
    path: str
    exit_code: int | None  # None: it could not start, or was killed after its timeout
    timed_out: bool
    output: str
    output_truncated: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        """Exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for an error message."""
        if self.timed_out:
            return f"{self.phase} script {self.path!r} timed out"
        if self.exit_code is None:
            return f"{self.phase} script {self.path!r} could not start"
        if self.exit_code < 0:
            return f"{self.phase} script {self.path!r} was killed by signal {-self.exit_code}"
        return f"{self.phase} script {self.path!r} exited with status {self.exit_code}"


def script_environment(
    *,
    name: str,
    version: str,
    version_dir: Path,
    previous: str | None,
    previous_dir: Path | None,
    phase: Phase,
    deployment_id: str | None,
) -> dict[str, str]:
    """The whole environment of a script: nothing of the agent's leaks in (no secrets, no venv)."""
    env = {
        "PATH": SCRIPT_PATH,
        "LANG": "C.UTF-8",
        "KERNEX_BUNDLE_NAME": name,
        "KERNEX_BUNDLE_VERSION": version,
        "KERNEX_BUNDLE_DIR": str(version_dir),
        "KERNEX_PREVIOUS_VERSION": previous or "",
        "KERNEX_PREVIOUS_DIR": str(previous_dir) if previous_dir else "",
        "KERNEX_SCRIPT_PHASE": phase.value,
        "KERNEX_DEPLOYMENT_ID": deployment_id or "",
    }
    home = os.environ.get("HOME")
    if home:
        # The user the script runs as is the agent's: its home is no secret, and tools expect one.
        env["HOME"] = home
    return env


async def run_script(
    script: Script,
    *,
    phase: Phase,
    version: str,
    cwd: Path,
    env: Mapping[str, str],
    grace_s: float = TERMINATE_GRACE_S,
    pid_file: Path | None = None,
) -> ScriptResult:
    """Run one script to completion or timeout; never raises for the script's own failures."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    tail = _Tail(OUTPUT_TAIL_BYTES)
    try:
        process = await asyncio.create_subprocess_exec(
            str(cwd / script.path),
            *script.args,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return ScriptResult(
            phase=phase,
            version=version,
            path=script.path,
            exit_code=None,
            timed_out=False,
            output=f"cannot start {script.path}: {exc}",
            output_truncated=False,
            duration_s=loop.time() - started,
        )
    assert process.stdout is not None  # stdout=PIPE
    reader = asyncio.create_task(_collect(process.stdout, tail), name=f"script-output-{process.pid}")
    timed_out = False
    try:
        if pid_file is not None:
            await asyncio.to_thread(_record_pid, pid_file, process.pid)
        try:
            await asyncio.wait_for(process.wait(), timeout=script.timeout_s)
        except TimeoutError:
            timed_out = True
            log.warning("script timed out: terminating its process group", phase=phase, path=script.path)
            await _terminate(process, grace_s)
    finally:
        # On success, timeout or our own cancellation alike: nothing the script started survives it.
        _signal_group(process.pid, signal.SIGKILL)
        if process.returncode is None:
            await process.wait()
        await reader
        if pid_file is not None:
            await asyncio.to_thread(pid_file.unlink, missing_ok=True)
    output, truncated = tail.text()
    result = ScriptResult(
        phase=phase,
        version=version,
        path=script.path,
        exit_code=None if timed_out else process.returncode,
        timed_out=timed_out,
        output=output,
        output_truncated=truncated,
        duration_s=round(loop.time() - started, 3),
    )
    log.info("script finished", phase=phase, path=script.path, ok=result.ok, exit_code=result.exit_code)
    return result


async def _terminate(process: asyncio.subprocess.Process, grace_s: float) -> None:
    _signal_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout=grace_s)
    except TimeoutError:
        _signal_group(process.pid, signal.SIGKILL)


async def stop_leftover_script(pid_file: Path, grace_s: float = TERMINATE_GRACE_S) -> bool:
    """Stop the session of a script a killed agent left running; True if one was stopped.

    The pid file names the script's session leader and its start time: a pid reused since (a
    reboot, a long downtime) has another start time and is left alone.
    """
    try:
        pid_text, _, started_text = (await asyncio.to_thread(pid_file.read_text)).partition(" ")
        pid, started = int(pid_text), int(started_text)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        log.warning("unreadable script pid file; ignoring it", path=str(pid_file), error=str(exc))
        await asyncio.to_thread(pid_file.unlink, missing_ok=True)
        return False
    stopped = False
    if _start_ticks(pid) == started:
        log.warning("stopping a script the agent left running when it stopped", pid=pid)
        _signal_group(pid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace_s
        # Not our child (its parent died): no wait() or event exists for it, only /proc to poll.
        while _start_ticks(pid) == started and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - see above
            await asyncio.sleep(LEFTOVER_POLL_S)
        _signal_group(pid, signal.SIGKILL)
        stopped = True
    await asyncio.to_thread(pid_file.unlink, missing_ok=True)
    return stopped


def _record_pid(pid_file: Path, pid: int) -> None:
    pid_file.write_text(f"{pid} {_start_ticks(pid)}\n", encoding="ascii")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after the last ")".
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[STAT_STARTTIME_INDEX])
    except (IndexError, ValueError):
        return None


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    # start_new_session made the script a session and group leader: its pgid is its pid.
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(pgid, signum)


async def _collect(stream: asyncio.StreamReader, tail: _Tail) -> None:
    while chunk := await stream.read(READ_CHUNK_BYTES):
        tail.add(chunk)


class _Tail:
    """The last `limit` bytes of a stream, in bounded memory."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._buffer += chunk
        if len(self._buffer) > 2 * self._limit:  # trim in batches, not on every chunk
            del self._buffer[: -self._limit]

    def text(self) -> tuple[str, bool]:
        data = bytes(self._buffer[-self._limit :])
        truncated = self.total > len(data)
        text = data.decode("utf-8", "replace")
        if truncated:
            text = f"[... {self.total - len(data)} earlier bytes not kept ...]\n{text}"
        return text, truncated
