"""A device installs Kernex without the server extra: the agent never needs server packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.fixtures.platform import KERNEX

# The `server` extra in pyproject.toml; none of these may be needed on a device.
SERVER_ONLY = (
    "fastapi",
    "uvicorn",
    "sqlmodel",
    "sqlalchemy",
    "alembic",
    "asyncpg",
    "aiosqlite",
    "boto3",
    "prometheus_client",
    "multipart",
    "starlette",
)


def _without_server_packages(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    blocker = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {SERVER_ONLY!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", blocker + code, *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_agent_and_cli_import_without_server_packages() -> None:
    agent_modules = sorted(
        f"kernex.agent.{p.stem}"
        for p in (Path(__file__).resolve().parents[1] / "kernex" / "agent").glob("*.py")
    )
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in agent_modules)
    code += "from kernex.cli.main import app\nimport sys\n"
    code += "sys.argv = ['kernex', 'agent', 'run', '--help']\napp()\n"
    result = _without_server_packages(code)
    assert result.returncode == 0, result.stderr
    assert "--api" in result.stdout


def test_server_commands_say_how_to_install_the_server_extra() -> None:
    code = "from kernex.cli.main import app\nimport sys\nsys.argv = ['kernex', 'db', 'upgrade']\napp()\n"
    result = _without_server_packages(code)
    assert result.returncode == 1
    assert "pip install 'kernex[server]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    result = subprocess.run([KERNEX, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for command in ("up", "api", "ingest", "agent", "simulate", "pki", "broker", "db"):
        assert command in result.stdout
