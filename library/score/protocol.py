"""What every codec shares: the Codec protocol, the answer checks, the time format.

The codecs (`codec.py` for the contract's own protocol, `codecs_mlflow.py`,
`codecs_v2.py`) stand on this module and on nothing of each other; the factory
(`codec.make_codec`) imports them. A codec raises `MalformedResponse` for any
answer that does not account for every transaction sent exactly once with a
score in [0, 1]: the contract makes that a failure of the whole request, never a
partial write.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import orjson
import polars as pl

from library.errors import TransientApiError
from library.models import Predictions

EVENT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"


class MalformedResponse(TransientApiError):
    """The answer does not match the request; retried like a transient failure."""


class Codec(Protocol):
    predict_path: str
    health_path: str

    def prepare(self, transactions: pl.DataFrame) -> pl.DataFrame:
        """The requests' rows, aligned with `transactions` (row i prepares row i): the
        vectorised work of a whole chunk, done once before it is cut into batches.
        Whatever cuts the transactions cuts these rows alike (`WorkUnit`, bisection)."""
        ...

    def encode(self, transactions: pl.DataFrame, requests: pl.DataFrame) -> bytes:
        """One request body: `requests` is `prepare`'s output for exactly these rows."""
        ...

    def decode(self, body: bytes, sent_ids: list[str]) -> Predictions:
        """The answer's predictions; `sent_ids` are the ids sent, in order, each once (the
        client never sends an id twice: `distinct_rows`). MalformedResponse unless every
        id sent is answered exactly once."""
        ...


def check_score(value: Any, tid: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedResponse(f"fraud_score of {tid} is not a number", status=200)
    score = float(value)
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise MalformedResponse(f"fraud_score of {tid} is outside [0, 1]: {value}", status=200)
    return score


def probability(value: Any, what: str, tid: str) -> float:
    """A probability in [0, 1], or MalformedResponse naming what and whose it is."""
    try:
        return check_score(value, tid)
    except MalformedResponse as exc:
        raise MalformedResponse(str(exc).replace("fraud_score", what, 1), status=200) from None


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        snippet = body[:80].decode("utf-8", "replace")
        raise MalformedResponse(f"response is not JSON ({exc}): {snippet!r}", status=200) from None
