"""The scoring client against a real HTTP model server with failure knobs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import polars as pl
import pytest

from library.errors import ApiUnavailableError
from library.models import RowChunk, SourceObject
from library.score.client import ScoringClient, ScoringStopped, retry_after_seconds
from library.score.codec import NativeCodec
from library.stages.validate import validate_chunk
from tests.conftest import free_port
from tests.helpers.data import rows
from tests.helpers.fake_model import FakeModel
from tests.stages.test_validate import as_frame


def transactions(n: int, start: int = 0) -> pl.DataFrame:
    records = rows(n, start)
    chunk = RowChunk(SourceObject("x", "v"), 0, as_frame(records), [""] * n, [], n + 1)
    return validate_chunk(chunk).valid


def batch(n: int, start: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A batch as a run scores it: the transactions and their request rows."""
    tx = transactions(n, start)
    return tx, NativeCodec().prepare(tx)


def client(
    url: str, retries: int = 3, timeout: float = 5.0, down_timeout: float = 30.0
) -> ScoringClient:
    return ScoringClient(
        url,
        NativeCodec(),
        timeout=timeout,
        max_retries=retries,
        backoff=0.01,
        backoff_max=0.05,
        pool_size=4,
        down_timeout=down_timeout,
    )


def test_scores_every_transaction_with_model_version(fake_model: FakeModel) -> None:
    result = client(fake_model.url).score(*batch(100))
    assert len(result.predictions) == 100 and not result.failures
    assert {p.model_version for p in result.predictions} == {"fake-1.0"}
    assert all(0 <= p.fraud_score <= 1 for p in result.predictions)
    sent = fake_model.predict_requests()[0]
    assert sent.size == 100 and sent.ids[0] == "tx-000000"


def test_request_body_follows_the_contract() -> None:
    body = NativeCodec().encode(*batch(1))
    assert body.startswith(
        b'{"transactions":[{"transaction_id":"tx-000000","event_time":"2026-01-01T00:00:00Z"'
    )
    assert b'"amount":1.0' in body and b'"card_present":true' in body


@pytest.mark.parametrize(
    ("knobs", "scored", "failed", "requests"),
    [
        ({"fail_times": 2, "fail_status": 503}, 10, 0, 3),
        ({"fail_times": 1, "fail_status": 500}, 10, 0, 2),
        ({"fail_times": 1, "fail_status": 429, "retry_after": "0"}, 10, 0, 2),
        ({"malformed_times": 1, "malformed_kind": "not_json"}, 10, 0, 2),
        ({"malformed_times": 1, "malformed_kind": "missing_id"}, 10, 0, 2),
        ({"malformed_times": 1, "malformed_kind": "extra_id"}, 10, 0, 2),
        ({"malformed_times": 1, "malformed_kind": "bad_score"}, 10, 0, 2),
        ({"malformed_times": 1, "malformed_kind": "no_version"}, 10, 0, 2),
        ({"poison_ids": {"tx-000003"}, "poison_status": 422}, 9, 1, 9),
        ({"poison_ids": {"tx-000003"}, "poison_status": 400}, 9, 1, 9),
        ({"poison_ids": {"tx-000000", "tx-000009"}}, 8, 2, 13),
    ],
)
def test_failures_by_kind(
    fake_model: FakeModel, knobs: dict[str, object], scored: int, failed: int, requests: int
) -> None:
    c = client(fake_model.url)
    c.score(*batch(1, start=500))  # the service has answered once: it is up
    for name, value in knobs.items():
        setattr(fake_model.knobs, name, value)
    result = c.score(*batch(10))
    assert (len(result.predictions), len(result.failures), result.requests) == (
        scored,
        failed,
        requests,
    )


def test_poison_row_in_a_batch_of_100_fails_alone_with_status_and_reason(
    fake_model: FakeModel,
) -> None:
    fake_model.knobs.poison_ids = {"tx-000042"}
    result = client(fake_model.url).score(*batch(100))
    assert len(result.predictions) == 99
    [failure] = result.failures
    assert failure.transaction_id == "tx-000042"
    assert failure.http_status == 422
    assert failure.attempts == 1
    assert "cannot score tx-000042" in failure.reason
    assert result.requests <= 2 * 7 + 1  # bisection, not one request per row


def test_malformed_answers_past_the_retries_fail_the_batch_but_not_the_run(
    fake_model: FakeModel,
) -> None:
    c = client(fake_model.url, retries=2)
    fake_model.knobs.malformed_times = 100
    result = c.score(*batch(5))
    assert len(result.failures) == 5 and not result.predictions
    assert result.failures[0].attempts == 3
    assert "ML API failed after 3 attempts" in result.failures[0].reason


def test_a_service_down_from_the_start_stops_the_run() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        ApiUnavailableError, match=r"has failed every request for \ds .*connection refused"
    ):
        client(dead, retries=1, down_timeout=0.5).score(*batch(3))
    with pytest.raises(ApiUnavailableError, match="cannot reach the ML API"):
        client(dead).check_ready()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_status_that_refuses_every_request_stops_the_run(
    fake_model: FakeModel, status: int
) -> None:
    fake_model.knobs.always_status = status
    with pytest.raises(ApiUnavailableError, match=f"HTTP {status}"):
        client(fake_model.url).score(*batch(2))
    assert len(fake_model.predict_requests()) == 1


def test_retry_after_is_honoured(fake_model: FakeModel) -> None:
    c = ScoringClient(
        fake_model.url,
        NativeCodec(),
        timeout=5,
        max_retries=2,
        backoff=0.0,
        backoff_max=5,
        pool_size=1,
    )
    fake_model.knobs.fail_times, fake_model.knobs.fail_status, fake_model.knobs.retry_after = (
        1,
        429,
        "1",
    )
    began = time.monotonic()
    result = c.score(*batch(2))
    assert len(result.predictions) == 2
    assert time.monotonic() - began >= 0.95


def test_a_request_hanging_past_the_timeout_is_retried(fake_model: FakeModel) -> None:
    fake_model.knobs.hang_times, fake_model.knobs.hang_seconds = 1, 3.0
    result = client(fake_model.url, timeout=0.5).score(*batch(4))
    assert len(result.predictions) == 4
    assert result.requests == 2


def test_duplicate_ids_in_one_batch_are_sent_once(fake_model: FakeModel) -> None:
    frame = pl.concat([transactions(3), transactions(1)])
    result = client(fake_model.url).score(frame, NativeCodec().prepare(frame))
    assert sorted(p.transaction_id for p in result.predictions) == [
        "tx-000000",
        "tx-000001",
        "tx-000002",
    ]
    # The latest row of each id, with its own request row: in the order of the last rows.
    sent = fake_model.predict_requests()[0]
    assert sent.size == 3 and sent.ids == ["tx-000001", "tx-000002", "tx-000000"]


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("-3") == 0.0
    assert (
        retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), lambda: now)
        == 30.0
    )
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_an_outage_longer_than_the_retries_fails_no_row(fake_model: FakeModel) -> None:
    fake_model.knobs.fail_times, fake_model.knobs.fail_status = 12, 503  # more than 3 retries
    result = client(fake_model.url, retries=3).score(*batch(5))
    assert len(result.predictions) == 5 and not result.failures
    assert result.requests == 13


def test_the_breaker_opens_after_api_down_timeout_naming_url_and_status(
    fake_model: FakeModel,
) -> None:
    c = client(fake_model.url, retries=2, down_timeout=0.4)
    c.score(*batch(1, start=300))
    fake_model.knobs.always_status = 503
    with pytest.raises(ApiUnavailableError) as err:
        c.score(*batch(5))
    assert f"the ML API at {fake_model.url}/predict has failed every request" in str(err.value)
    assert "HTTP 503" in str(err.value)
    with pytest.raises(ScoringStopped):  # every other worker stops too
        c.score(*batch(1, start=400))


def authorization_seen(fake_model: FakeModel) -> list[str | None]:
    """The Authorization header of every request the fake model receives."""
    seen: list[str | None] = []
    original = fake_model.handle

    def spy(handler: object, body: bytes) -> None:
        seen.append(handler.headers.get("Authorization"))  # type: ignore[attr-defined]
        original(handler, body)  # type: ignore[arg-type]

    fake_model.handle = spy  # type: ignore[method-assign]
    return seen


def test_a_bearer_token_is_sent(fake_model: FakeModel) -> None:
    seen = authorization_seen(fake_model)
    c = ScoringClient(
        fake_model.url,
        NativeCodec(),
        timeout=5,
        max_retries=0,
        backoff=0,
        backoff_max=0,
        pool_size=1,
        token="t0k",
    )
    c.score(*batch(1))
    assert seen == ["Bearer t0k"]


def test_credentials_in_the_url_are_sent_as_basic_auth(fake_model: FakeModel) -> None:
    seen = authorization_seen(fake_model)
    url = fake_model.url.replace("http://", "http://svc:p%40ss@")
    c = ScoringClient(
        url, NativeCodec(), timeout=5, max_retries=0, backoff=0, backoff_max=0, pool_size=1
    )
    assert "p%40ss" not in c.display_url and "p@ss" not in c.url
    c.score(*batch(1))
    assert seen == ["Basic c3ZjOnBAc3M="]  # base64("svc:p@ss")


def test_a_row_that_makes_the_model_fail_with_500_fails_alone(fake_model: FakeModel) -> None:
    """MLServer's scikit-learn runtime answers 500 for a row it cannot score."""
    c = client(fake_model.url, retries=2)
    c.score(*batch(1, start=700))
    fake_model.knobs.poison_ids, fake_model.knobs.poison_status = {"tx-000006"}, 500
    result = c.score(*batch(40))
    assert len(result.predictions) == 39
    [failure] = result.failures
    assert failure.transaction_id == "tx-000006" and failure.http_status == 500
    assert (
        result.requests < 3 + 2 * 6 + 1
    )  # the retries of the whole batch, then one request per split


def test_a_500_for_a_single_worker_is_not_taken_for_an_outage(fake_model: FakeModel) -> None:
    c = client(fake_model.url, retries=1, down_timeout=60)
    fake_model.knobs.poison_ids, fake_model.knobs.poison_status = {"tx-000001"}, 500
    began = time.monotonic()
    result = c.score(*batch(4))
    assert [f.transaction_id for f in result.failures] == ["tx-000001"]
    assert time.monotonic() - began < 10  # not probing until API_DOWN_TIMEOUT


def test_mlserver_model_not_ready_is_transient(fake_model: FakeModel) -> None:
    from urllib3 import HTTPHeaderDict

    from library.errors import TransientApiError
    from library.score.client import classify_response

    error = classify_response(
        400, b'{"error":"Model fraud is not ready yet."}', HTTPHeaderDict(), "u"
    )
    assert isinstance(error, TransientApiError)
