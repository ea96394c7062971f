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
    for name in ("broker", "ingest-1", "ingest-2", "api"):
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


def test_every_long_running_service_has_a_health_check() -> None:
    services = _compose()["services"]
    one_shot = {"init", "minio-init"}
    for name, service in services.items():
        if name not in one_shot:
            assert "healthcheck" in service, f"{name} has no health check"
            assert service["healthcheck"]["test"][0] == "CMD", f"{name}: exec-form health check"


def test_dependencies_wait_on_conditions_their_services_can_meet() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name}: {dependency} has no health check"
            elif condition == "service_completed_successfully":
                assert dependency in {"init", "minio-init"}, f"{name}: {dependency} never completes"


def test_two_ingest_workers_share_the_subscription_with_their_own_sessions() -> None:
    services = _compose()["services"]
    workers = {n: s for n, s in services.items() if s.get("command") == ["ingest"]}
    assert len(workers) == 2
    client_ids = {s["environment"]["KERNEX_CLIENT_ID"] for s in workers.values()}
    assert len(client_ids) == 2, "each worker needs its own persistent session"
    for name, worker in workers.items():
        port = str(IngestSettings.model_fields["metrics_port"].default)
        assert worker["environment"]["KERNEX_METRICS_HOST"] == "0.0.0.0", name
        assert f":{port}/metrics" in " ".join(worker["healthcheck"]["test"]), name
        # One share group for all: none sets its own (the generated one, or KERNEX_SHARE_GROUP).
        assert "KERNEX_SHARE_GROUP" not in worker["environment"], name


def test_the_api_stores_bundles_in_the_bucket_minio_init_creates() -> None:
    services = _compose()["services"]
    api = services["api"]["environment"]
    settings = ApiSettings(
        **{k.removeprefix("KERNEX_").lower(): v for k, v in api.items() if k.startswith("KERNEX_")}
    )
    assert settings.bundle_store.value == "s3"
    assert settings.s3_endpoint_url == "http://minio:9000"
    init = " ".join(services["minio-init"]["entrypoint"])
    assert f"local/{settings.s3_bucket}" in init
    minio = services["minio"]["environment"]
    assert settings.s3_access_key is not None
    assert settings.s3_secret_key is not None
    assert settings.s3_access_key.get_secret_value() == minio["MINIO_ROOT_USER"]
    assert settings.s3_secret_key.get_secret_value() == minio["MINIO_ROOT_PASSWORD"]
    assert f"{minio['MINIO_ROOT_USER']} {minio['MINIO_ROOT_PASSWORD']}" in init
