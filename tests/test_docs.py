"""The configuration reference lists every setting of every process."""

from __future__ import annotations

from pathlib import Path

from kernex.agent.settings import AgentSettings
from kernex.api.settings import ApiSettings
from kernex.ingest.settings import IngestSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    for cls in (ApiSettings, IngestSettings, AgentSettings):
        prefix = cls.model_config.get("env_prefix", "")
        for field in cls.model_fields:
            variable = f"`{prefix}{field.upper()}`"
            assert variable in text, f"{variable} is missing from docs/configuration.md"
