"""`batch-pipeline check`: can a run start? One line per dependency, before any work.

    source      lists SOURCE_URI (S3 or local): objects and bytes
    database    connects (DATABASE_URL, or the embedded server: where it is), pending migrations
    model       health, protocol, one test prediction of a fixed contract row, the model version
    pushgateway ready, when PUSHGATEWAY_URL is set

Nothing is written: the test prediction is not stored and the database is only
read (the embedded server is started, and created empty if it is new). Each
check catches its own failure, so one broken dependency does not hide the
others; the command exits 0 only if every check passed. Scheduled jobs and
compose healthchecks can call it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import urllib3

from library.config import (
    ObservabilitySettings,
    ScoringSettings,
    Settings,
    SinkSettings,
    SourceSettings,
    redact_url,
)
from library.errors import PipelineError
from library.models import SourceObject
from library.score.client import split_credentials
from library.stages import source
from library.state import db

log = logging.getLogger(__name__)

TEST_ROW_CSV = (
    "transaction_id,event_time,account_id,merchant_id,merchant_category,amount,currency,"
    "country,channel,card_present\n"
    "batch-pipeline-check,2026-01-11T10:00:00Z,acc-00042,m-0193,grocery,42.17,USD,US,pos,true\n"
)
HTTP_CHECK_SECONDS = 10.0  # one probe of the Pushgateway


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<11} {self.detail}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_source(settings: SourceSettings) -> CheckResult:
    uri = settings.uri
    if not uri:
        return CheckResult("source", False, "SOURCE_URI is not set")
    from library.stages.source import s3_client_for

    try:
        objects = source.list_objects(uri, s3_client_for(settings))
    except PipelineError as exc:
        return CheckResult("source", False, str(exc))
    if not objects:
        return CheckResult("source", True, f"{uri}: no .csv, .csv.gz or .csv.zst object yet")
    total = sum(o.size or 0 for o in objects)
    noun = "object" if len(objects) == 1 else "objects"
    return CheckResult("source", True, f"{uri}: {len(objects)} {noun}, {_size(total)}")


def check_database(settings: SinkSettings) -> CheckResult:
    from library.state.db import database

    embedded = settings.database_url is None
    try:
        with database(settings) as (url, shown):
            where = (
                f"embedded PostgreSQL in {settings.embedded_dir.expanduser().resolve()}"
                if embedded
                else shown
            )
            conn = db.connect(url, "batch-pipeline check")
            try:
                version = conn.info.parameter_status("server_version") or "?"
                pending = db.pending_migrations(conn)
            finally:
                conn.close()
    except PipelineError as exc:
        return CheckResult("database", False, str(exc))
    detail = f"{where}: connected (PostgreSQL {version.split()[0]})"
    if not pending:
        return CheckResult("database", True, f"{detail}, migrations up to date")
    names = ", ".join(m.script for m in pending)
    if embedded:
        return CheckResult("database", True, f"{detail}, pending {names} (run applies them)")
    return CheckResult(
        "database", False, f"{detail}, not migrated: pending {names}; run `batch-pipeline migrate`"
    )


def check_model(settings: ScoringSettings) -> CheckResult:
    """Health through the run's own client, then one request of one fixed contract row,
    encoded and decoded by the run's codec: no retry, so the answer is the service's own."""
    if not settings.url:
        return CheckResult("model", False, "ML_API_URL is not set")
    from library.score.client import ScoringClient, classify_response, describe_transport_error
    from library.score.codec import make_codec
    from library.stages.validate import validate_chunk

    shown = f"{redact_url(settings.url)} ({settings.protocol})"
    token = settings.token_value
    codec = make_codec(settings)
    client = ScoringClient(
        settings.url,
        codec,
        timeout=settings.timeout,
        max_retries=0,
        backoff=0.0,
        backoff_max=0.0,
        pool_size=1,
        token=token,
    )
    try:
        client.check_ready()
    except PipelineError as exc:
        return CheckResult("model", False, f"{shown}: {exc}")
    finally:
        client.close()
    obj = SourceObject("batch-pipeline-check", "1")
    [chunk] = source.read_chunks(obj, io.StringIO(TEST_ROW_CSV), 10)
    batch = validate_chunk(chunk).valid
    base, basic_auth = split_credentials(settings.url)
    url = base.rstrip("/") + codec.predict_path
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif basic_auth:
        headers.update(urllib3.make_headers(basic_auth=basic_auth))
    try:
        response = urllib3.request(
            "POST",
            url,
            body=codec.encode(batch, codec.prepare(batch)),
            headers=headers,
            timeout=settings.timeout,
            retries=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        return CheckResult(
            "model",
            False,
            f"{shown}: ready, but the test prediction: {describe_transport_error(exc)}",
        )
    failed = f"{shown}: ready, but the test prediction failed"
    try:
        if response.status != 200:
            error: PipelineError = classify_response(
                response.status, response.data, response.headers, redact_url(url)
            )
            return CheckResult("model", False, f"{failed}: {error}")
        [prediction] = codec.decode(response.data, ["batch-pipeline-check"])
    except PipelineError as exc:
        return CheckResult("model", False, f"{failed}: {exc}")
    verdict = "fraud" if prediction.is_fraud else "not fraud"
    return CheckResult(
        "model",
        True,
        f"{shown}: ready; test prediction fraud_score {prediction.fraud_score:.3f} ({verdict}); "
        f"model_version {prediction.model_version}",
    )


def check_pushgateway(settings: ObservabilitySettings) -> CheckResult | None:
    if not settings.pushgateway_url:
        return None
    url = settings.pushgateway_url + "/-/ready"
    shown = redact_url(settings.pushgateway_url)
    try:
        response = urllib3.request("GET", url, timeout=HTTP_CHECK_SECONDS, retries=False)
    except urllib3.exceptions.HTTPError as exc:
        from library.score.client import describe_transport_error

        return CheckResult(
            "pushgateway", False, f"cannot reach {shown}: {describe_transport_error(exc)}"
        )
    if response.status != 200:
        return CheckResult("pushgateway", False, f"{shown}/-/ready answered HTTP {response.status}")
    return CheckResult("pushgateway", True, f"{shown}: ready")


def run_checks(settings: Settings) -> list[CheckResult]:
    """Every check, in order; a check's unexpected error is its failure, not the command's."""
    # Each check is given the one settings group it reads, in the order they are printed.
    checks: list[tuple[str, Callable[[], CheckResult | None]]] = [
        ("source", partial(check_source, settings.source)),
        ("database", partial(check_database, settings.sink)),
        ("model", partial(check_model, settings.scoring)),
        ("pushgateway", partial(check_pushgateway, settings.observability)),
    ]
    results = []
    for name, check in checks:
        try:
            result = check()
        except Exception as exc:  # a bug or an unclassified error: still one line
            log.debug("check %s failed", name, exc_info=True)
            result = CheckResult(name, False, f"{type(exc).__name__}: {db.first_line(exc)}")
        if result is not None:
            results.append(result)
    return results
