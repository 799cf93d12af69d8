"""Codecs: a batch of transactions -> request body, response body -> predictions.

One small codec per protocol. Everything else about scoring (pooling, retries,
bisection, concurrency) lives once in `library.score.client`. A codec raises
`MalformedResponse` for any answer that does not account for every transaction
sent exactly once with a score in [0, 1]: the contract makes that a failure of
the whole request, never a partial write.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import polars as pl

from library.errors import TransientApiError
from library.models import Prediction

if TYPE_CHECKING:
    from library.config import ScoringSettings

EVENT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"
PAYLOAD_COLUMN = "_payload"  # each row's request JSON, encoded once per chunk


class MalformedResponse(TransientApiError):
    """The answer does not match the request; retried like a transient failure."""


class Codec(Protocol):
    predict_path: str
    health_path: str

    def prepare(self, chunk: pl.DataFrame) -> pl.DataFrame:
        """Vectorised work for a whole chunk, done once before it is cut into batches."""
        ...

    def encode(self, batch: pl.DataFrame) -> bytes: ...

    def decode(self, body: bytes, sent_ids: list[str]) -> list[Prediction]: ...


def contract_records() -> pl.Expr:
    """Each row as the contract's JSON object, encoded by polars in one pass."""
    return pl.struct(
        pl.col("transaction_id"),
        pl.col("event_time").dt.strftime(EVENT_TIME_FORMAT),
        pl.col("account_id"),
        pl.col("merchant_id"),
        pl.col("merchant_category"),
        pl.col("amount").cast(pl.Float64),
        pl.col("currency"),
        pl.col("country"),
        pl.col("channel"),
        pl.col("card_present"),
    ).struct.json_encode()


def check_score(value: Any, tid: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedResponse(f"fraud_score of {tid} is not a number", status=200)
    score = float(value)
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise MalformedResponse(f"fraud_score of {tid} is outside [0, 1]: {value}", status=200)
    return score


class NativeCodec:
    """The contract's protocol: POST /predict {"transactions": [...]}."""

    predict_path = "/predict"
    health_path = "/health"

    def prepare(self, chunk: pl.DataFrame) -> pl.DataFrame:
        return chunk.with_columns(contract_records().alias(PAYLOAD_COLUMN))

    def encode(self, batch: pl.DataFrame) -> bytes:
        if PAYLOAD_COLUMN not in batch.columns:
            batch = self.prepare(batch)
        rows = batch.get_column(PAYLOAD_COLUMN).to_list()
        return ('{"transactions":[' + ",".join(rows) + "]}").encode()

    def decode(self, body: bytes, sent_ids: list[str]) -> list[Prediction]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedResponse(f"response is not JSON: {exc}", status=200) from None
        if not isinstance(doc, dict):
            raise MalformedResponse("response is not a JSON object", status=200)
        version = doc.get("model_version")
        items = doc.get("predictions")
        if not isinstance(version, str) or not version:
            raise MalformedResponse("response has no model_version", status=200)
        if not isinstance(items, list):
            raise MalformedResponse("response has no predictions list", status=200)
        if len(items) != len(sent_ids):
            raise MalformedResponse(
                f"expected {len(sent_ids)} predictions, got {len(items)}", status=200
            )
        expected = set(sent_ids)
        seen: set[str] = set()
        out: list[Prediction] = []
        add, append = seen.add, out.append
        for item in items:
            if type(item) is not dict:
                raise MalformedResponse("a prediction is not a JSON object", status=200)
            tid = item.get("transaction_id")
            if type(tid) is not str or tid not in expected:
                raise MalformedResponse(f"unexpected transaction_id {tid!r}", status=200)
            if tid in seen:
                raise MalformedResponse(f"transaction_id {tid} answered twice", status=200)
            add(tid)
            score = item.get("fraud_score")
            # The usual answer, a float in [0, 1] (NaN fails the comparison), checked
            # inline: a call per row was a tenth of the scoring thread's CPU.
            if type(score) is not float or not 0.0 <= score <= 1.0:
                score = check_score(score, tid)
            is_fraud = item.get("is_fraud")
            if type(is_fraud) is not bool:
                raise MalformedResponse(f"is_fraud of {tid} is not a boolean", status=200)
            append(Prediction(tid, score, is_fraud, version))
        return out


def make_codec(settings: ScoringSettings) -> Codec:
    """The codec of ML_API_PROTOCOL."""
    if settings.protocol == "mlflow":
        from library.score.codecs_mlflow import MlflowCodec

        assert settings.model_version  # enforced by ScoringSettings
        mlflow: Codec = MlflowCodec(settings.model_version, settings.fraud_threshold)
        return mlflow
    if settings.protocol == "v2":
        from library.score.codecs_v2 import V2Codec

        assert settings.model_name  # enforced by ScoringSettings
        v2: Codec = V2Codec(settings.model_name, settings.model_version, settings.fraud_threshold)
        return v2
    return NativeCodec()
