"""The contract's own protocol (`NativeCodec`), and `make_codec`, the codec of a setting.

One small codec per protocol (this one, `codecs_mlflow`, `codecs_v2`), each
standing on `library.score.protocol`. Everything else about scoring (pooling,
retries, bisection, concurrency) lives once in `library.score.client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
import polars as pl

from library.models import Prediction
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
        assert settings.model_version  # enforced by ScoringSettings
        mlflow: Codec = MlflowCodec(settings.model_version, settings.fraud_threshold)
        return mlflow
    if settings.protocol == "v2":
        assert settings.model_name  # enforced by ScoringSettings
        v2: Codec = V2Codec(settings.model_name, settings.model_version, settings.fraud_threshold)
        return v2
    return NativeCodec()
