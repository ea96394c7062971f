"""Production refuses missing or weak secrets; development generates them into the data dir."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from kernex.api.settings import ApiSettings
from kernex.ingest.settings import IngestSettings

STRONG = "x" * 32
JWT_SECRET = "k3rn3x-t3st-jwt-s3cr3t-0123456789abcdef"  # random-looking: 32+ characters, many distinct


def test_production_refuses_missing_pki_passphrase(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="KERNEX_PKI_PASSPHRASE"):
        ApiSettings(environment="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="KERNEX_PKI_PASSPHRASE"):
        ApiSettings(
            environment="production", data_dir=tmp_path, pki_passphrase="short", jwt_secret=JWT_SECRET
        )
    assert ApiSettings(
        environment="production", data_dir=tmp_path, pki_passphrase=STRONG, jwt_secret=JWT_SECRET
    ).is_production


@pytest.mark.parametrize(
    "secret",
    [
        None,
        "short-but-random-Q7x",
        "x" * 64,  # long, but a pattern
        "09d25e094faa6ca2556c818166b7a9563b93f7099f6f0f4caa6cf63b88e8d3e7",  # FastAPI's tutorial key
        "please-changeme-before-going-live-0123456789",
    ],
)
def test_production_refuses_missing_weak_or_default_jwt_secret(tmp_path: Path, secret: str | None) -> None:
    with pytest.raises(ValidationError, match="KERNEX_JWT_SECRET"):
        ApiSettings(environment="production", data_dir=tmp_path, pki_passphrase=STRONG, jwt_secret=secret)
    assert not (tmp_path / "secrets").exists(), "production never generates a secret"


def test_production_uses_the_configured_jwt_secret_and_development_generates_one(tmp_path: Path) -> None:
    production = ApiSettings(
        environment="production", data_dir=tmp_path / "prod", pki_passphrase=STRONG, jwt_secret=JWT_SECRET
    )
    assert production.resolved_jwt_secret() == JWT_SECRET
    development = ApiSettings(data_dir=tmp_path / "dev")
    generated = development.resolved_jwt_secret()
    assert len(generated) >= 32
    assert ApiSettings(data_dir=tmp_path / "dev").resolved_jwt_secret() == generated, "kept across restarts"
    assert stat.S_IMODE((tmp_path / "dev" / "secrets" / "jwt-secret").stat().st_mode) == 0o600


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
