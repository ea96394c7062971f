"""Installing bundles for real: scripts run as subprocesses, `current` switches, failures roll back,
downloads resume against a real HTTP server that cuts the connection part way.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kernex.agent.bundles import BundleInstaller, Outcome, Phase, Stage
from kernex.agent.bundles.verify import release_keys_from
from kernex.agent.identity import load_or_create
from kernex.agent.settings import AgentSettings
from kernex.protocol.keys import KeyType, public_key_to_pem
from kernex.protocol.messages import CommandKey, MqttEndpoint, RegistrationResponse
from tests.fixtures.bundles import RELEASE_KID, Lab, good_bundle, open_lab


@pytest.fixture
async def lab(tmp_path, monkeypatch) -> AsyncIterator[Lab]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with httpx.AsyncClient(timeout=30) as http:
        with open_lab(tmp_path, http) as lab:
            yield lab


async def _install_first(lab: Lab, version: str = "1.0.0") -> None:
    report = await lab.install(good_bundle(version))
    assert report.outcome is Outcome.SUCCEEDED, report.error


async def test_happy_path_switches_current_and_records_both_versions(lab):
    await _install_first(lab)

    report = await lab.install(good_bundle("1.1.0"))

    assert report.outcome is Outcome.SUCCEEDED, report.error
    assert (report.current_version, report.previous_version, report.error) == ("1.1.0", "1.0.0", None)
    assert str(lab.paths.current.readlink()) == "versions/1.1.0"
    assert (lab.paths.current / "app" / "app.conf").read_text() == "version=1.1.0\n"
    assert stat.S_IMODE((lab.paths.current / "install.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((lab.paths.current / "app" / "app.conf").stat().st_mode) == 0o644
    installed = json.loads(lab.paths.installed_file.read_text())
    assert installed["current"]["version"] == "1.1.0"
    assert installed["previous"]["version"] == "1.0.0"
    assert installed["pending"] is None
    assert lab.journal() == [
        "install 1.0.0 prev=",
        "health 1.0.0",
        "install 1.1.0 prev=1.0.0",
        "health 1.1.0",
    ]
    assert [s.phase for s in report.scripts] == [Phase.INSTALL, Phase.HEALTH_CHECK]
    assert "installing 1.1.0" in report.output
    stages = [e.stage for e in lab.events if e.deployment_id == report.deployment_id]
    assert stages == [
        Stage.DOWNLOADING,
        Stage.VERIFYING,
        Stage.INSTALLING,
        Stage.HEALTH_CHECKING,
        Stage.SUCCEEDED,
    ]
    assert sorted(p.name for p in lab.paths.staging.iterdir()) == [], "the download is gone once used"


async def test_scripts_get_a_clean_environment_and_their_version_dir(lab, monkeypatch):
    monkeypatch.setenv("KERNEX_AGENT_SECRET", "must-not-leak")
    install = 'env | sort > "$HOME/env.txt"\npwd > "$HOME/pwd.txt"'

    report = await lab.install(good_bundle("1.0.0", install=install))

    assert report.outcome is Outcome.SUCCEEDED, report.error
    env = dict(line.split("=", 1) for line in (lab.home / "env.txt").read_text().splitlines())
    version_dir = lab.paths.version_dir("1.0.0")
    assert env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["LANG"] == "C.UTF-8"
    assert env["KERNEX_BUNDLE_VERSION"] == "1.0.0"
    assert env["KERNEX_BUNDLE_DIR"] == str(version_dir)
    assert env["KERNEX_PREVIOUS_VERSION"] == ""
    assert env["KERNEX_DEPLOYMENT_ID"] == report.deployment_id
    assert "KERNEX_AGENT_SECRET" not in env
    assert "VIRTUAL_ENV" not in env
    assert (lab.home / "pwd.txt").read_text().strip() == str(version_dir)


async def test_failing_install_script_rolls_back_and_reports_the_output(lab):
    await _install_first(lab)
    install = 'echo "migrating database"\necho "disk full" >&2\nexit 3'

    report = await lab.install(good_bundle("1.1.0", install=install))

    assert report.outcome is Outcome.ROLLED_BACK
    assert report.error == "install script 'install.sh' exited with status 3"
    assert report.failed_stage is Stage.INSTALLING
    assert report.current_version == "1.0.0"
    assert str(lab.paths.current.readlink()) == "versions/1.0.0"
    assert "migrating database" in report.output
    assert "disk full" in report.output
    assert "rolling back 1.1.0" in report.output
    # The failed version's rollback script ran once `current` was back on the previous version.
    assert lab.journal()[-1] == "rollback 1.1.0 current=versions/1.0.0"
    assert not lab.paths.version_dir("1.1.0").exists(), "the failed version is removed"
    installed = await lab.installer.installed()
    assert installed.current is not None
    assert (installed.current.version, installed.pending) == ("1.0.0", None)
    assert lab.events[-1].stage is Stage.ROLLED_BACK
    assert lab.events[-1].detail["error"] == report.error


async def test_install_timeout_kills_the_process_group_and_rolls_back(lab):
    await _install_first(lab)
    # A background child too: the whole group must go, not only the script.
    install = 'sleep 60 &\necho $! > "$HOME/child.pid"\necho "started"\nsleep 60'

    started = asyncio.get_running_loop().time()
    report = await lab.install(good_bundle("1.1.0", install=install, install_timeout_s=1))

    assert asyncio.get_running_loop().time() - started < 10
    assert report.outcome is Outcome.ROLLED_BACK
    assert report.error is not None
    assert report.error.startswith("install script 'install.sh' timed out")
    install_result = report.scripts[0]
    assert (install_result.timed_out, install_result.exit_code) == (True, None)
    assert "started" in install_result.output
    child = int((lab.home / "child.pid").read_text())
    for _ in range(100):  # SIGKILL was sent; the kernel may take a moment to finish it off
        if _is_dead(child):
            break
        await asyncio.sleep(0.02)
    assert _is_dead(child), "the script's background child was killed with its group"
    assert str(lab.paths.current.readlink()) == "versions/1.0.0"
    assert lab.journal()[-1] == "rollback 1.1.0 current=versions/1.0.0"


def _is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it (killed either way)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] == "Z"


async def test_failing_health_check_switches_back_and_rolls_back(lab):
    await _install_first(lab)
    health = 'echo "health $KERNEX_BUNDLE_VERSION" >> "$HOME/journal"\necho "service not answering"\nexit 1'

    report = await lab.install(good_bundle("1.1.0", health=health))

    assert report.outcome is Outcome.ROLLED_BACK
    assert report.failed_stage is Stage.HEALTH_CHECKING
    assert report.error == "health_check script 'health.sh' exited with status 1"
    assert "service not answering" in report.output
    assert lab.journal()[-3:] == [
        "install 1.1.0 prev=1.0.0",
        "health 1.1.0",
        "rollback 1.1.0 current=versions/1.0.0",
    ]
    assert str(lab.paths.current.readlink()) == "versions/1.0.0"
    assert (report.current_version, report.previous_version) == ("1.0.0", None)


async def test_first_install_failing_leaves_no_current(lab):
    report = await lab.install(good_bundle("1.0.0", health="exit 2"))

    assert report.outcome is Outcome.FAILED
    assert report.current_version is None
    assert not lab.paths.current.exists()
    assert not lab.paths.current.is_symlink()
    assert lab.journal()[-1] == "rollback 1.0.0 current=none"


async def test_older_version_is_refused_unless_the_command_is_a_rollback(lab):
    await _install_first(lab, "1.0.0")
    await _install_first(lab, "1.1.0")

    refused = await lab.install(good_bundle("1.0.0"))

    assert refused.outcome is Outcome.FAILED
    assert refused.error == (
        "bundle refused: version 1.0.0 is older than the installed 1.1.0 and the command is not a rollback"
    )
    assert [e.stage for e in lab.events[-1:]] == [Stage.FAILED]
    assert not any(
        e.stage is Stage.DOWNLOADING for e in lab.events if e.deployment_id == refused.deployment_id
    )
    assert str(lab.paths.current.readlink()) == "versions/1.1.0"

    rolled = await lab.install(good_bundle("1.0.0"), rollback=True)

    assert rolled.outcome is Outcome.SUCCEEDED, rolled.error
    assert (rolled.current_version, rolled.previous_version) == ("1.0.0", "1.1.0")
    assert str(lab.paths.current.readlink()) == "versions/1.0.0"


async def test_same_version_again_is_a_no_op(lab):
    bundle = good_bundle("1.0.0")
    await lab.install(bundle)
    requests = len(lab.server.requests)

    report = await lab.install(bundle)

    assert report.outcome is Outcome.SUCCEEDED
    assert lab.events[-1].detail.get("already_installed") is True
    assert len(lab.server.requests) == requests, "nothing downloaded"
    assert lab.journal() == ["install 1.0.0 prev=", "health 1.0.0"]


async def test_only_current_and_previous_versions_are_kept(lab):
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        await _install_first(lab, version)

    assert sorted(p.name for p in lab.paths.versions.iterdir()) == ["1.1.0", "1.2.0"]


async def test_interrupted_download_resumes_with_one_range_request(lab):
    # Incompressible content so the archive is big enough to cut in the middle.
    bundle = good_bundle("1.0.0", extra_files={"app/blob.bin": os.urandom(512 * 1024)})
    half = len(bundle.archive) // 2

    report = await lab.install(bundle, cut_after=half)

    assert report.outcome is Outcome.SUCCEEDED, report.error
    downloads = lab.server.requests
    assert [(r.status, r.range) for r in downloads] == [(200, None), (206, f"bytes={half}-")]
    assert downloads[1].if_range == f'"{bundle.sha256}"'
    assert (lab.paths.current / "app" / "blob.bin").stat().st_size == 512 * 1024


async def test_download_survives_a_restart_from_the_part_file(lab):
    bundle = good_bundle("1.0.0", extra_files={"app/blob.bin": os.urandom(256 * 1024)})
    request = lab.publish(bundle, cut_after=100_000)
    # The first agent gives up after the cut (one attempt), keeping its part for later.
    impatient = lab.make_installer()
    lab.downloader._attempts_without_progress = 1
    first = await impatient.apply(request)
    assert first.outcome is Outcome.FAILED
    assert first.error is not None
    assert first.error.startswith("download failed after 1 attempts")
    assert lab.downloader.part_path(bundle.sha256).stat().st_size == 100_000

    report = await lab.make_installer().apply(request)

    assert report.outcome is Outcome.SUCCEEDED, report.error
    assert [r.range for r in lab.server.requests] == [None, "bytes=100000-"]


async def test_a_200_answer_to_a_range_request_starts_over(lab):
    bundle = good_bundle("1.0.0", extra_files={"app/blob.bin": os.urandom(256 * 1024)})

    report = await lab.install(bundle, cut_after=50_000, ignore_range=True)

    assert report.outcome is Outcome.SUCCEEDED, report.error
    assert [(r.status, r.range) for r in lab.server.requests] == [(200, None), (200, "bytes=50000-")]


async def test_server_errors_are_retried(lab):
    report = await lab.install(good_bundle("1.0.0"), unavailable_first=2)

    assert report.outcome is Outcome.SUCCEEDED, report.error
    assert [r.status for r in lab.server.requests] == [503, 503, 200]


async def test_a_refused_download_is_final(lab):
    request = lab.publish(good_bundle("1.0.0")).model_copy(update={"bundle_id": "no-such-bundle"})

    report = await lab.installer.apply(request)

    assert report.outcome is Outcome.FAILED
    assert report.error is not None
    assert report.error.startswith("download refused: HTTP 404")
    assert len(lab.server.requests) == 1


async def test_cancelled_install_is_rolled_back_by_recover(lab):
    await _install_first(lab)
    install = 'echo started > "$HOME/started"\nsleep 60'
    task = asyncio.create_task(lab.install(good_bundle("1.1.0", install=install)))
    while not (lab.home / "started").exists():
        await asyncio.sleep(0.02)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await lab.installer.installed()).pending is not None, "the agent stopped mid-install"

    report = await lab.make_installer().recover()

    assert report is not None
    assert report.outcome is Outcome.ROLLED_BACK
    assert report.error == "the agent stopped while installing version 1.1.0"
    assert lab.journal()[-1] == "rollback 1.1.0 current=versions/1.0.0"
    installed = await lab.installer.installed()
    assert installed.pending is None
    assert installed.current is not None
    assert installed.current.version == "1.0.0"
    assert not lab.paths.version_dir("1.1.0").exists()
    assert await lab.installer.recover() is None, "nothing left to recover"


async def test_for_agent_wires_settings_identity_and_pinned_release_keys(lab):
    registration = RegistrationResponse(
        device_id=lab.identity.device_id,
        status="active",
        certificate=None,
        ca_certificate="",
        mqtt=MqttEndpoint(host="127.0.0.1", port=8883, topic_prefix="kernex/test"),
        command_keys=[],
        release_keys=[
            CommandKey(
                kid=RELEASE_KID, alg="ES256", public_key_pem=public_key_to_pem(lab.release_key.public_key())
            )
        ],
    )
    settings = AgentSettings(api_url=lab.server.url, state_dir=lab.state_dir, device_type="rpi4")
    identity = load_or_create(lab.state_dir, KeyType.ECDSA_P256)
    installer = BundleInstaller.for_agent(settings, identity, registration, lab.http)

    report = await installer.apply(lab.publish(good_bundle("1.0.0")))

    assert report.outcome is Outcome.SUCCEEDED, report.error
    assert str((lab.state_dir / "bundles" / "current").readlink()) == "versions/1.0.0"


def test_an_unusable_pinned_release_key_is_skipped():
    keys = [CommandKey(kid="broken", alg="ES256", public_key_pem="not a key")]
    assert release_keys_from(keys) == {}
