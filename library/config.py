"""Every setting of the job, typed, documented and validated before any work.

Settings come from environment variables (names as in the contract, section 4),
and each can be overridden by a command-line flag of the same name in kebab case
(`API_MAX_WORKERS` -> `--api-max-workers`). A bad value raises `ConfigError`
naming the variable; secret values never appear in messages or in `redacted()`.

The root `Settings` (pydantic-settings) holds one group per stage: `source`,
`scoring`, `sink`, `thresholds`, `observability` and `worker`. A field has a
pythonic name and its environment variable as alias (`settings.scoring.timeout`
is `API_TIMEOUT`); `ENV_FIELDS` maps every variable to its place. Each stage is
given only its group. Variables keep their flat names: `FlatEnvironment` reads
each one and hands it to its group.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from library.errors import EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS, ConfigError

DEFAULT_ROW_BATCH_SIZE = 5000
DEFAULT_MAX_QUOTED_FIELD_CHARS = 8 * 1024 * 1024
MIN_MAX_QUOTED_FIELD_CHARS = 128 * 1024  # source.MAX_ROW_CHARS: below it the limit cannot apply
DEFAULT_API_BATCH_SIZE = 100
DEFAULT_API_MAX_WORKERS = 5
DEFAULT_DB_ROW_BATCH_SIZE = 1000
DEFAULT_API_TIMEOUT = 30.0
DEFAULT_API_MAX_RETRIES = 5
DEFAULT_MAX_INVALID_RATIO = 0.05
DEFAULT_MAX_FAILED_RATIO = 0.01
DEFAULT_API_RETRY_BACKOFF = 0.5
DEFAULT_API_RETRY_BACKOFF_MAX = 30.0
DEFAULT_DB_FLUSH_INTERVAL = 5.0
DEFAULT_DB_RETRY_TIMEOUT = 60.0
DEFAULT_API_WAIT_READY = 60.0
DEFAULT_FRAUD_THRESHOLD = 0.5
DEFAULT_API_DOWN_TIMEOUT = 120.0
DEFAULT_PROGRESS_INTERVAL = 10.0
DEFAULT_METRICS_JOB = "batch-pipeline"
DEFAULT_FAIL_ON_EMPTY_SOURCE = False

# Knobs that are not settings: fixed for every run, named here so each is found and
# explained in one place. Make one an environment variable only if users must tune it.
# S3 (library/source.py make_s3_client): botocore's "standard" retry mode, attempts in all
# (the first included) for throttling and transient errors, and seconds to connect.
DEFAULT_S3_MAX_ATTEMPTS = 5
DEFAULT_S3_CONNECT_TIMEOUT = 10.0
# The database retry policy (library/db.py with_retries): the first delay in seconds,
# doubled each attempt with full jitter, never above the maximum; DB_RETRY_TIMEOUT bounds
# the whole wait.
DEFAULT_DB_RETRY_FIRST_DELAY = 0.5
DEFAULT_DB_RETRY_MAX_DELAY = 10.0
# One GET of the model's health endpoint (library/score/client.py check_ready), the whole
# answer: a server that takes longer is not ready. API_WAIT_READY bounds the polling.
DEFAULT_HEALTH_TIMEOUT = 10.0
# Scored units waiting, in order, for the writer (library/flow.py): each scoring worker
# may run this many units ahead of the writer, and the queue holds at least the minimum.
# It bounds memory (units are held with their rows) while keeping every worker busy.
DEFAULT_WRITER_QUEUE_PER_WORKER = 4
DEFAULT_WRITER_QUEUE_MIN = 8


def default_embedded_db_dir() -> Path:
    """One per-user place, whatever folder a command runs from (the XDG data folder):
    `$XDG_DATA_HOME/batch-pipeline/postgres`, else `~/.local/share/batch-pipeline/postgres`."""
    data_home = os.environ.get("XDG_DATA_HOME")
    base = Path(data_home) if data_home and Path(data_home).is_absolute() else None
    return (base or Path.home() / ".local" / "share") / "batch-pipeline" / "postgres"


SECRET_FIELDS = frozenset({"SECRET", "DATABASE_URL", "ML_API_TOKEN"})
# Shorter secrets are not masked in log lines: masking "ab" everywhere would garble them.
MIN_SECRET_LENGTH = 3
POSTGRES_SCHEMES = ("postgresql", "postgres")
SQLALCHEMY_POSTGRES_SCHEME = "postgresql+psycopg"  # SQLAlchemy's spelling; libpq wants postgresql
ENCODE_SPECIAL_CHARACTERS = (
    "percent-encode special characters in the password (/ as %2F, @ as %40) and the user name"
)
DEFAULT_COMPLETED_WITH_ERRORS_EXIT_CODE = EXIT_COMPLETED_WITH_ERRORS  # the contract's 3

# Secrets the client libraries read from the environment themselves, not settings: libpq's
# PGPASSWORD (how docker-compose.yml passes the database password, raw) and boto3's
# AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (read while SECRET is unset).
CLIENT_SECRET_VARIABLES = ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# -- the groups: each stage is given only its own ------------------------------------


class SettingsGroup(BaseModel):
    """One stage's settings. Each field's alias is its environment variable (the
    contract's name), which is also how errors and `redacted()` name it."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class SourceSettings(SettingsGroup):
    """What to read and how: the source stage (library/source.py)."""

    uri: str | None = Field(
        None,
        alias="SOURCE_URI",
        description="What to read: s3://bucket/key, s3://bucket/prefix/, a local file or folder.",
    )
    key: str | None = Field(None, alias="KEY", description="S3 / MinIO access key id.")
    secret: SecretStr | None = Field(
        None, alias="SECRET", description="S3 / MinIO secret key (never printed)."
    )
    endpoint_url: str | None = Field(
        None,
        alias="ENDPOINT_URL",
        description="S3-compatible endpoint, e.g. http://minio:9000 (unset: AWS S3).",
    )
    row_batch_size: int = Field(
        DEFAULT_ROW_BATCH_SIZE,
        alias="ROW_BATCH_SIZE",
        ge=1,
        le=1_000_000,
        description="Rows read from the source per chunk.",
    )
    max_quoted_field_chars: int = Field(
        DEFAULT_MAX_QUOTED_FIELD_CHARS,
        alias="MAX_QUOTED_FIELD_CHARS",
        ge=MIN_MAX_QUOTED_FIELD_CHARS,
        le=1 << 40,
        description="A quoted field still open after this many characters fails its object as "
        "an unterminated quote, naming the line where it opened (at least 131072).",
    )
    fail_on_empty: bool = Field(
        DEFAULT_FAIL_ON_EMPTY_SOURCE,
        alias="FAIL_ON_EMPTY_SOURCE",
        description="When SOURCE_URI holds no object: true makes the run fail (exit 1), "
        "for a scheduled job whose input must be there; false only warns.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return checked_http_url(value)

    @field_validator("uri")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value.startswith("s3://"):
            bucket = value[5:].split("/", 1)[0]
            if not bucket:
                raise ValueError(
                    "an s3:// URI needs a bucket: s3://bucket/key or s3://bucket/prefix/"
                )
        elif "://" in value:
            raise ValueError("must be s3://bucket/... or a local path")
        return value

    @property
    def secret_value(self) -> str | None:
        return self.secret.get_secret_value() if self.secret else None


class ScoringSettings(SettingsGroup):
    """The model and how it is called: the scoring client (library/score/)."""

    url: str | None = Field(None, alias="ML_API_URL", description="Base URL of the prediction API.")
    protocol: Literal["native", "mlflow", "v2"] = Field(
        "native",
        alias="ML_API_PROTOCOL",
        description="native (POST /predict, the contract), mlflow (POST /invocations) "
        "or v2 (Open Inference Protocol: MLServer, KServe, Triton, Seldon).",
    )
    model_name: str | None = Field(
        None,
        alias="MODEL_NAME",
        description="Model name for the v2 protocol: POST /v2/models/{MODEL_NAME}/infer.",
    )
    model_version: str | None = Field(
        None,
        alias="MODEL_VERSION",
        description="Model version stored with predictions when the server does not report one "
        "(required for mlflow).",
    )
    token: SecretStr | None = Field(
        None,
        alias="ML_API_TOKEN",
        description="Bearer token sent to the model API (never printed).",
    )
    fraud_threshold: float = Field(
        DEFAULT_FRAUD_THRESHOLD,
        alias="FRAUD_THRESHOLD",
        ge=0,
        le=1,
        description="Score at or above which a transaction is fraud, when the server returns only scores.",
    )
    batch_size: int = Field(
        DEFAULT_API_BATCH_SIZE,
        alias="API_BATCH_SIZE",
        ge=1,
        le=100_000,
        description="Transactions per API request.",
    )
    max_workers: int = Field(
        DEFAULT_API_MAX_WORKERS,
        alias="API_MAX_WORKERS",
        ge=1,
        le=256,
        description="API requests in flight at once.",
    )
    timeout: float = Field(
        DEFAULT_API_TIMEOUT,
        alias="API_TIMEOUT",
        gt=0,
        le=3600,
        description="Seconds before one API request is abandoned.",
    )
    concurrency: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        alias="API_CONCURRENCY",
        description="adaptive: requests in flight follow the service's capacity, up to "
        "API_MAX_WORKERS; fixed: always API_MAX_WORKERS.",
    )
    rate_limit: float | None = Field(
        None,
        alias="API_RATE_LIMIT",
        gt=0,
        le=100_000,
        description="At most this many API requests per second (unset: no cap).",
    )
    down_timeout: float = Field(
        DEFAULT_API_DOWN_TIMEOUT,
        alias="API_DOWN_TIMEOUT",
        gt=0,
        le=86_400,
        description="Seconds of every request failing after which the run stops as failed (exit 1).",
    )
    wait_ready: float = Field(
        DEFAULT_API_WAIT_READY,
        alias="API_WAIT_READY",
        ge=0,
        le=3600,
        description="Seconds to wait at start for a model server that is not ready yet "
        "(still starting: connection refused, 503) before the run fails; 0: one check, no wait.",
    )
    max_retries: int = Field(
        DEFAULT_API_MAX_RETRIES,
        alias="API_MAX_RETRIES",
        ge=0,
        le=100,
        description="Attempts after the first, for transient API failures.",
    )
    retry_backoff: float = Field(
        DEFAULT_API_RETRY_BACKOFF,
        alias="API_RETRY_BACKOFF",
        ge=0,
        le=600,
        description="First retry delay in seconds; doubles each attempt, with full jitter.",
    )
    retry_backoff_max: float = Field(
        DEFAULT_API_RETRY_BACKOFF_MAX,
        alias="API_RETRY_BACKOFF_MAX",
        ge=0,
        le=3600,
        description="Longest wait between two attempts, Retry-After included.",
    )

    @field_validator("protocol", "concurrency", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return checked_http_url(value)

    @model_validator(mode="after")
    def _consistent(self) -> ScoringSettings:
        if self.retry_backoff_max < self.retry_backoff:
            raise ValueError("API_RETRY_BACKOFF_MAX must be >= API_RETRY_BACKOFF")
        if self.protocol == "mlflow" and not self.model_version:
            raise ValueError(
                "MODEL_VERSION is required with ML_API_PROTOCOL=mlflow: "
                "MLflow's answers carry no model version"
            )
        if self.protocol == "v2" and not self.model_name:
            raise ValueError("MODEL_NAME is required with ML_API_PROTOCOL=v2")
        return self

    @property
    def token_value(self) -> str | None:
        return self.token.get_secret_value() if self.token else None

    @property
    def writer_queue_size(self) -> int:
        """Scored units waiting for the writer, in order: enough for every worker to
        run ahead a few units, never fewer than DEFAULT_WRITER_QUEUE_MIN."""
        return max(DEFAULT_WRITER_QUEUE_MIN, DEFAULT_WRITER_QUEUE_PER_WORKER * self.max_workers)


class SinkSettings(SettingsGroup):
    """Where and how rows are written: the sink and the ledger (library/sink.py, db.py)."""

    url: SecretStr | None = Field(
        None,
        alias="DATABASE_URL",
        description="PostgreSQL URL. Unset: an embedded local PostgreSQL is started (EMBEDDED_DB_DIR).",
    )
    row_batch_size: int = Field(
        DEFAULT_DB_ROW_BATCH_SIZE,
        alias="DB_ROW_BATCH_SIZE",
        ge=1,
        le=1_000_000,
        description="Rows accumulated per database flush (one transaction each).",
    )
    flush_interval: float = Field(
        DEFAULT_DB_FLUSH_INTERVAL,
        alias="DB_FLUSH_INTERVAL",
        gt=0,
        le=3600,
        description="Seconds after which scored rows are flushed even if DB_ROW_BATCH_SIZE is not reached.",
    )
    retry_timeout: float = Field(
        DEFAULT_DB_RETRY_TIMEOUT,
        alias="DB_RETRY_TIMEOUT",
        ge=0,
        le=86_400,
        description="Seconds a lost database (restart, failover, dropped connection) is waited "
        "for, with backoff, before the run stops as failed.",
    )
    embedded_dir: Path = Field(
        default_factory=default_embedded_db_dir,
        alias="EMBEDDED_DB_DIR",
        description="Folder of the embedded PostgreSQL used when DATABASE_URL is unset "
        "(default: $XDG_DATA_HOME/batch-pipeline/postgres, else "
        "~/.local/share/batch-pipeline/postgres).",
    )

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        """Refused here if libpq would misread it: a raw / or @ in the password makes
        libpq take pieces of the password for the host, port or database, and its
        error messages would then print them."""
        if value is None:
            return None
        url = as_libpq_url(value.get_secret_value())
        scheme, sep, _ = url.partition("://")
        if scheme not in POSTGRES_SCHEMES or not sep:  # libpq knows these two, in lower case
            raise ValueError("must be a postgresql:// URL")
        problem = libpq_url_problem(url)
        if problem:
            raise ValueError(problem)
        return SecretStr(url)

    @property
    def database_url(self) -> str | None:
        return self.url.get_secret_value() if self.url else None


class ThresholdSettings(SettingsGroup):
    """When a run stops, and how its outcome is reported: the flow and the run."""

    max_invalid_ratio: float = Field(
        DEFAULT_MAX_INVALID_RATIO,
        alias="MAX_INVALID_RATIO",
        ge=0,
        le=1,
        description="Invalid rows / rows read above which the run stops as failed.",
    )
    max_failed_ratio: float = Field(
        DEFAULT_MAX_FAILED_RATIO,
        alias="MAX_FAILED_RATIO",
        ge=0,
        le=1,
        description="Failed / valid transactions above which the run stops as failed.",
    )
    completed_with_errors_exit_code: int = Field(
        DEFAULT_COMPLETED_WITH_ERRORS_EXIT_CODE,
        alias="COMPLETED_WITH_ERRORS_EXIT_CODE",
        description="Exit code of a run that ends completed_with_errors: 3 (the contract) or 0, "
        "for schedulers that count every non-zero exit as a failed attempt (Kubernetes Jobs); "
        "the status, the metrics and the alerts still say completed_with_errors.",
    )

    @field_validator("completed_with_errors_exit_code")
    @classmethod
    def _zero_or_three(cls, value: int) -> int:
        # Any other code would collide with another outcome (1 failed, 2 usage, 4 threshold).
        if value not in (EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS):
            raise ValueError("must be 0 or 3")
        return value


class ObservabilitySettings(SettingsGroup):
    """Logs, progress and metrics (library/logs.py, progress.py, metrics.py)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", alias="LOG_LEVEL", description="Log verbosity."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        alias="LOG_FORMAT",
        description="text (the seed's format) or json (one object per line).",
    )
    progress: Literal["auto", "bar", "log", "off"] = Field(
        "auto",
        alias="PROGRESS",
        description="auto: a live bar on a terminal, a log line every PROGRESS_INTERVAL otherwise.",
    )
    progress_interval: float = Field(
        DEFAULT_PROGRESS_INTERVAL,
        alias="PROGRESS_INTERVAL",
        gt=0,
        le=3600,
        description="Seconds between progress log lines and metric pushes.",
    )
    pushgateway_url: str | None = Field(
        None,
        alias="PUSHGATEWAY_URL",
        description="Prometheus Pushgateway to push the job's metrics to (unset: no push).",
    )
    metrics_textfile: Path | None = Field(
        None,
        alias="METRICS_TEXTFILE",
        description="Also write the metrics to this file, for node_exporter's textfile collector.",
    )
    metrics_job: str = Field(
        DEFAULT_METRICS_JOB,
        alias="METRICS_JOB",
        min_length=1,
        description="The job label of the pushed metrics.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", "progress", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("pushgateway_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return checked_http_url(value)


class WorkerSettings(SettingsGroup):
    """This process's place in a run group (scale-out: library/group.py)."""

    run_group: str | None = Field(
        None,
        alias="RUN_GROUP",
        min_length=1,
        max_length=200,
        description="Workers started with the same RUN_GROUP share one listing of the source and "
        "its objects (scale-out; on Kubernetes, the Job's controller-uid). Unset: a group of one.",
    )
    index: int | None = Field(
        None,
        alias="JOB_COMPLETION_INDEX",
        ge=0,
        le=100_000,
        description="This worker's index in its run group (set by a Kubernetes Indexed Job): "
        "where it starts in the listing, and its label in the metrics.",
    )


def checked_http_url(value: str | None) -> str | None:
    """An http(s) URL with a host and a valid port, without its trailing slash."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    return value.rstrip("/")


GROUPS: dict[str, type[SettingsGroup]] = {
    "source": SourceSettings,
    "scoring": ScoringSettings,
    "sink": SinkSettings,
    "thresholds": ThresholdSettings,
    "observability": ObservabilitySettings,
    "worker": WorkerSettings,
}


@dataclass(frozen=True)
class EnvField:
    """Where one environment variable lives in the settings: `settings.<group>.<attribute>`."""

    name: str  # the environment variable, e.g. API_TIMEOUT
    group: str  # e.g. scoring
    attribute: str  # e.g. timeout
    info: FieldInfo

    @property
    def path(self) -> str:
        return f"{self.group}.{self.attribute}"


# Every environment variable the job reads, by name, in the groups' order.
ENV_FIELDS: dict[str, EnvField] = {
    str(info.alias): EnvField(str(info.alias), group, attribute, info)
    for group, model in GROUPS.items()
    for attribute, info in model.model_fields.items()
}
ENV_NAMES: tuple[str, ...] = tuple(ENV_FIELDS)
# URLs whose credentials are redacted where they are shown.
URL_FIELDS = ("ML_API_URL", "ENDPOINT_URL", "PUSHGATEWAY_URL")


def grouped(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"API_TIMEOUT": "3"}` -> `{"scoring": {"API_TIMEOUT": "3"}}`; other keys stay put."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        field = ENV_FIELDS.get(name)
        if field is None:
            out[name] = value
        else:
            out.setdefault(field.group, {})[name] = value
    return out


def environment_values(environ: Mapping[str, str]) -> dict[str, str]:
    """Our variables that are set (an empty one counts as unset), by name."""
    return {name: environ[name] for name in ENV_NAMES if environ.get(name)}


class FlatEnvironment(PydanticBaseSettingsSource):
    """pydantic-settings' source for our flat variable names: each setting is read from
    its own variable (`API_TIMEOUT`, as the contract names it) and handed to its group.
    pydantic-settings' own nested form (`SCORING__TIMEOUT`) is not what users set."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every variable at once

    def __call__(self) -> dict[str, Any]:
        return grouped(environment_values(self.environ))


class Settings(BaseSettings):
    """The job's configuration: one group per stage. `Settings()` reads the process
    environment; `load_settings` also takes CLI flags and names bad variables."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    source: SourceSettings = Field(default_factory=lambda: SourceSettings.model_validate({}))
    scoring: ScoringSettings = Field(default_factory=lambda: ScoringSettings.model_validate({}))
    sink: SinkSettings = Field(default_factory=lambda: SinkSettings.model_validate({}))
    thresholds: ThresholdSettings = Field(
        default_factory=lambda: ThresholdSettings.model_validate({})
    )
    observability: ObservabilitySettings = Field(
        default_factory=lambda: ObservabilitySettings.model_validate({})
    )
    worker: WorkerSettings = Field(default_factory=lambda: WorkerSettings.model_validate({}))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments first, then the environment by the contract's names; no .env
        # file and no secrets folder (docker-compose and Kubernetes pass the variables).
        return init_settings, FlatEnvironment(settings_cls, os.environ)

    @model_validator(mode="before")
    @classmethod
    def _group_flat_names(cls, data: Any) -> Any:
        """Flat names (`Settings(API_TIMEOUT=3)`, the environment) go to their group;
        a flat name wins over the same setting nested in its group."""
        if not isinstance(data, dict) or not any(name in ENV_FIELDS for name in data):
            return data
        out = {k: v for k, v in data.items() if k not in ENV_FIELDS}
        for group, values in grouped({k: v for k, v in data.items() if k in ENV_FIELDS}).items():
            given = out.get(group, {})
            if isinstance(given, BaseModel):
                given = given.model_dump(by_alias=True, exclude_unset=True)
            out[group] = {**given, **values}
        return out

    # -- helpers ---------------------------------------------------------------

    def __repr_args__(self) -> Any:
        # repr() and str() go through redacted(): a token in a URL must not leak either.
        return list(self.redacted().items())

    def value(self, name: str) -> Any:
        """The value of the setting named by its environment variable, e.g. "API_TIMEOUT"."""
        field = ENV_FIELDS[name]
        return getattr(getattr(self, field.group), field.attribute)

    def values(self) -> dict[str, Any]:
        """Every setting by environment variable, secrets included (SecretStr): what
        `updated` starts from."""
        return {name: self.value(name) for name in ENV_NAMES}

    def updated(self, changes: Mapping[str, Any]) -> Settings:
        """A copy with some settings (by environment variable) changed, validated again."""
        return load_settings(dict(changes), environ={}, base=self.values())

    @property
    def database_url(self) -> str | None:
        return self.sink.database_url

    def redacted(self) -> dict[str, Any]:
        """The settings by environment variable as a dict safe to log or store: secrets replaced."""
        out: dict[str, Any] = {}
        for name in ENV_NAMES:
            value = self.value(name)
            if name == "DATABASE_URL" and value is not None:
                value = redact_url(value.get_secret_value())
            elif name in URL_FIELDS and value is not None:
                value = redact_url(value)
            elif isinstance(value, SecretStr):
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out

    def secret_values(self) -> list[str]:
        """Every secret string this configuration holds, for log redaction."""
        secrets: list[str] = []
        for value in (self.source.secret_value, self.scoring.token_value):
            if value:
                secrets.append(value)
        urls = (
            self.database_url,
            self.scoring.url,
            self.source.endpoint_url,
            self.observability.pushgateway_url,
        )
        for url in urls:
            if url:
                secrets.extend(url_secrets(url))
        return [s for s in secrets if len(s) >= MIN_SECRET_LENGTH]


# -- misspelt variables -----------------------------------------------------------------

# A variable is compared with ours only if its first word is the first word of one of ours
# (API_, DB_, ML_, LOG_, ...): AWS_*, PG*, PATH and the like are never flagged.
NAME_PREFIXES = frozenset(name.split("_", 1)[0] for name in ENV_NAMES)
# How alike (difflib's ratio) a name must be to one of ours to be taken for a misspelling.
MISSPELLING_CUTOFF = 0.8
# Variables Kubernetes (and docker links) set for a Service: `ML_API_PORT`,
# `PUSHGATEWAY_SERVICE_HOST`, `PUSHGATEWAY_PORT_9091_TCP_ADDR`. Not typos of ours.
SERVICE_LINK_VARIABLE = re.compile(
    r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)$"
)


def misspelt_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(variable set, the one of ours it likely meant), for each variable that looks like
    one of ours but is not: `API_MAX_WORKER` -> `API_MAX_WORKERS`. Its value is ignored,
    so the user is warned at start rather than left wondering why the default applied."""
    env = os.environ if environ is None else environ
    found: list[tuple[str, str]] = []
    for name in sorted(env):
        if name in ENV_FIELDS or name.split("_", 1)[0] not in NAME_PREFIXES:
            continue
        if SERVICE_LINK_VARIABLE.search(name):
            continue
        match = difflib.get_close_matches(name, ENV_NAMES, n=1, cutoff=MISSPELLING_CUTOFF)
        if match:
            found.append((name, match[0]))
    return found


def client_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of CLIENT_SECRET_VARIABLES, for log redaction."""
    env = os.environ if environ is None else environ
    values = (env.get(name) for name in CLIENT_SECRET_VARIABLES)
    return [v for v in values if v and len(v) >= 3]


def redact_url(url: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://user:***@host/...`.

    A postgresql:// URL is read as libpq reads it, not as urllib does: libpq takes
    a raw `#` or `?` in the password as part of it, where urllib would see a
    fragment or a query and leave the password in the text.
    """
    if is_postgres_url(url):
        return redact_postgres_url(url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rsplit("@", 1)[-1]
        netloc = f"{parts.username or ''}:***@{host}"
    query = parts.query
    if "password=" in query:
        query = "&".join(
            "password=***" if kv.startswith("password=") else kv for kv in query.split("&")
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The password (and query-string password) a URL carries, if any, in every
    form it may be printed in: as written, percent-decoded and percent-encoded."""
    if is_postgres_url(url):
        found = postgres_url_passwords(url)
    else:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        for kv in parts.query.split("&"):
            if kv.startswith("password=") and len(kv) > len("password="):
                found.append(kv[len("password=") :])
    forms: set[str] = set()
    for secret in found:
        decoded = unquote(secret)
        forms.update(
            {secret, decoded, quote(decoded, safe=""), quote(decoded), quote_plus(decoded)}
        )
    return sorted(s for s in forms if s)


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every secret (longest first) replaced by ***."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, "***")
    return text


# -- postgresql:// URLs, as libpq reads them ------------------------------------------


def is_postgres_url(url: str) -> bool:
    scheme = url.partition("://")[0].lower()
    return scheme in POSTGRES_SCHEMES or scheme == SQLALCHEMY_POSTGRES_SCHEME


def as_libpq_url(url: str) -> str:
    """SQLAlchemy's `postgresql+psycopg://` spelled as libpq knows it."""
    scheme, _, rest = url.partition("://")
    return "postgresql://" + rest if scheme.lower() == SQLALCHEMY_POSTGRES_SCHEME else url


def split_libpq_url(url: str) -> tuple[str, str | None, str]:
    """(scheme, credentials, rest) as libpq cuts a URL: the credentials
    (`user[:password]`) run from `://` to the first `@`, unless a `/` comes first,
    in which case there are none and the whole rest is host, port and database."""
    scheme, _, rest = url.partition("://")
    for i, char in enumerate(rest):
        if char == "@":
            return scheme, rest[:i], rest[i + 1 :]
        if char == "/":
            break
    return scheme, None, rest


def credentials_misread(rest: str) -> bool:
    """An `@` in what libpq reads as host, port or database (before any query
    `key=`): a raw `@` or `/` in the user name or password moved it there."""
    query = rest.find("?")
    end = len(rest) if query < 0 else rest.find("=", query)
    return "@" in rest[: end if end >= 0 else len(rest)]


def libpq_url_problem(url: str) -> str | None:
    """Why libpq would refuse or misread this URL, without quoting any of it; None if fine."""
    _, _, rest = split_libpq_url(url)
    if credentials_misread(rest):
        return ENCODE_SPECIAL_CHARACTERS
    try:
        conninfo_to_dict(as_libpq_url(url))
    except Exception as exc:
        # libpq quotes the offending piece, which may be the password: drop the quotes' content.
        reason = re.sub(r'"[^"]*"', '"..."', str(exc).strip().splitlines()[0])
        return (
            f"libpq cannot read it ({reason}): percent-encode special characters "
            "in the password (% as %25, a space as %20, / as %2F, @ as %40)"
        )
    return None


def postgres_url_passwords(url: str) -> list[str]:
    """The password as libpq decodes it, and as written (in the credentials or in a
    `password=` query parameter). For a URL libpq would misread, everything between
    `://` and the last `@` counts as secret."""
    found: list[str] = []
    try:
        password = conninfo_to_dict(as_libpq_url(url)).get("password")
    except Exception:
        password = None
    if password:
        found.append(str(password))
    _, credentials, rest = split_libpq_url(url)
    if credentials and ":" in credentials:
        found.append(credentials.split(":", 1)[1])
    query = rest.partition("?")[2]
    for kv in query.split("&"):
        if kv.startswith("password=") and len(kv) > len("password="):
            found.append(kv[len("password=") :])
    if libpq_url_problem(url):
        userinfo = url.partition("://")[2].rpartition("@")[0]
        found.extend([userinfo, userinfo.partition(":")[2]])
    return [s for s in found if s]


def redact_postgres_url(url: str) -> str:
    """The URL as written with the password (credentials or query) replaced by ***;
    for a URL libpq would misread, only the scheme and what follows the last `@`."""
    scheme, credentials, rest = split_libpq_url(url)
    if libpq_url_problem(url) is None:
        if credentials and ":" in credentials:
            credentials = credentials.split(":", 1)[0] + ":***"
        location, mark, query = rest.partition("?")
        if query:
            query = "&".join(
                "password=***" if kv.startswith("password=") else kv for kv in query.split("&")
            )
        shown = f"{scheme}://" + (f"{credentials}@" if credentials is not None else "")
        shown += location + mark + query
        secrets = [s for s in url_secrets(url) if len(s) >= MIN_SECRET_LENGTH]
        if not any(secret in shown for secret in secrets):
            return shown
    after_last_at = url.partition("://")[2].rpartition("@")[2]
    if "@" not in url or "password=" in url:
        return f"{scheme}://***"
    return f"{scheme}://***@{after_last_at.partition('?')[0]}"


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from `base` (e.g. another Settings' values), then the environment, then
    `overrides` (CLI flags), all keyed by environment variable.

    Raises ConfigError with one line per bad variable, naming it, never echoing
    a secret value. The environment is passed in, not read by `Settings()`, so a
    caller (a test, `--workers`) decides which one counts.
    """
    values: dict[str, Any] = dict(base or {})
    values.update(environment_values(os.environ if environ is None else environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings.model_validate(grouped(values))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, values)) from None


def describe_validation_error(exc: ValidationError, values: Mapping[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        name = str(err["loc"][-1]) if err["loc"] else ""
        if name not in ENV_FIELDS and name in values:
            lines.append(f"{name}: {message}")  # not one of ours (a typo in an override)
        elif name not in ENV_FIELDS:  # a rule across settings: its message names them
            lines.append(message)
        elif name in values and name not in SECRET_FIELDS:
            shown = values[name]
            if name in URL_FIELDS and isinstance(shown, str):
                shown = redact_url(shown)
            lines.append(f"{name}: {message} (got {shown!r})")
        else:
            lines.append(f"{name}: {message}")
    return "invalid configuration: " + "; ".join(lines)
