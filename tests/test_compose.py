"""compose.yaml stays in step with the CLI and the settings (no Docker engine runs here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from kernex.api.settings import ApiSettings
from kernex.ingest.settings import IngestSettings
from tests.fixtures.platform import KERNEX

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_kernex_command_in_compose_exists() -> None:
    services = _compose()["services"]
    for name in ("broker", "ingest", "api"):
        command = services[name]["command"]
        result = subprocess.run([KERNEX, *command[:2], "--help"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            result = subprocess.run(
                [KERNEX, command[0], "--help"], capture_output=True, text=True, check=False
            )
        assert result.returncode == 0, f"{name}: `kernex {' '.join(command)}` is not a command"
        for option in (word for word in command if word.startswith("--")):
            assert option in result.stdout, f"{name}: {option} is not an option"


def test_every_kernex_variable_in_compose_is_a_setting() -> None:
    fields = set(ApiSettings.model_fields) | set(IngestSettings.model_fields)
    for name, service in _compose()["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("KERNEX_"):
                assert variable.removeprefix("KERNEX_").lower() in fields, (
                    f"{name}: {variable} is not a setting"
                )
