"""Score stage: one pooled keep-alive HTTP client for the model API.

`ScoringClient.score(batch)` never raises for a problem with the request: every
transaction comes back either predicted or failed, with the reason and the
attempts made. What it does, in order:

* Every attempt waits for a slot of the `Limiter` (adaptive concurrency, the
  shared Retry-After pause, the optional rate limit).
* Transient failures (connection errors, timeouts, 408, 425, 429, 5xx, a
  malformed answer) are retried: exponential backoff with full jitter
  (tenacity's wait strategies), `Retry-After` honoured, at most API_MAX_RETRIES
  retries.
* 400, 413 and 422 mean the service refused something in the request: not
  retried; the batch is split in halves, recursively, so that every good
  transaction is still scored and only the rejected ones fail. (MLServer's 400
  "model is not ready yet" is transient.)
* A 500 that outlasts the retries while the service answers is the model
  failing on something in the batch (MLServer's scikit-learn runtime answers 500
  for a row it cannot score): the batch is split the same way, the halves
  without retries, so that only that row fails.
* Other 4xx (401, 403, 404, ...) would refuse every request alike: the run
  stops with `ApiUnavailableError` instead of failing every row.
* An outage is not a reason to fail rows: a failure counts against
  API_MAX_RETRIES only when it says something about the batch (a 500, a
  malformed answer) or when other requests succeeded meanwhile. While every
  request fails (connection refused, timeouts, 502/503/504) batches wait and
  probe every few seconds, so a model restarting costs no failed row. Once
  every request has failed for API_DOWN_TIMEOUT seconds, the breaker opens: all
  workers stop and the run ends failed (exit 1), its unscored rows unwritten so
  that the next run reads them again. A batch that fails while the service answers others is
  different: its transactions become failed rows that `retry-failed` can score
  later.

`API_TIMEOUT` bounds each request as a whole, the answer's body included
(`deadline.py`, the thin keep-alive HTTP client the requests go through): a
server that trickles its answer cannot hang the job.

Every transport exception (sockets, http.client, urllib3) is classified here, once.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit, urlunsplit

import polars as pl
import tenacity
import urllib3

from library.config import DEFAULT_HEALTH_TIMEOUT, redact_url
from library.errors import (
    ApiError,
    ApiUnavailableError,
    PipelineError,
    RejectedBatchError,
    TransientApiError,
)
from library.models import Failure, Predictions, ScoreResult, latest_positions
from library.score.concurrency import Limiter, Outcome
from library.score.deadline import Transport
from library.score.protocol import Codec, MalformedResponse

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
REJECTED_STATUSES = frozenset({400, 413, 422})
MAX_BODY_IN_REASON = 300
# What one HTTP exchange can raise besides an answer: the transport's errors, classified
# as transient by `describe_transport_error` (tests/test_errors.py checks the list). The
# requests go through `deadline.Transport` (OSError, http.client); urllib3's are kept for
# the helpers that still use it (basic-auth headers) and any future use.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
OUTAGE_PROBE_MAX_SECONDS = 5.0  # longest wait between two probes of a service that is down


class _Attempts:
    """One batch's attempts, and how many of them count against API_MAX_RETRIES.

    A failure counts when it says something about this batch: a 500 or a malformed
    answer (the service answered, but not for this batch), or any failure while
    other requests succeeded in the meantime. A connection error, a timeout or a
    502/503/504 while every request fails is an outage, not this batch's fault: it
    does not count, and the batch waits (the API_DOWN_TIMEOUT breaker bounds it)."""

    def __init__(self) -> None:
        self.charged = 0
        self.started: float | None = None  # when the latest attempt began
        self.settled = True  # whether the latest attempt's failure is counted yet

    def begin(self, now: float, last_success: float | None) -> None:
        if not self.settled and self._answered_since(last_success):
            self.charged += 1
        self.started = now
        self.settled = False

    def failed(self, exc: BaseException | None, last_success: float | None) -> None:
        if self.settled:
            return
        if _says_something_about_the_batch(exc) or self._answered_since(last_success):
            self.charged += 1
            self.settled = True

    def _answered_since(self, last_success: float | None) -> bool:
        return last_success is not None and self.started is not None and last_success > self.started


def _says_something_about_the_batch(exc: BaseException | None) -> bool:
    return isinstance(exc, MalformedResponse) or (isinstance(exc, ApiError) and exc.status == 500)


class ScoringStopped(PipelineError):
    """Scoring was stopped (interrupt, or the API is down); the batch was not scored."""


def retry_after_seconds(
    value: str | None, now: Callable[[], datetime] | None = None
) -> float | None:
    """`Retry-After` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now() if now else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def classify_response(status: int, body: bytes, headers: Mapping[str, str], url: str) -> ApiError:
    """The error an answer other than 200 means; `headers` looked up in lower case."""
    snippet = body[:MAX_BODY_IN_REASON].decode("utf-8", "replace").strip()
    if status == 400 and b"is not ready yet" in body:
        # MLServer answers 400 "Model X is not ready yet" while a model (re)loads.
        return TransientApiError(f"HTTP {status} {snippet}".rstrip(), status)
    if status in TRANSIENT_STATUSES:
        retry_after = (
            retry_after_seconds(headers.get("retry-after")) if status in (429, 503) else None
        )
        return TransientApiError(f"HTTP {status} {snippet}".rstrip(), status, retry_after)
    if status in REJECTED_STATUSES:
        return RejectedBatchError(f"rejected by the ML API (HTTP {status}): {snippet}", status)
    raise ApiUnavailableError(
        f"the ML API answered HTTP {status} to POST {url}: {snippet or 'no body'}; "
        "check ML_API_URL (and ML_API_TOKEN if the service needs one)"
    )


@dataclass
class ClientStats:
    """Counters shared by the worker threads (read by the summary and the metrics)."""

    requests: int = 0
    retries: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    latency_total: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    on_request: Callable[[str, float], None] | None = None  # e.g. the Prometheus histogram
    on_retry: Callable[[], None] | None = None

    def record(self, status: str, latency: float) -> None:
        with self.lock:
            self.requests += 1
            self.by_status[status] += 1
            self.latency_total += latency
        if self.on_request:
            self.on_request(status, latency)


class ScoringClient:
    def __init__(
        self,
        base_url: str,
        codec: Codec,
        *,
        timeout: float,
        max_retries: int,
        backoff: float,
        backoff_max: float,
        pool_size: int,
        token: str | None = None,
        adaptive: bool = False,
        rate_limit: float | None = None,
        down_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.codec = codec
        base_url, basic_auth = split_credentials(base_url)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + codec.predict_path
        self.display_url = redact_url(self.url)
        self.max_retries = max_retries
        self.stats = ClientStats()
        self._clock = clock
        self._backoff = backoff
        self._backoff_max = backoff_max
        self.limiter = Limiter(pool_size, adaptive, rate_limit, clock)
        self.down_timeout = down_timeout
        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._last_success: float | None = None
        self._failing_since: float | None = None
        self._last_error = ""
        self._lock = threading.Lock()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif basic_auth:
            headers.update(urllib3.make_headers(basic_auth=basic_auth))
        self.timeout = timeout
        # One keep-alive connection per scoring thread (never more than the workers);
        # no retries of its own (tenacity decides), every request bounded as a whole.
        self._transport = Transport(self.base_url, headers)
        self._target = request_target(self.url)

    # -- lifecycle -------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop retrying and refuse new batches (interrupt, or the run is failing)."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        self._stop.set()

    def close(self) -> None:
        self._transport.close()

    def check_ready(self) -> None:
        """GET the health endpoint once; raise ApiUnavailableError unless it answers 2xx."""
        url = self.base_url + self.codec.health_path
        try:
            response = self._transport.request(
                "GET", request_target(url), None, DEFAULT_HEALTH_TIMEOUT
            )
        except TRANSPORT_ERRORS as exc:
            raise ApiUnavailableError(
                f"cannot reach the ML API at {redact_url(url)}: "
                f"{describe_transport_error(exc)}; "
                "check ML_API_URL and that the service is running"
            ) from None
        if not 200 <= response.status < 300:
            raise ApiUnavailableError(
                f"the ML API at {redact_url(url)} is not ready: HTTP {response.status}"
            )

    # -- scoring ---------------------------------------------------------------

    def prepare(self, transactions: pl.DataFrame) -> pl.DataFrame:
        """A whole chunk's request rows at once (see Codec.prepare)."""
        return self.codec.prepare(transactions)

    def score(self, transactions: pl.DataFrame, requests: pl.DataFrame) -> ScoreResult:
        """Score one batch (`requests`: `prepare`'s rows for exactly these transactions);
        every transaction ends predicted or failed."""
        every_id = transactions.get_column("transaction_id").to_list()
        result = ScoreResult(ids=every_id)
        transactions, requests, ids = distinct_rows(transactions, requests, every_id)
        self._score_into(transactions, requests, result, ids)
        return result

    def _score_into(
        self,
        transactions: pl.DataFrame,
        requests: pl.DataFrame,
        result: ScoreResult,
        ids: list[str],
        retry: bool = True,
    ) -> None:
        """Score with retries; a rejected batch (or a 500 that outlasts them) is split in
        halves, its transactions and their request rows alike."""
        try:
            self._attempt_until_answered(transactions, requests, result, ids, retry)
        except RejectedBatchError as exc:
            if len(ids) == 1:
                result.failures.append(Failure(ids[0], str(exc), exc.status, exc.attempts))
                return
            for half in halves(transactions, requests):
                self._score_into(*half, result, _ids(half[0]), retry)
        except TransientApiError as exc:
            if self._stop.is_set():
                raise ScoringStopped(self._stop_reason or str(exc)) from None
            if exc.status == 500 and len(ids) > 1:
                for half in halves(transactions, requests):
                    self._score_into(*half, result, _ids(half[0]), retry=False)
                return
            reason = f"ML API failed after {exc.attempts} attempts: {exc}"
            result.failures.extend(Failure(tid, reason, exc.status, exc.attempts) for tid in ids)

    def _attempt_until_answered(
        self,
        transactions: pl.DataFrame,
        requests: pl.DataFrame,
        result: ScoreResult,
        ids: list[str],
        retry: bool,
    ) -> None:
        """POST until answered; a transient failure is retried (tenacity's full-jitter
        waits, `_give_up`'s counting), anything else raised, carrying the attempts made
        (`ApiError.attempts`).

        The loop is written out rather than run by `tenacity.Retrying`: its state
        machine cost every batch about 30 us and a reference cycle for the GC, and
        nearly every batch is answered at the first attempt."""
        tally = _Attempts()
        attempt = 0
        while True:
            attempt += 1
            tally.begin(self._clock(), self._last_success_time())
            if attempt > 1:
                with self.stats.lock:
                    self.stats.retries += 1
                if self.stats.on_retry:
                    self.stats.on_retry()
                result.retries += 1
            result.requests += 1
            try:
                result.predictions.extend(self._post(transactions, requests, ids))
                return
            except ApiError as exc:
                exc.attempts = attempt
                if not isinstance(exc, TransientApiError) or not retry:
                    raise
                if self._give_up(exc, tally):
                    raise
                delay = self._wait(exc, attempt)
                self._log_retry(exc, attempt, delay)
                self._sleep(delay)

    def _post(
        self, transactions: pl.DataFrame, requests: pl.DataFrame, ids: list[str]
    ) -> Predictions:
        if self._stop.is_set():
            raise ScoringStopped(self._stop_reason or "scoring stopped")
        body = self.codec.encode(transactions, requests)
        with self.limiter.slot() as report:
            if self._stop.is_set():
                raise ScoringStopped(self._stop_reason or "scoring stopped")
            began = time.perf_counter()
            try:
                response = self._transport.request("POST", self._target, body, self.timeout)
            except TRANSPORT_ERRORS as exc:
                latency = time.perf_counter() - began
                self.stats.record("error", latency)
                report(Outcome.OVERLOAD, latency)
                problem = (
                    # The transport's socket timeouts are what is left of the deadline.
                    f"timed out: no whole answer within API_TIMEOUT={self.timeout:g}s"
                    if isinstance(exc, TimeoutError)
                    else describe_transport_error(exc)
                )
                transport = TransientApiError(problem)
                self._note_failure(transport)
                raise transport from None
            latency = time.perf_counter() - began
            self.stats.record(str(response.status), latency)
            if response.status != 200:
                try:
                    error = classify_response(
                        response.status, response.data, response.headers, self.url
                    )
                except ApiUnavailableError:
                    report(Outcome.NEUTRAL, latency)
                    raise
                if response.status in (429, 503):
                    report(Outcome.OVERLOAD, latency)
                    if error.retry_after:
                        self.limiter.pause(min(error.retry_after, self._backoff_max))
                else:
                    report(Outcome.NEUTRAL, latency)
                if isinstance(error, TransientApiError):
                    self._note_failure(error)
                raise error
            predictions = self.codec.decode(response.data, ids)  # MalformedResponse: service is up
            report(Outcome.SUCCESS, latency)
        with self._lock:
            self._last_success = self._clock()
            self._failing_since = None
        return predictions

    def _note_failure(self, error: ApiError) -> None:
        """Count a failed attempt toward the breaker; open it after API_DOWN_TIMEOUT of failures."""
        now = self._clock()
        with self._lock:
            self._last_error = str(error)
            if self._failing_since is None:
                self._failing_since = now
            down_for = now - self._failing_since
        if down_for >= self.down_timeout:
            message = (
                f"the ML API at {self.display_url} has failed every request for {down_for:.0f}s "
                f"(API_DOWN_TIMEOUT={self.down_timeout:g}; last: {error}); stopped, rerun to resume"
            )
            self.stop(message)
            raise ApiUnavailableError(message)

    def _last_success_time(self) -> float | None:
        with self._lock:
            return self._last_success

    def _give_up(self, exc: BaseException, tally: _Attempts) -> bool:
        """Stop after API_MAX_RETRIES counted failures (see `_Attempts`): an outage
        is waited out, bounded by the API_DOWN_TIMEOUT breaker."""
        if self._stop.is_set():
            return True
        tally.failed(exc, self._last_success_time())
        return tally.charged > self.max_retries

    def _wait(self, exc: BaseException, attempt: int) -> float:
        """Seconds before the next attempt (tenacity's full-jitter exponential waits)."""
        state = _attempt_state(attempt)
        unreachable = isinstance(exc, ApiError) and exc.status in (None, 502, 504)
        if unreachable and self._failing_since is not None:
            # The service cannot be reached at all: probe again soon, so that a service
            # back from a restart is used within seconds (the breaker ends a real outage).
            probe = tenacity.wait_random_exponential(
                multiplier=self._backoff, max=min(self._backoff_max, OUTAGE_PROBE_MAX_SECONDS)
            )
            return float(probe(state))
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return min(exc.retry_after, self._backoff_max)
        multiplier = self._backoff
        baseline = self.limiter.baseline_latency()
        if (
            self.limiter.adaptive
            and isinstance(exc, ApiError)
            and exc.status in (429, 503)
            and baseline
        ):
            # The limiter has already cut concurrency: back off on the service's own time scale.
            multiplier = min(self._backoff, max(2 * baseline, 0.01))
        exponential = tenacity.wait_random_exponential(multiplier=multiplier, max=self._backoff_max)
        return float(exponential(state))

    def _sleep(self, seconds: float) -> None:
        # An interrupt must not wait out a long backoff.
        if self._stop.wait(seconds):
            raise ScoringStopped(self._stop_reason or "scoring stopped")

    def _log_retry(self, exc: BaseException, attempt: int, delay: float) -> None:
        if attempt > self.max_retries:
            log.warning(
                "ML API still failing (attempt %d; every request is failing, so this batch "
                "waits): %s; probing again in %.1fs (stops after API_DOWN_TIMEOUT=%gs)",
                attempt,
                exc,
                delay,
                self.down_timeout,
            )
            return
        log.warning(
            "ML API request failed (attempt %d of %d): %s; retrying in %.1fs",
            attempt,
            self.max_retries + 1,
            exc,
            delay,
        )


_RETRYING = tenacity.Retrying()  # only for RetryCallState's signature: nothing runs it


def _attempt_state(attempt: int) -> tenacity.RetryCallState:
    """What tenacity's wait strategies read: the number of the attempt that failed."""
    state = tenacity.RetryCallState(_RETRYING, None, (), {})
    state.attempt_number = attempt
    return state


def _ids(transactions: pl.DataFrame) -> list[str]:
    return transactions.get_column("transaction_id").to_list()


def distinct_rows(
    transactions: pl.DataFrame, requests: pl.DataFrame, ids: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """The rows to send, with their request rows and ids: the last row of each id, in
    order (the same id twice in one request would be ambiguous). Found in Python on the
    ids the client already holds: a polars filter cost about 300 us per batch."""
    keep = latest_positions(ids)
    if keep is None:
        return transactions, requests, ids
    return transactions[keep], requests[keep], [ids[i] for i in keep]


def halves(
    transactions: pl.DataFrame, requests: pl.DataFrame
) -> tuple[tuple[pl.DataFrame, pl.DataFrame], tuple[pl.DataFrame, pl.DataFrame]]:
    """A batch cut in two, the request rows with their transactions."""
    middle = transactions.height // 2
    return (
        (transactions.slice(0, middle), requests.slice(0, middle)),
        (transactions.slice(middle), requests.slice(middle)),
    )


def request_target(url: str) -> str:
    """The path and query of `url`, as the request line names them."""
    parts = urlsplit(url)
    return urlunsplit(("", "", parts.path or "/", parts.query, ""))


def split_credentials(url: str) -> tuple[str, str | None]:
    """`http://user:pass@host/...` -> (`http://host/...`, "user:pass"): urllib3 does not
    turn credentials in a URL into a header, so the client sends them as Basic auth."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.netloc.rsplit("@", 1)[-1]
    auth = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), auth


def describe_transport_error(exc: BaseException) -> str:
    """urllib3 and socket errors as one readable line, without the request's body."""
    reason = getattr(exc, "reason", None)
    inner = reason if isinstance(reason, BaseException) else exc
    if isinstance(inner, urllib3.exceptions.NewConnectionError | ConnectionRefusedError) or (
        "Connection refused" in str(inner)
    ):
        return "connection refused"
    if isinstance(inner, urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    if isinstance(inner, urllib3.exceptions.ProtocolError):
        return "connection dropped: " + str(inner.args[0] if inner.args else inner)
    text = str(inner)
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__
