"""Settings of the ingest process: the database, the broker, and how messages are batched and judged."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from kernex.broker.secrets import development_secret
from kernex.broker.settings import BrokerSettings
from kernex.protocol.topics import INGEST_SHARE_GROUP
from kernex.storage.settings import StorageSettings

SHARE_GROUP_MIN_LEN = 24  # long enough that a device cannot guess it


class IngestSettings(StorageSettings, BrokerSettings):
    """One settings class for `kernex ingest` (environment prefix `KERNEX_`)."""

    # Fixed, not random: the broker keeps the persistent session (subscriptions and unacknowledged
    # messages) under this id, so a restarted worker resumes it. Run several workers with
    # different ids in the same share group.
    client_id: str = Field(default="kernex-ingest-1", min_length=1, max_length=128)
    # The MQTT 5 shared-subscription group: the broker spreads heartbeats and events among workers.
    # It is a secret: Mosquitto 2.0.11's ACL file does not check subscriptions, so a device that
    # knows the group's name can join it and make the broker drop the share it is handed (the
    # ACL blocks the delivery). Unset, development generates one into the data dir; production
    # requires KERNEX_SHARE_GROUP, the same value on every worker.
    share_group: SecretStr | None = None
    # How long the broker keeps the session, and queues messages for it, while the worker is down.
    session_expiry_s: int = Field(default=86_400, ge=0, le=2**32 - 1)
    # Messages committed in one transaction: large enough for COPY to pay off, small enough
    # that a failed batch is cheap to retry.
    batch_max: int = Field(default=500, ge=1, le=10_000)
    # How long the first message of a batch may wait for company: latency against throughput.
    batch_max_delay_ms: int = Field(default=50, ge=0, le=60_000)
    # A heartbeat is a few hundred bytes; anything near this is abuse, not telemetry.
    max_payload_bytes: int = Field(default=65_536, ge=256)
    # A device clock may run ahead this much before its messages are refused.
    max_future_skew_s: int = Field(default=300, ge=0)
    # Devices buffer heartbeats and events while offline and publish them on reconnect: those
    # are still accepted if no older than this (one day of outage by default).
    max_age_s: int = Field(default=86_400, ge=1)
    # How long a device's parsed public key is cached; admission states are read on every batch
    # (one query), so a revocation takes effect at once whatever this is.
    key_cache_ttl_s: float = Field(default=30.0, ge=0)
    # How often each worker looks for revocations to announce on the fleet topics (status
    # "revoked"): one indexed query that finds nothing almost always.
    revocation_poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    # Heartbeats older than this many days are removed (whole daily partitions on PostgreSQL,
    # kernex.storage.partitions); 0 keeps them forever. Devices' latest state is kept regardless.
    heartbeat_retention_days: int = Field(default=30, ge=0, le=36_500)
    # Prometheus /metrics; 0 disables the HTTP server.
    metrics_port: int = Field(default=9101, ge=0, le=65_535)
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _require_share_group_in_production(self) -> IngestSettings:
        if self.is_production:
            value = self.share_group.get_secret_value() if self.share_group else ""
            if len(value) < SHARE_GROUP_MIN_LEN or any(c in value for c in "/+#"):
                raise ValueError(
                    f"KERNEX_SHARE_GROUP must be set ({SHARE_GROUP_MIN_LEN}+ characters, no / + #) "
                    "when KERNEX_ENVIRONMENT=production"
                )
        return self

    def resolved_share_group(self) -> str:
        """The share group name: configured, or generated once into the data dir (development)."""
        if self.share_group is not None:
            return self.share_group.get_secret_value()
        # token_urlsafe never yields / + or #, so the name is a valid topic level.
        return f"{INGEST_SHARE_GROUP}-{development_secret(self.data_dir, 'ingest-share-group', nbytes=18)}"
