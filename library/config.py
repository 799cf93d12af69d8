"""Every setting of the job, typed, documented and validated before any work.

Settings come from environment variables (names as in the contract, section 4),
and each can be overridden by a command-line flag of the same name in kebab case
(`API_MAX_WORKERS` -> `--api-max-workers`). A bad value raises `ConfigError`
naming the variable; secret values never appear in messages or in `redacted()`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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
DEFAULT_EMBEDDED_DB_DIR = ".batch-pipeline/postgres"
DEFAULT_API_WAIT_READY = 60.0
DEFAULT_FRAUD_THRESHOLD = 0.5
DEFAULT_API_DOWN_TIMEOUT = 120.0
DEFAULT_PROGRESS_INTERVAL = 10.0
DEFAULT_METRICS_JOB = "batch-pipeline"
DEFAULT_FAIL_ON_EMPTY_SOURCE = False


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


class Settings(BaseModel):
    """The job's configuration. Field names are the environment variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SOURCE_URI: str | None = Field(
        None,
        description="What to read: s3://bucket/key, s3://bucket/prefix/, a local file or folder.",
    )
    KEY: str | None = Field(None, description="S3 / MinIO access key id.")
    SECRET: SecretStr | None = Field(None, description="S3 / MinIO secret key (never printed).")
    ENDPOINT_URL: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://minio:9000 (unset: AWS S3)."
    )
    DATABASE_URL: SecretStr | None = Field(
        None,
        description="PostgreSQL URL. Unset: an embedded local PostgreSQL is started (EMBEDDED_DB_DIR).",
    )
    ML_API_URL: str | None = Field(None, description="Base URL of the prediction API.")
    ML_API_PROTOCOL: Literal["native", "mlflow", "v2"] = Field(
        "native",
        description="native (POST /predict, the contract), mlflow (POST /invocations) "
        "or v2 (Open Inference Protocol: MLServer, KServe, Triton, Seldon).",
    )
    MODEL_NAME: str | None = Field(
        None, description="Model name for the v2 protocol: POST /v2/models/{MODEL_NAME}/infer."
    )
    MODEL_VERSION: str | None = Field(
        None,
        description="Model version stored with predictions when the server does not report one "
        "(required for mlflow).",
    )
    ML_API_TOKEN: SecretStr | None = Field(
        None, description="Bearer token sent to the model API (never printed)."
    )
    FRAUD_THRESHOLD: float = Field(
        DEFAULT_FRAUD_THRESHOLD,
        ge=0,
        le=1,
        description="Score at or above which a transaction is fraud, when the server returns only scores.",
    )
    ROW_BATCH_SIZE: int = Field(
        DEFAULT_ROW_BATCH_SIZE,
        ge=1,
        le=1_000_000,
        description="Rows read from the source per chunk.",
    )
    MAX_QUOTED_FIELD_CHARS: int = Field(
        DEFAULT_MAX_QUOTED_FIELD_CHARS,
        ge=MIN_MAX_QUOTED_FIELD_CHARS,
        le=1 << 40,
        description="A quoted field still open after this many characters fails its object as "
        "an unterminated quote, naming the line where it opened (at least 131072).",
    )
    API_BATCH_SIZE: int = Field(
        DEFAULT_API_BATCH_SIZE, ge=1, le=100_000, description="Transactions per API request."
    )
    API_MAX_WORKERS: int = Field(
        DEFAULT_API_MAX_WORKERS, ge=1, le=256, description="API requests in flight at once."
    )
    DB_ROW_BATCH_SIZE: int = Field(
        DEFAULT_DB_ROW_BATCH_SIZE,
        ge=1,
        le=1_000_000,
        description="Rows accumulated per database flush (one transaction each).",
    )
    API_TIMEOUT: float = Field(
        DEFAULT_API_TIMEOUT,
        gt=0,
        le=3600,
        description="Seconds before one API request is abandoned.",
    )
    API_CONCURRENCY: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description="adaptive: requests in flight follow the service's capacity, up to "
        "API_MAX_WORKERS; fixed: always API_MAX_WORKERS.",
    )
    API_RATE_LIMIT: float | None = Field(
        None,
        gt=0,
        le=100_000,
        description="At most this many API requests per second (unset: no cap).",
    )
    API_DOWN_TIMEOUT: float = Field(
        DEFAULT_API_DOWN_TIMEOUT,
        gt=0,
        le=86_400,
        description="Seconds of every request failing after which the run stops as failed (exit 1).",
    )
    API_WAIT_READY: float = Field(
        DEFAULT_API_WAIT_READY,
        ge=0,
        le=3600,
        description="Seconds to wait at start for a model server that is not ready yet "
        "(still starting: connection refused, 503) before the run fails; 0: one check, no wait.",
    )
    API_MAX_RETRIES: int = Field(
        DEFAULT_API_MAX_RETRIES,
        ge=0,
        le=100,
        description="Attempts after the first, for transient API failures.",
    )
    MAX_INVALID_RATIO: float = Field(
        DEFAULT_MAX_INVALID_RATIO,
        ge=0,
        le=1,
        description="Invalid rows / rows read above which the run stops as failed.",
    )
    MAX_FAILED_RATIO: float = Field(
        DEFAULT_MAX_FAILED_RATIO,
        ge=0,
        le=1,
        description="Failed / valid transactions above which the run stops as failed.",
    )
    FAIL_ON_EMPTY_SOURCE: bool = Field(
        DEFAULT_FAIL_ON_EMPTY_SOURCE,
        description="When SOURCE_URI holds no object: true makes the run fail (exit 1), "
        "for a scheduled job whose input must be there; false only warns.",
    )
    API_RETRY_BACKOFF: float = Field(
        DEFAULT_API_RETRY_BACKOFF,
        ge=0,
        le=600,
        description="First retry delay in seconds; doubles each attempt, with full jitter.",
    )
    API_RETRY_BACKOFF_MAX: float = Field(
        DEFAULT_API_RETRY_BACKOFF_MAX,
        ge=0,
        le=3600,
        description="Longest wait between two attempts, Retry-After included.",
    )
    DB_FLUSH_INTERVAL: float = Field(
        DEFAULT_DB_FLUSH_INTERVAL,
        gt=0,
        le=3600,
        description="Seconds after which scored rows are flushed even if DB_ROW_BATCH_SIZE is not reached.",
    )
    RUN_GROUP: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Workers started with the same RUN_GROUP share one listing of the source and "
        "its objects (scale-out; on Kubernetes, the Job's controller-uid). Unset: a group of one.",
    )
    JOB_COMPLETION_INDEX: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="This worker's index in its run group (set by a Kubernetes Indexed Job): "
        "where it starts in the listing, and its label in the metrics.",
    )
    DB_RETRY_TIMEOUT: float = Field(
        DEFAULT_DB_RETRY_TIMEOUT,
        ge=0,
        le=86_400,
        description="Seconds a lost database (restart, failover, dropped connection) is waited "
        "for, with backoff, before the run stops as failed.",
    )
    EMBEDDED_DB_DIR: Path = Field(
        default_factory=default_embedded_db_dir,
        description="Folder of the embedded PostgreSQL used when DATABASE_URL is unset "
        "(default: $XDG_DATA_HOME/batch-pipeline/postgres, else "
        "~/.local/share/batch-pipeline/postgres).",
    )
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log verbosity."
    )
    LOG_FORMAT: Literal["text", "json"] = Field(
        "text", description="text (the seed's format) or json (one object per line)."
    )
    PROGRESS: Literal["auto", "bar", "log", "off"] = Field(
        "auto",
        description="auto: a live bar on a terminal, a log line every PROGRESS_INTERVAL otherwise.",
    )
    PROGRESS_INTERVAL: float = Field(
        DEFAULT_PROGRESS_INTERVAL,
        gt=0,
        le=3600,
        description="Seconds between progress log lines and metric pushes.",
    )
    PUSHGATEWAY_URL: str | None = Field(
        None, description="Prometheus Pushgateway to push the job's metrics to (unset: no push)."
    )
    METRICS_TEXTFILE: Path | None = Field(
        None,
        description="Also write the metrics to this file, for node_exporter's textfile collector.",
    )
    METRICS_JOB: str = Field(
        DEFAULT_METRICS_JOB, min_length=1, description="The job label of the pushed metrics."
    )
    COMPLETED_WITH_ERRORS_EXIT_CODE: int = Field(
        DEFAULT_COMPLETED_WITH_ERRORS_EXIT_CODE,
        description="Exit code of a run that ends completed_with_errors: 3 (the contract) or 0, "
        "for schedulers that count every non-zero exit as a failed attempt (Kubernetes Jobs); "
        "the status, the metrics and the alerts still say completed_with_errors.",
    )

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("ML_API_PROTOCOL", "API_CONCURRENCY", "LOG_FORMAT", "PROGRESS", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("COMPLETED_WITH_ERRORS_EXIT_CODE")
    @classmethod
    def _zero_or_three(cls, value: int) -> int:
        # Any other code would collide with another outcome (1 failed, 2 usage, 4 threshold).
        if value not in (EXIT_COMPLETED, EXIT_COMPLETED_WITH_ERRORS):
            raise ValueError("must be 0 or 3")
        return value

    @field_validator("ML_API_URL", "ENDPOINT_URL", "PUSHGATEWAY_URL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
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

    @field_validator("DATABASE_URL")
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

    @field_validator("SOURCE_URI")
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

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.API_RETRY_BACKOFF_MAX < self.API_RETRY_BACKOFF:
            raise ValueError("API_RETRY_BACKOFF_MAX must be >= API_RETRY_BACKOFF")
        if self.ML_API_PROTOCOL == "mlflow" and not self.MODEL_VERSION:
            raise ValueError(
                "MODEL_VERSION is required with ML_API_PROTOCOL=mlflow: "
                "MLflow's answers carry no model version"
            )
        if self.ML_API_PROTOCOL == "v2" and not self.MODEL_NAME:
            raise ValueError("MODEL_NAME is required with ML_API_PROTOCOL=v2")
        return self

    # -- helpers ---------------------------------------------------------------

    def __repr_args__(self) -> Any:
        # repr() and str() go through redacted(): a token in a URL must not leak either.
        return list(self.redacted().items())

    @property
    def database_url(self) -> str | None:
        return self.DATABASE_URL.get_secret_value() if self.DATABASE_URL else None

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict safe to log or store: secrets replaced."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "DATABASE_URL" and value is not None:
                value = redact_url(value.get_secret_value())
            elif name in ("ML_API_URL", "ENDPOINT_URL", "PUSHGATEWAY_URL") and value is not None:
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
        if self.SECRET:
            secrets.append(self.SECRET.get_secret_value())
        if self.ML_API_TOKEN:
            secrets.append(self.ML_API_TOKEN.get_secret_value())
        for url in (self.database_url, self.ML_API_URL, self.ENDPOINT_URL, self.PUSHGATEWAY_URL):
            if url:
                secrets.extend(url_secrets(url))
        return [s for s in secrets if len(s) >= MIN_SECRET_LENGTH]


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
    overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Settings from the environment, then `overrides` (CLI flags) on top.

    Raises ConfigError with one line per bad variable, naming it, never echoing
    a secret value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = env.get(name)
        if raw is not None and raw != "":
            values[name] = raw
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, values)) from None


def describe_validation_error(exc: ValidationError, values: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across settings: its message names them
            lines.append(message)
            continue
        name = str(err["loc"][0])
        if name in values and name not in SECRET_FIELDS:
            shown = values[name]
            if name in ("ML_API_URL", "ENDPOINT_URL", "PUSHGATEWAY_URL") and isinstance(shown, str):
                shown = redact_url(shown)
            lines.append(f"{name}: {message} (got {shown!r})")
        else:
            lines.append(f"{name}: {message}")
    return "invalid configuration: " + "; ".join(lines)
