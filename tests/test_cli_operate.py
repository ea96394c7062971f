"""The operator CLI (`kernex devices|groups|deployments`) against `kernex up` with simulated
devices: tag, group, dry run, a phased rollout with approval to success, and one-line refusals."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from tests.fixtures.platform import KERNEX, Platform, run_platform, wait_for
from tests.test_e2e_deployments import upload_bundle

DEVICES = 3
SETTLE_S = 90  # three simulated agents installing on two loaded cores


def _kernex(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERNEX_API_URL": platform.api_url, "KERNEX_API_TOKEN": str(platform.token)}
    return subprocess.run([KERNEX, *args], env=env, capture_output=True, text=True, check=False, timeout=60)


async def _ok(platform: Platform, *args: str) -> str:
    done = await asyncio.to_thread(_kernex, platform, *args)
    assert done.returncode == 0, f"kernex {' '.join(args)}: {done.stderr}"
    return done.stdout


async def test_operator_cli_tags_groups_and_runs_a_rollout(sqlite_url: str, tmp_path: Path) -> None:
    async with run_platform(tmp_path, sqlite_url, devices=DEVICES) as platform:

        async def listed() -> list[list[str]] | None:
            rows = [
                line.split()
                for line in (await _ok(platform, "devices", "list", "--sort", "name")).splitlines()
            ]
            online = [r for r in rows[1:] if "online" in r]
            return rows[1:] if len(online) == DEVICES else None

        rows = await wait_for(listed, SETTLE_S, "three simulated devices online", log=platform)
        ids = [r[0] for r in rows]
        names = [r[1] for r in rows]
        assert names == sorted(names), "sorted by name through the API"

        assert (
            await _ok(platform, "devices", "tag", ids[0], "canary", "lab")
        ).strip() == f"{ids[0]}: canary,lab"
        group = (await _ok(platform, "groups", "create", "canaries", "--all-tags", "canary")).split()
        assert group[2:4] == ["dynamic", "1"], group
        assert "canaries" in await _ok(platform, "groups", "list")

        bundle_id = await asyncio.to_thread(upload_bundle, platform, tmp_path, "2.0.0")
        preview = await _ok(
            platform, "deployments", "create", bundle_id, "--group", group[0], "--phases", "100%", "--dry-run"
        )
        assert preview.splitlines() == ["1 devices selected", f"phase 1: 1 devices  {ids[0]}"]

        everyone = [arg for device_id in ids for arg in ("--device", device_id)]
        deployment_id = (
            await _ok(
                platform, "deployments", "create", bundle_id, *everyone, "--phases", "1,100%", "--approval"
            )
        ).strip()

        async def shown(state: str) -> str | None:
            text = await _ok(platform, "deployments", "show", deployment_id)
            return text if f"rollout: {state}" in text else None

        waiting = await wait_for(
            lambda: shown("awaiting_approval"), SETTLE_S, "the canary phase", log=platform
        )
        assert "phase 1 of 2" in waiting
        approved = await _ok(platform, "deployments", "approve", deployment_id)
        assert approved.startswith(f"{deployment_id}: running")
        done = await wait_for(lambda: shown("completed"), SETTLE_S, "the whole rollout", log=platform)
        assert f"counts: succeeded={DEVICES}" in done
        assert deployment_id in await _ok(platform, "deployments", "list")

        # Refusals: one line on stderr and a non-zero exit, from the API or the options.
        unknown = await asyncio.to_thread(
            _kernex, platform, "deployments", "create", "no-such-bundle", "--device", ids[0]
        )
        assert unknown.returncode == 1
        assert unknown.stderr.startswith("kernex: 404 not_found:"), unknown.stderr
        assert len(unknown.stderr.strip().splitlines()) == 1
        no_target = await asyncio.to_thread(
            _kernex, platform, "deployments", "create", bundle_id, "--phases", "10%"
        )
        assert no_target.returncode == 2
        assert (
            no_target.stderr == "kernex: choose the devices with exactly one of --device, --tag or --group\n"
        )
        bad_phase = await asyncio.to_thread(
            _kernex, platform, "deployments", "create", bundle_id, "--tag", "canary", "--phases", "ten%"
        )
        assert bad_phase.returncode == 2
        assert "a phase is a percentage" in bad_phase.stderr
        again = await asyncio.to_thread(
            _kernex, platform, "groups", "create", "canaries", "--all-tags", "lab"
        )
        assert again.returncode == 1
        assert again.stderr.startswith("kernex: 409"), again.stderr
