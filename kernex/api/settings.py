"""Settings of the API process."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from kernex.broker.secrets import development_secret
from kernex.broker.settings import BrokerSettings
from kernex.storage.settings import BundleStoreSettings, StorageSettings

API_PORT = 8000  # the conventional local development port for HTTP APIs
DEVICE_CERT_VALIDITY_DAYS = 30  # short-lived: a lost device's certificate dies within a month
# Below this a device would spend its certificate's life renewing it (it retries every few seconds).
DEVICE_CERT_VALIDITY_MIN_S = 10
ENROLLMENT_TOKEN_TTL_DAYS = 7  # a token handed to an installer is used within the week or not at all
ACCESS_TOKEN_TTL_S = 3600  # an operator signs in about once an hour; a leaked token dies within it
# HS256 keys shorter than the hash output (32 bytes) weaken the MAC (RFC 7518 §3.2).
JWT_SECRET_MIN_CHARS = 32
# A secret drawn from fewer distinct characters than this is a pattern ("xxxx...", "abab..."), not a secret.
JWT_SECRET_MIN_DISTINCT_CHARS = 10
# Published example keys (FastAPI's OAuth2 tutorial, jwt.io's debugger): long enough, yet public.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "09d25e094faa6ca2556c818166b7a9563b93f7099f6f0f4caa6cf63b88e8d3e7",
        "your-256-bit-secret",
    }
)
# Placeholder words copied from templates and compose files: a secret containing one was never replaced.
PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "changethis", "replace-me", "example")
JWT_SECRET_NAME = "jwt-secret"  # noqa: S105 - the file name in the data dir, not a secret
WEBHOOK_KEY_NAME = "webhook-key"  # the file name in the data dir, not a secret
# A device offline for a week still finds its commands; older ones it must not act on any more.
COMMAND_TTL_S = 7 * 24 * 3600
DEPLOYMENT_TIMEOUT_S = 300  # an install that takes more than five minutes after pickup is stuck
# A rotated command key starts signing a day later: every device online meanwhile has pinned it
# from the key set, and one offline longer still obeys the old key, which stays trusted.
COMMAND_KEY_TRANSITION_S = 24 * 3600
REPUBLISH_INTERVAL_S = 5.0  # how soon a command recorded while the broker was down goes out
SWEEP_INTERVAL_S = 10.0  # timeouts and offline marks land within this of being due
ROLLOUT_INTERVAL_S = 5.0  # rollout phases start, and paced commands go out, within this of being due
MISSED_HEARTBEATS = 3  # one lost heartbeat is noise; three in a row is a device gone
DEFAULT_HEARTBEAT_INTERVAL_S = 60  # DESIGN.md: a heartbeat a minute unless configured otherwise


class AdmissionPolicy(StrEnum):
    """How a registering device is admitted (DESIGN.md "Admission policy")."""

    AUTO = "auto"  # every device with a valid CSR is admitted at once (quick start)
    TOKEN = "token"  # noqa: S105 - a policy name, not a secret: a valid enrollment token admits
    MANUAL = "manual"  # devices wait pending for an operator, unless their key was pre-authorized


class ApiSettings(StorageSettings, BundleStoreSettings, BrokerSettings):
    """Everything the API process reads from `KERNEX_*` environment variables."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=API_PORT, ge=1, le=65535)
    admission_policy: AdmissionPolicy = AdmissionPolicy.AUTO
    device_cert_validity_days: int = Field(default=DEVICE_CERT_VALIDITY_DAYS, ge=1, le=397)
    # When set, device certificates live this many seconds instead (tests, demonstrations of
    # renewal; a fleet renews every third of it).
    device_cert_validity_s: int | None = Field(default=None, ge=DEVICE_CERT_VALIDITY_MIN_S, le=397 * 86_400)
    # The directory of the Mosquitto config Kernex runs (`kernex up`, `kernex broker run`): its pid
    # file says which process to SIGHUP after a revocation. Unset: <data_dir>/broker.
    broker_dir: Path | None = None
    # Enrollment tokens created without an expiry expire after this many days.
    enrollment_token_default_ttl_days: int = Field(default=ENROLLMENT_TOKEN_TTL_DAYS, ge=1, le=3650)
    # Bodies above this are refused with 413 before they are read (bundle uploads have their own).
    max_body_bytes: int = 1024 * 1024
    # PEM files of ECDSA P-256 public keys whose offline release signatures (`kernex bundle sign`)
    # uploads may carry; devices are told to trust them (and the server's own release key).
    trusted_release_keys: list[Path] = Field(default_factory=list)
    # Signs operator access tokens (HS256). Generated into the data dir in development only.
    jwt_secret: SecretStr | None = None
    # Encrypts webhook secrets at rest (kernex.api.webhooks.signing); generated in development.
    webhook_secret_key: SecretStr | None = None
    # Webhook deliveries: attempts before a delivery is marked failed, and the backoff bounds.
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_initial_s: float = Field(default=5.0, gt=0)
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)
    access_token_ttl_s: int = Field(default=ACCESS_TOKEN_TTL_S, ge=60, le=24 * 3600)
    # Browser origins allowed to call the API (the dashboard when served from elsewhere); none by default.
    cors_origins: list[str] = Field(default_factory=list)
    # Requests per minute per client address, for every route except the health probes and /metrics.
    rate_limit_per_minute: int = Field(default=60, ge=1)
    # Device requests (fallback heartbeats and events, renewal, bundle downloads) count per device;
    # all of them from one address together stop at this many a minute (a fleet behind one NAT).
    device_rate_limit_per_address_per_minute: int = Field(default=6000, ge=1)
    # Login attempts per minute per client address and username (brute force); per address it is 4x this.
    login_rate_limit_per_minute: int = Field(default=5, ge=1)
    # Behind a reverse proxy: take the client address from the last X-Forwarded-For hop and the scheme
    # from X-Forwarded-Proto. Off by default: a direct client could otherwise pick its own address.
    trust_forwarded_for: bool = False
    # When set, GET /metrics requires `Authorization: Bearer <this>`; unset, /metrics is open and
    # should be reachable only from the monitoring network.
    metrics_token: SecretStr | None = None
    # Signed commands expire this long after they are issued; agents ignore expired commands.
    command_ttl_s: int = Field(default=COMMAND_TTL_S, ge=60, le=365 * 24 * 3600)
    # A deployment target not finished this long after the device took it up fails ("timeout");
    # a deployment may set its own.
    deployment_timeout_s: int = Field(default=DEPLOYMENT_TIMEOUT_S, ge=1, le=7 * 24 * 3600)
    # Commands recorded while the broker was unreachable are published at this pace (and at once on
    # reconnect).
    command_republish_interval_s: float = Field(default=REPUBLISH_INTERVAL_S, gt=0, le=3600)
    # A command key added by a rotation signs commands this long after it was added.
    command_key_transition_s: int = Field(default=COMMAND_KEY_TRANSITION_S, ge=0, le=30 * 24 * 3600)
    # How often deployment timeouts and device liveness are checked.
    sweep_interval_s: float = Field(default=SWEEP_INTERVAL_S, gt=0, le=3600)
    # How often the rollout engine steps each rollout (phase starts, paced commands, abort checks).
    rollout_interval_s: float = Field(default=ROLLOUT_INTERVAL_S, gt=0, le=3600)
    # An online device is marked offline after this many of its heartbeat intervals of silence.
    offline_after_missed_heartbeats: int = Field(default=MISSED_HEARTBEATS, ge=1, le=1000)
    # The heartbeat interval assumed for devices whose configuration sets none.
    default_heartbeat_interval_s: int = Field(default=DEFAULT_HEARTBEAT_INTERVAL_S, ge=1, le=86_400)
    # The HTTP fallback judges a device's clock like ingest does (KERNEX_MAX_FUTURE_SKEW_S and
    # KERNEX_MAX_AGE_S there): a message this far ahead, or older than this, is refused.
    fallback_max_future_skew_s: int = Field(default=300, ge=0)
    fallback_max_age_s: int = Field(default=86_400, ge=1)

    @property
    def advertised_mqtt_host(self) -> str:
        """The broker host devices are told to use."""
        return self.mqtt_public_host or self.mqtt_host

    @property
    def advertised_mqtt_port(self) -> int:
        """The broker port devices are told to use."""
        return self.mqtt_public_port or self.mqtt_port

    @property
    def device_cert_validity(self) -> timedelta:
        """How long a device certificate lives: the seconds setting if given, else the days."""
        if self.device_cert_validity_s is not None:
            return timedelta(seconds=self.device_cert_validity_s)
        return timedelta(days=self.device_cert_validity_days)

    @property
    def resolved_broker_dir(self) -> Path:
        """Where the Mosquitto Kernex runs keeps its config and pid file."""
        return self.broker_dir or self.data_dir / "broker"

    def resolved_jwt_secret(self) -> str:
        """The configured JWT secret, or in development one generated into the data dir."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        return development_secret(self.data_dir, JWT_SECRET_NAME)

    def resolved_webhook_secret_key(self) -> str:
        """The configured webhook encryption key, or in development one generated into the data dir."""
        if self.webhook_secret_key is not None:
            return self.webhook_secret_key.get_secret_value()
        return development_secret(self.data_dir, WEBHOOK_KEY_NAME)

    @model_validator(mode="after")
    def _require_jwt_secret_in_production(self) -> ApiSettings:
        if self.is_production:
            secret = self.jwt_secret.get_secret_value() if self.jwt_secret else ""
            if (
                len(secret) < JWT_SECRET_MIN_CHARS
                or len(set(secret)) < JWT_SECRET_MIN_DISTINCT_CHARS
                or secret.strip() in KNOWN_DEFAULT_SECRETS
                or any(word in secret.lower() for word in PLACEHOLDER_WORDS)
            ):
                raise ValueError(
                    f"KERNEX_JWT_SECRET must be set to a random value ({JWT_SECRET_MIN_CHARS}+ characters, "
                    "e.g. `openssl rand -base64 48`) when KERNEX_ENVIRONMENT=production"
                )
        return self
