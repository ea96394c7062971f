"""Production refuses missing or weak secrets; development generates them into the data dir."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from kernex.api.settings import ApiSettings
from kernex.ingest.settings import IngestSettings

STRONG = "x" * 32


def test_production_refuses_missing_pki_passphrase(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="KERNEX_PKI_PASSPHRASE"):
        ApiSettings(environment="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="KERNEX_PKI_PASSPHRASE"):
        ApiSettings(environment="production", data_dir=tmp_path, pki_passphrase="short")
    assert ApiSettings(environment="production", data_dir=tmp_path, pki_passphrase=STRONG).is_production


def test_production_refuses_missing_or_guessable_share_group(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="KERNEX_SHARE_GROUP"):
        IngestSettings(environment="production", data_dir=tmp_path, pki_passphrase=STRONG)
    with pytest.raises(ValidationError, match="KERNEX_SHARE_GROUP"):
        IngestSettings(
            environment="production", data_dir=tmp_path, pki_passphrase=STRONG, share_group="kernex-ingest"
        )
    settings = IngestSettings(
        environment="production", data_dir=tmp_path, pki_passphrase=STRONG, share_group="g" * 24
    )
    assert settings.resolved_share_group() == "g" * 24


def test_development_generates_one_share_group_per_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEX_DATA_DIR", str(tmp_path))
    first = IngestSettings().resolved_share_group()
    second = IngestSettings(client_id="kernex-ingest-2").resolved_share_group()
    assert first == second, "workers on one data dir share one group"
    assert first.startswith("kernex-ingest-")
    assert len(first) > 30
    assert not any(c in first for c in "/+#")
    secret = tmp_path / "secrets" / "ingest-share-group"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    other = IngestSettings(data_dir=tmp_path / "other").resolved_share_group()
    assert other != first
