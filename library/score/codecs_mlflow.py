"""The MLflow scoring server's protocol (`mlflow models serve`): POST /invocations.

Request (`dataframe_split`, the contract's ten columns in order, in their
contract types: event_time as an ISO 8601 string in UTC, amount a JSON number,
card_present a JSON boolean):

    {"dataframe_split": {"columns": ["transaction_id", ..., "card_present"],
                         "data": [["tx-1", "2026-01-11T10:00:00Z", ..., 42.17, ..., true], ...]}}

Answer, positional (row i answers the i-th row sent); MLflow carries no model
version, so the one configured (MODEL_VERSION) is stored:

    {"predictions": [0.03, ...]}                          a fraud score per row
    {"predictions": [[0.97, 0.03], ...]}                  [p_legit, p_fraud] per row: what
                                                          a scikit-learn model saved with
                                                          pyfunc_predict_fn="predict_proba" gives

A bare list (MLflow 1.x) is read the same way. `is_fraud` is
`p_fraud >= FRAUD_THRESHOLD`. Anything else (a count that differs from the rows
sent, a row of another shape, a non-number, a score outside [0, 1], a body that
is not JSON) raises `MalformedResponse`.

Speed: `prepare` encodes each row's JSON array once per chunk, with polars
expressions over the whole chunk (as NativeCodec does); `encode` only joins a
batch's rows (about 6 us per 100-row batch).
"""

from __future__ import annotations

from typing import Any

import orjson
import polars as pl

from library.contract import REQUIRED_COLUMNS
from library.models import Predictions
from library.score.protocol import EVENT_TIME_FORMAT, MalformedResponse, load_json, probability

ROW_COLUMN = "row"  # the request rows' one column: each row's JSON array


def contract_values() -> list[pl.Expr]:
    """The contract's columns in order, typed as the protocols send them."""
    typed = {
        "event_time": pl.col("event_time").dt.strftime(EVENT_TIME_FORMAT),
        "amount": pl.col("amount").cast(pl.Float64),
    }
    return [typed.get(name, pl.col(name)).alias(name) for name in REQUIRED_COLUMNS]


def json_value(expr: pl.Expr) -> pl.Expr:
    """Each value of `expr` as JSON text (`"tx-1"`, `42.17`, `true`), with polars'
    own encoder: strings escaped, numbers and booleans as JSON writes them."""
    return pl.struct(expr.alias("v")).struct.json_encode().str.slice(len('{"v":')).str.head(-1)


def json_row() -> pl.Expr:
    """Each row as a JSON array of the contract's values, in column order."""
    parts: list[pl.Expr] = [pl.lit("[")]
    for i, value in enumerate(contract_values()):
        if i:
            parts.append(pl.lit(","))
        parts.append(json_value(value))
    parts.append(pl.lit("]"))
    return pl.concat_str(parts)


class MlflowCodec:
    """`mlflow models serve`: POST /invocations with `dataframe_split`; GET /ping."""

    predict_path = "/invocations"
    health_path = "/ping"

    def __init__(self, model_version: str, threshold: float) -> None:
        if not model_version:
            raise ValueError("MlflowCodec needs a model version: MLflow's answers carry none")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.model_version = model_version
        self.threshold = threshold
        columns = orjson.dumps(list(REQUIRED_COLUMNS)).decode()
        self._head = '{"dataframe_split":{"columns":' + columns + ',"data":['

    def prepare(self, transactions: pl.DataFrame) -> pl.DataFrame:
        return transactions.select(json_row().alias(ROW_COLUMN))

    def encode(self, transactions: pl.DataFrame, requests: pl.DataFrame) -> bytes:
        rows = requests.get_column(ROW_COLUMN).to_list()
        return (self._head + ",".join(rows) + "]}}").encode()

    def decode(self, body: bytes, sent_ids: list[str]) -> Predictions:
        doc = load_json(body)
        if isinstance(doc, dict):
            if "predictions" not in doc:
                keys = ", ".join(sorted(map(str, doc)))[:200]
                raise MalformedResponse(f"response has no predictions (keys: {keys})", status=200)
            items = doc["predictions"]
        else:
            items = doc  # MLflow 1.x answered a bare list
        if not isinstance(items, list):
            raise MalformedResponse(
                f"predictions is a {type(items).__name__}, not a list", status=200
            )
        if len(items) != len(sent_ids):
            raise MalformedResponse(
                f"expected {len(sent_ids)} predictions, got {len(items)}", status=200
            )
        width = _width(items[0], sent_ids[0]) if items else 0
        threshold, version = self.threshold, self.model_version
        scores: list[float] = []
        for tid, item in zip(sent_ids, items, strict=True):
            if _width(item, tid) != width:
                raise MalformedResponse(
                    f"prediction of {tid} has another shape than the first: {_short(item)}",
                    status=200,
                )
            if width == 2:
                probability(item[0], "p_legit", tid)
                score = probability(item[1], "p_fraud", tid)
            elif width == 1:
                score = probability(item[0], "fraud_score", tid)
            else:
                score = probability(item, "fraud_score", tid)
            scores.append(score)
        return Predictions.answer(list(sent_ids), scores, [s >= threshold for s in scores], version)


def _width(item: Any, tid: str) -> int:
    """0 for a bare score, else the length of the row: 1 ([score]) or 2 ([p_legit, p_fraud])."""
    if not isinstance(item, list):
        return 0
    if len(item) not in (1, 2):
        raise MalformedResponse(
            f"prediction of {tid} is a list of {len(item)}, expected a score or "
            f"[p_legit, p_fraud]: {_short(item)}",
            status=200,
        )
    return len(item)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
