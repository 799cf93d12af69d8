"""Score stage: one pooled keep-alive HTTP client for the model API.

`ScoringClient.score(batch)` never raises for a problem with the request: every
transaction comes back either predicted or failed, with the reason and the
attempts made. What it does, in order:

* Every attempt waits for a slot of the `Limiter` (adaptive concurrency, the
  shared Retry-After pause, the optional rate limit).
* Transient failures (connection errors, timeouts, 408, 425, 429, 5xx, a
  malformed answer) are retried with tenacity: exponential backoff with full
  jitter, `Retry-After` honoured, at most API_MAX_RETRIES retries.
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
* An outage is not a reason to fail rows: a batch that has used its retries
  while no request at all has succeeded since it started keeps probing, at the
  longest backoff, until the service answers again. Once every request has
  failed for API_DOWN_TIMEOUT seconds, the breaker opens: all workers stop and
  the run ends failed (exit 1), its unscored rows unwritten so that the next
  run reads them again. A batch that fails while the service answers others is
  different: its transactions become failed rows that `retry-failed` can score
  later.

Every third-party exception (urllib3, sockets) is classified here, once.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit, urlunsplit

import polars as pl
import tenacity
import urllib3

from library.config import redact_url
from library.errors import (
    ApiError,
    ApiUnavailableError,
    PipelineError,
    RejectedBatchError,
    TransientApiError,
)
from library.models import Failure, Prediction, ScoreResult
from library.score.codec import Codec, MalformedResponse
from library.score.concurrency import Limiter, Outcome

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
REJECTED_STATUSES = frozenset({400, 413, 422})
MAX_BODY_IN_REASON = 300


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


def classify_response(
    status: int, body: bytes, headers: urllib3.HTTPHeaderDict, url: str
) -> ApiError:
    snippet = body[:MAX_BODY_IN_REASON].decode("utf-8", "replace").strip()
    if status == 400 and b"is not ready yet" in body:
        # MLServer answers 400 "Model X is not ready yet" while a model (re)loads.
        return TransientApiError(f"HTTP {status} {snippet}".rstrip(), status)
    if status in TRANSIENT_STATUSES:
        retry_after = (
            retry_after_seconds(headers.get("Retry-After")) if status in (429, 503) else None
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
        self._pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=pool_size,
            block=True,  # never more connections than workers
            retries=False,  # tenacity decides
            timeout=urllib3.Timeout(total=timeout),
            headers=headers,
        )

    # -- lifecycle -------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop retrying and refuse new batches (interrupt, or the run is failing)."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        self._stop.set()

    def close(self) -> None:
        self._pool.clear()

    def check_ready(self) -> None:
        """GET the health endpoint once; raise ApiUnavailableError unless it answers 2xx."""
        url = self.base_url + self.codec.health_path
        try:
            response = self._pool.request("GET", url, timeout=urllib3.Timeout(total=10))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiUnavailableError(
                f"cannot reach the ML API at {redact_url(url)}: {describe_transport_error(exc)}; "
                "check ML_API_URL and that the service is running"
            ) from None
        if not 200 <= response.status < 300:
            raise ApiUnavailableError(
                f"the ML API at {redact_url(url)} is not ready: HTTP {response.status}"
            )

    # -- scoring ---------------------------------------------------------------

    def prepare(self, chunk: pl.DataFrame) -> pl.DataFrame:
        """Encode a whole chunk's requests at once (see Codec.prepare)."""
        return self.codec.prepare(chunk)

    def score(self, batch: pl.DataFrame) -> ScoreResult:
        """Score one batch; every transaction ends predicted or failed."""
        ids = batch.get_column("transaction_id").to_list()
        if len(set(ids)) < len(ids):
            # The same id twice in one request would be ambiguous: send the latest row.
            batch = batch.unique(subset=["transaction_id"], keep="last", maintain_order=True)
        result = ScoreResult()
        self._score_into(batch, result)
        return result

    def _score_into(self, batch: pl.DataFrame, result: ScoreResult, retry: bool = True) -> None:
        ids = batch.get_column("transaction_id").to_list()
        attempts = 0
        try:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(TransientApiError),
                stop=self._give_up if retry else tenacity.stop_after_attempt(1),
                wait=self._wait,
                sleep=self._sleep,
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts > 1:
                        with self.stats.lock:
                            self.stats.retries += 1
                        if self.stats.on_retry:
                            self.stats.on_retry()
                        result.retries += 1
                    result.requests += 1
                    result.predictions.extend(self._post(batch, ids))
        except RejectedBatchError as exc:
            if len(ids) == 1:
                result.failures.append(Failure(ids[0], str(exc), exc.status, attempts))
                return
            middle = len(ids) // 2
            self._score_into(batch.slice(0, middle), result, retry)
            self._score_into(batch.slice(middle), result, retry)
        except TransientApiError as exc:
            if self._stop.is_set():
                raise ScoringStopped(self._stop_reason or str(exc)) from None
            if exc.status == 500 and len(ids) > 1:
                middle = len(ids) // 2
                self._score_into(batch.slice(0, middle), result, retry=False)
                self._score_into(batch.slice(middle), result, retry=False)
                return
            reason = f"ML API failed after {attempts} attempts: {exc}"
            result.failures.extend(Failure(tid, reason, exc.status, attempts) for tid in ids)

    def _post(self, batch: pl.DataFrame, ids: list[str]) -> list[Prediction]:
        if self._stop.is_set():
            raise ScoringStopped(self._stop_reason or "scoring stopped")
        body = self.codec.encode(batch)
        with self.limiter.slot() as report:
            if self._stop.is_set():
                raise ScoringStopped(self._stop_reason or "scoring stopped")
            began = time.perf_counter()
            try:
                response = self._pool.request("POST", self.url, body=body)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                latency = time.perf_counter() - began
                self.stats.record("error", latency)
                report(Outcome.OVERLOAD, latency)
                transport = TransientApiError(describe_transport_error(exc))
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

    def _in_outage_since(self, started: float) -> bool:
        """True when no request at all has succeeded since `started`."""
        with self._lock:
            return self._last_success is None or self._last_success < started

    def _give_up(self, state: tenacity.RetryCallState) -> bool:
        if self._stop.is_set():
            return True
        if state.attempt_number < self.max_retries + 1:
            return False
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, MalformedResponse) or (isinstance(exc, ApiError) and exc.status == 500):
            return True  # the service answers, but not for this batch: not an outage
        # During an outage keep probing (the breaker ends it); otherwise this batch fails.
        return not self._in_outage_since(state.start_time)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        if state.attempt_number > self.max_retries:
            return self._backoff_max  # probing an outage
        exc = state.outcome.exception() if state.outcome else None
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

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        if state.attempt_number > self.max_retries:
            log.warning(
                "ML API still failing (attempt %d, no request has succeeded since this batch "
                "started): %s; probing again in %.1fs (stops after API_DOWN_TIMEOUT=%gs)",
                state.attempt_number,
                exc,
                delay,
                self.down_timeout,
            )
            return
        log.warning(
            "ML API request failed (attempt %d of %d): %s; retrying in %.1fs",
            state.attempt_number,
            self.max_retries + 1,
            exc,
            delay,
        )


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
