"""The agent's installer killed with -9 in the middle of an install, in a process of its own.

A child Python process runs the real BundleInstaller against the lab's HTTP bundle server; the
test kills it (SIGKILL) while the bundle's install script runs, then starts the installer again
in the test process, as a restarted agent would. The device is never half-switched: `current`
still names the old version while the install is pending, and recover() rolls the pending
install back. The interrupted install script, orphaned by the kill, is stopped too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kernex.agent.bundles import Outcome
from kernex.protocol.keys import public_key_to_pem
from tests.fixtures.bundles import RELEASE_KID, Lab, good_bundle, open_lab
from tests.fixtures.ingest import wait_for

# The child: the same installer wiring as the lab's (tests/fixtures/bundles.py), fed by argv.
CHILD = """
import asyncio, json, sys
from pathlib import Path
import httpx
from kernex.agent.bundles import BundleInstaller, InstallRequest
from kernex.agent.bundles.download import Downloader
from kernex.agent.bundles.layout import BundlePaths
from kernex.agent.identity import load_or_create
from kernex.kit.backoff import Backoff
from kernex.protocol.keys import KeyType, load_public_key_pem

async def main(args):
    paths = BundlePaths.under(Path(args["state_dir"]))
    identity = load_or_create(Path(args["state_dir"]), KeyType.ECDSA_P256)
    async with httpx.AsyncClient(timeout=30) as http:
        downloader = Downloader(http, args["url"], identity, paths.staging, backoff=Backoff(0.01, 0.05))
        keys = {args["kid"]: load_public_key_pem(args["release_key"].encode())}
        async def progress(event):
            pass
        installer = BundleInstaller(paths, downloader, keys, progress=progress, device_type="rpi4",
                                    max_bundle_bytes=64 << 20, max_unpacked_bytes=1 << 30, script_grace_s=1.0)
        await installer.apply(InstallRequest.model_validate_json(args["request"]))

asyncio.run(main(json.loads(sys.argv[1])))
"""
# Records its pid (a session leader: its pgid too) and works on silently, as a real script may.
SLOW_INSTALL = 'echo $$ > "$HOME/install.pid"\necho started > "$HOME/started"\nsleep 120'
SETTLE_S = 60


@pytest.fixture
async def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with httpx.AsyncClient(timeout=30) as http:
        with open_lab(tmp_path, http) as opened:
            yield opened


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_agent_killed_during_install_is_never_half_switched_and_rolls_back(lab: Lab) -> None:
    first = await lab.install(good_bundle("1.0.0"))
    assert first.outcome is Outcome.SUCCEEDED, first.error
    request = lab.publish(good_bundle("1.1.0", install=SLOW_INSTALL))
    args = {
        "state_dir": str(lab.state_dir),
        "url": lab.server.url,
        "kid": RELEASE_KID,
        "release_key": public_key_to_pem(lab.release_key.public_key()),
        "request": request.model_dump_json(),
    }
    env = {**os.environ, "HOME": str(lab.home)}
    agent = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env)
    script_pid = 0
    try:

        async def script_started() -> bool:
            if agent.poll() is not None:
                raise AssertionError(
                    f"the agent exited with {agent.returncode} before the install script ran"
                )
            # The agent has recorded the script too (a kill in the instant between the script's
            # start and that record leaves an orphan nobody knows of: the window is microseconds).
            return all(p.exists() for p in (lab.home / "install.pid", lab.paths.script_pid_file))

        await wait_for(script_started, "the install script running", timeout=SETTLE_S)
        script_pid = int((lab.home / "install.pid").read_text())
        agent.send_signal(signal.SIGKILL)
        agent.wait()

        # Killed mid-install: the install is pending, and `current` was never switched.
        installed = await lab.installer.installed()
        assert installed.pending is not None
        assert installed.pending.version == "1.1.0"
        assert installed.current is not None
        assert installed.current.version == "1.0.0"
        assert lab.paths.current.readlink().as_posix() == "versions/1.0.0"

        # The agent starts again: recover() rolls back and stops the orphaned script.
        report = await lab.make_installer().recover()
        assert report is not None
        assert report.outcome is Outcome.ROLLED_BACK
        assert report.error == "the agent stopped while installing version 1.1.0"
        after = await lab.installer.installed()
        assert after.pending is None
        assert after.current is not None
        assert after.current.version == "1.0.0"
        assert lab.paths.current.readlink().as_posix() == "versions/1.0.0"
        assert not lab.paths.version_dir("1.1.0").exists()
        assert lab.journal()[-1] == "rollback 1.1.0 current=versions/1.0.0"

        async def script_gone() -> bool:
            return not alive(script_pid)

        await wait_for(script_gone, "the orphaned install script stopped", timeout=SETTLE_S)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if script_pid and alive(script_pid):
            os.killpg(script_pid, signal.SIGKILL)
