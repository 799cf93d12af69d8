"""Logging: the seed's text lines or JSON lines, with the run's context, and no secrets.

Every record carries the run id and, where the code knows them, the object
being read, the batch (unit sequence number) and the stage. In text format a
warning or an error ends with that context in brackets, so a line read alone
in cron mail still says which run, object and batch it is about; in JSON format
they are fields that a log pipeline can group by.

Secrets are never formatted into messages on purpose; the RedactSecrets filter
is the second line of defence, for text that comes from elsewhere (a library's
exception, a URL echoed back by a server).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

import orjson

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
REDACTED = "***"

_run_id = ""
_object: ContextVar[str | None] = ContextVar("object", default=None)
_batch: ContextVar[int | None] = ContextVar("batch", default=None)
_stage: ContextVar[str | None] = ContextVar("stage", default=None)


def set_run(run_id: str) -> None:
    global _run_id
    _run_id = run_id


@contextmanager
def context(
    object_uri: str | None = None, batch: int | None = None, stage: str | None = None
) -> Iterator[None]:
    """Attach the object, batch and stage to every record logged inside (this thread)."""
    object_token = _object.set(object_uri) if object_uri is not None else None
    batch_token = _batch.set(batch) if batch is not None else None
    stage_token = _stage.set(stage) if stage is not None else None
    try:
        yield
    finally:
        if stage_token is not None:
            _stage.reset(stage_token)
        if batch_token is not None:
            _batch.reset(batch_token)
        if object_token is not None:
            _object.reset(object_token)


def set_context(
    object_uri: str | None = None, batch: int | None = None, stage: str | None = None
) -> None:
    """Set this thread's context until changed (for long-lived worker threads)."""
    _object.set(object_uri)
    _batch.set(batch)
    _stage.set(stage)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = getattr(record, "run_id", None) or _run_id or None
        record.object = getattr(record, "object", None) or _object.get()
        record.batch = (
            getattr(record, "batch", None)
            if getattr(record, "batch", None) is not None
            else _batch.get()
        )
        record.stage = getattr(record, "stage", None) or _stage.get()
        return True


class TextFormatter(logging.Formatter):
    """The seed's format; warnings and errors end with [run ..., object ..., batch ...]."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            where = [
                f"{label} {value}"
                for label, value in (
                    ("run", getattr(record, "run_id", None)),
                    ("object", getattr(record, "object", None)),
                    ("batch", getattr(record, "batch", None)),
                )
                if value is not None
            ]
            if where:
                line += " [" + ", ".join(where) + "]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, run_id, object, batch, stage, counts."""

    FIELDS = ("run_id", "object", "batch", "stage", "counts", "progress")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                doc[field] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = self.scrub(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, scrubbed, instead of letting the handler format it raw.
            text = logging.Formatter().formatException(record.exc_info)
            cleaned = cleaned + "\n" + self.scrub(text)
            record.exc_info = None
            record.exc_text = None
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class StreamHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes to whatever `sys.stderr` is at the time, so that a live progress display
    that redirects it keeps log lines above itself instead of garbling them."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def setup_logging(level: str = "INFO", secrets: Iterable[str] = (), fmt: str = "text") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactSecrets(secrets))
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO would drown the job's own lines.
    for noisy in ("botocore", "boto3", "urllib3", "smart_open", "s3transfer", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def scrub(text: str) -> str:
    """`text` with every secret the log filter knows replaced (for output outside logging)."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RedactSecrets):
                text = f.scrub(text)
    return text


def json_event(message: str, level: str = "INFO", **fields: Any) -> str:
    """One JSON line shaped like the JSON log records (time, level, logger, message, fields),
    for what the job writes to stdout with LOG_FORMAT=json: a log pipeline that collects both
    streams parses every line. Secrets are scrubbed as in the logs."""
    doc: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": "batch_pipeline",
        "message": message,
        **fields,
    }
    return scrub(orjson.dumps(doc, default=str).decode())


def add_secrets(secrets: Iterable[str]) -> None:
    """Add secrets learned after start-up (e.g. the embedded database URL) to the filter."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RedactSecrets):
                f.secrets = sorted(
                    set(f.secrets) | {s for s in secrets if s}, key=len, reverse=True
                )
