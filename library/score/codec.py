"""The contract's own protocol (`NativeCodec`), and `make_codec`, the codec of a setting.

One small codec per protocol (this one, `codecs_mlflow`, `codecs_v2`), each
standing on `library.score.protocol`. Everything else about scoring (pooling,
retries, bisection, concurrency) lives once in `library.score.client`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson
import polars as pl

from library.models import Predictions
from library.score.codecs_mlflow import MlflowCodec
from library.score.codecs_v2 import V2Codec
from library.score.protocol import EVENT_TIME_FORMAT, Codec, MalformedResponse, check_score

if TYPE_CHECKING:
    from library.config import ScoringSettings

PAYLOAD_COLUMN = "payload"  # the request rows' one column: each row's JSON object


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


class NativeCodec:
    """The contract's protocol: POST /predict {"transactions": [...]}."""

    predict_path = "/predict"
    health_path = "/health"

    def prepare(self, transactions: pl.DataFrame) -> pl.DataFrame:
        return transactions.select(contract_records().alias(PAYLOAD_COLUMN))

    def encode(self, transactions: pl.DataFrame, requests: pl.DataFrame) -> bytes:
        rows = requests.get_column(PAYLOAD_COLUMN).to_list()
        return ('{"transactions":[' + ",".join(rows) + "]}").encode()

    def decode(self, body: bytes, sent_ids: list[str]) -> Predictions:
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
        # The usual answer, checked over whole columns in C (comprehensions, set
        # equality, min/max): a check per row in Python was most of decode's CPU.
        # Anything off goes to `_checked`, the row-by-row checks in answer order, so
        # that the error named is the first one, in the same words.
        try:
            ids = [item["transaction_id"] for item in items]
            scores = [item["fraud_score"] for item in items]
            flags = [item["is_fraud"] for item in items]
            usual = (
                # Answered in the order sent (the ids sent are distinct), else as a set.
                (ids == sent_ids or (len(set(ids)) == len(ids) and set(ids) == set(sent_ids)))
                and (not items or _usual_scores(scores))
                and set(map(type, flags)) <= {bool}
            )
        except (TypeError, KeyError):  # an item not an object, a key missing, a list id
            usual = False
        if not usual:
            ids, scores, flags = _checked(items, sent_ids)
        return Predictions.answer(ids, scores, flags, version)


def _usual_scores(scores: list[Any]) -> bool:
    """Every score a float in [0, 1]: NaN, which fails no min/max, makes the sum NaN."""
    return (
        set(map(type, scores)) == {float}
        and min(scores) >= 0.0
        and max(scores) <= 1.0
        and math.isfinite(sum(scores))
    )


def _checked(items: list[Any], sent_ids: list[str]) -> tuple[list[str], list[float], list[bool]]:
    """The answer's columns, each row checked in turn: MalformedResponse names the first
    row that breaks the contract."""
    expected = set(sent_ids)
    seen: set[str] = set()
    ids: list[str] = []
    scores: list[float] = []
    flags: list[bool] = []
    for item in items:
        if type(item) is not dict:
            raise MalformedResponse("a prediction is not a JSON object", status=200)
        tid = item.get("transaction_id")
        if type(tid) is not str or tid not in expected:
            raise MalformedResponse(f"unexpected transaction_id {tid!r}", status=200)
        if tid in seen:
            raise MalformedResponse(f"transaction_id {tid} answered twice", status=200)
        seen.add(tid)
        score = item.get("fraud_score")
        if type(score) is not float or not 0.0 <= score <= 1.0:
            score = check_score(score, tid)
        is_fraud = item.get("is_fraud")
        if type(is_fraud) is not bool:
            raise MalformedResponse(f"is_fraud of {tid} is not a boolean", status=200)
        ids.append(tid)
        scores.append(score)
        flags.append(is_fraud)
    return ids, scores, flags


def make_codec(settings: ScoringSettings) -> Codec:
    """The codec of ML_API_PROTOCOL."""
    if settings.protocol == "mlflow":
        assert settings.model_version  # enforced by ScoringSettings
        mlflow: Codec = MlflowCodec(settings.model_version, settings.fraud_threshold)
        return mlflow
    if settings.protocol == "v2":
        assert settings.model_name  # enforced by ScoringSettings
        v2: Codec = V2Codec(settings.model_name, settings.model_version, settings.fraud_threshold)
        return v2
    return NativeCodec()
