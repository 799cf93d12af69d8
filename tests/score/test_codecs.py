"""The MLflow and Open Inference Protocol (v2) codecs, alone and against the real servers.

First the codecs as units: request bodies, positional answers, every malformed
answer. Then the real `batch-pipeline run` against a real `mlflow models serve`
and a real MLServer (both on loopback, from `.model-servers/`, built on first
use by tools/model_servers/build.py), serving one scikit-learn model trained
by tools/model_servers/train.py: a clean run, poison rows refused by the
servers themselves, a server killed and restarted mid-run, a repeated run.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
import urllib3

from library.contract import REQUIRED_COLUMNS
from library.models import Prediction, Predictions, RowChunk, SourceObject
from library.score.codec import NativeCodec
from library.score.codecs_mlflow import ROW_COLUMN, MlflowCodec
from library.score.codecs_v2 import V2Codec
from library.score.protocol import Codec, MalformedResponse
from library.stages.validate import validate_chunk
from tests.conftest import CLI, ROOT, Bucket, Database, free_port, run_cli
from tests.helpers.data import row, rows, to_csv
from tests.stages.test_validate import as_frame
from tools.model_servers.servers import (
    ModelServer,
    TrainedModels,
    ensure_venvs,
    mlflow_server,
    mlserver_server,
    train_models,
)

MLFLOW_VERSION = "fraud-mlflow-7"  # MLflow answers carry no version: MODEL_VERSION is stored
SERVER_TIMEOUT = pytest.mark.timeout(900)  # the first session builds the venvs (~2 min)


def typed(records: list[dict[str, str]]) -> pl.DataFrame:
    """Rows as the validator hands them to scoring (typed columns, line numbers)."""
    n = len(records)
    chunk = RowChunk(SourceObject("x", "v"), 0, as_frame(records), [""] * n, [], n + 1)
    valid = validate_chunk(chunk).valid
    assert valid.height == n
    return valid


def mlflow_answer(pairs: list[Any]) -> bytes:
    return orjson.dumps({"predictions": pairs})


def v2_answer(
    values: list[Any], n: int, *, version: str | None = "7", request_id: str | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "model_name": "fraud",
        "outputs": [{"name": "predict_proba", "shape": [n, 2], "datatype": "FP64", "data": values}],
    }
    if version is not None:
        doc["model_version"] = version
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


# -- MLflow codec -------------------------------------------------------------------------


def test_mlflow_request_is_dataframe_split_of_the_contract_columns_in_their_types() -> None:
    frame = typed(
        [
            row(1, amount="42.10", card_present="TRUE", account_id='acc "q",\nline'),
            row(2, event_time="2026-01-02T03:04:05.123+02:00", amount="7", card_present="0"),
        ]
    )
    codec = MlflowCodec("v1", 0.5)
    body = orjson.loads(codec.encode(frame, codec.prepare(frame)))
    assert list(body) == ["dataframe_split"]
    split = body["dataframe_split"]
    assert split["columns"] == list(REQUIRED_COLUMNS)
    first, second = (dict(zip(split["columns"], values, strict=True)) for values in split["data"])
    assert first["transaction_id"] == "tx-000001"
    assert first["event_time"] == "2026-01-02T01:01:00Z"
    assert first["account_id"] == 'acc "q",\nline'
    assert first["amount"] == 42.1 and isinstance(first["amount"], float)
    assert first["card_present"] is True
    assert second["event_time"] == "2026-01-02T01:04:05.123Z"  # UTC, ISO 8601
    assert second["amount"] == 7.0 and second["card_present"] is False
    # The request rows are the codec's own frame, beside the transactions, which keep
    # their columns.
    assert codec.prepare(frame).columns == [ROW_COLUMN]
    assert frame.columns == typed([row(1)]).columns


@pytest.mark.parametrize("codec", [MlflowCodec("v1", 0.5), V2Codec("fraud", None, 0.5)])
def test_any_text_is_sent_as_valid_json(codec: Codec) -> None:
    odd = 'Café "Ünï", Ltd.\ttab\x01 \u2028 😀 back\\slash'
    frame = typed([row(1, merchant_id=odd)])
    body = orjson.loads(codec.encode(frame, codec.prepare(frame)))
    sent = (
        body["dataframe_split"]["data"][0][3]
        if "dataframe_split" in body
        else body["inputs"][3]["data"][0]
    )
    assert sent == odd


def test_mlflow_prepared_rows_survive_slicing_for_bisection() -> None:
    codec = MlflowCodec("v1", 0.5)
    frame = typed(rows(10))
    requests = codec.prepare(frame)
    body = codec.encode(frame.slice(5, 5), requests.slice(5, 5))
    half = orjson.loads(body)["dataframe_split"]["data"]
    assert [r[0] for r in half] == [f"tx-{i:06d}" for i in range(5, 10)]


@pytest.mark.parametrize(
    ("predictions", "scores"),
    [
        ([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], [0.1, 0.8, 0.5]),  # predict_proba pairs
        ([0.1, 0.8, 0.5], [0.1, 0.8, 0.5]),  # a score per row
        ([[0.1], [0.8], [0.5]], [0.1, 0.8, 0.5]),  # a column vector
        ([[1, 0], [0, 1], [0.5, 0.5]], [0.0, 1.0, 0.5]),  # integers are numbers
    ],
)
def test_mlflow_answers_map_to_ids_by_position(predictions: list[Any], scores: list[float]) -> None:
    ids = ["tx-c", "tx-a", "tx-b"]  # not sorted: position, not order, decides
    got = MlflowCodec("v9", 0.5).decode(mlflow_answer(predictions), ids)
    assert list(got) == [
        Prediction("tx-c", scores[0], scores[0] >= 0.5, "v9"),
        Prediction("tx-a", scores[1], True, "v9"),
        Prediction("tx-b", 0.5, True, "v9"),  # at the threshold is fraud
    ]


def test_mlflow_threshold_and_bare_list_of_mlflow_1() -> None:
    got = MlflowCodec("v1", 0.9).decode(orjson.dumps([[0.2, 0.8], [0.05, 0.95]]), ["a", "b"])
    assert [(p.fraud_score, p.is_fraud) for p in got] == [(0.8, False), (0.95, True)]


MLFLOW_MALFORMED = [
    ("not JSON", b"<html>oops</html>", "not JSON"),
    ("empty body", b"", "not JSON"),
    ("no predictions key", b'{"outputs": [0.1, 0.2]}', "no predictions"),
    ("predictions not a list", b'{"predictions": {"0": 0.1}}', "not a list"),
    ("a string", b'"0.1"', "not a list"),
    ("too few", mlflow_answer([[0.9, 0.1]]), "expected 2 predictions, got 1"),
    ("too many", mlflow_answer([0.1, 0.2, 0.3]), "expected 2 predictions, got 3"),
    ("none", mlflow_answer([]), "expected 2 predictions, got 0"),
    ("triple", mlflow_answer([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]]), "list of 3"),
    ("empty row", mlflow_answer([[], []]), "list of 0"),
    ("mixed shapes", mlflow_answer([[0.9, 0.1], 0.2]), "another shape"),
    ("string score", mlflow_answer(["0.1", "0.2"]), "not a number"),
    ("boolean score", mlflow_answer([True, False]), "not a number"),
    ("null score", mlflow_answer([None, 0.2]), "not a number"),
    ("score above 1", mlflow_answer([[0.0, 1.5], [0.5, 0.5]]), "p_fraud of tx-1 is outside"),
    ("negative score", mlflow_answer([0.1, -0.2]), "fraud_score of tx-2 is outside"),
    ("p_legit not a number", mlflow_answer([["x", 0.1], [0.5, 0.5]]), "p_legit of tx-1"),
    ("NaN", b'{"predictions": [NaN, 0.1]}', "not JSON"),
    ("dict rows", mlflow_answer([{"0": 0.9, "1": 0.1}, {"0": 0.9, "1": 0.1}]), "not a number"),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in MLFLOW_MALFORMED], ids=[c[0] for c in MLFLOW_MALFORMED]
)
def test_mlflow_malformed_answers_raise(body: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message) as caught:
        MlflowCodec("v1", 0.5).decode(body, ["tx-1", "tx-2"])
    assert caught.value.status == 200


def native_answer(*items: Any, version: Any = "m1") -> bytes:
    return orjson.dumps({"model_version": version, "predictions": list(items)})


def native(tid: str, score: Any = 0.25, fraud: Any = False) -> dict[str, Any]:
    return {"transaction_id": tid, "fraud_score": score, "is_fraud": fraud}


def test_native_answer_in_any_order_becomes_columns() -> None:
    got = NativeCodec().decode(
        native_answer(native("tx-2", 0.75, True), native("tx-1", 0.0)), ["tx-1", "tx-2"]
    )
    assert got == Predictions(["tx-2", "tx-1"], [0.75, 0.0], [True, False], [(2, "m1")])
    # An integer score is a number: the row-by-row checks take it as a float.
    got = NativeCodec().decode(
        native_answer(native("tx-1", 1), native("tx-2", 0)), ["tx-1", "tx-2"]
    )
    assert got.scores == [1.0, 0.0] and all(type(s) is float for s in got.scores)


NATIVE_MALFORMED = [
    ("not an object", native_answer(native("tx-1"), 3), "a prediction is not a JSON object"),
    (
        "no id",
        native_answer(native("tx-1"), {"fraud_score": 0.1}),
        "unexpected transaction_id None",
    ),
    (
        "list id",
        native_answer(native("tx-1"), native(["tx-2"])),
        r"unexpected transaction_id \['tx-2'\]",
    ),
    (
        "unknown id",
        native_answer(native("tx-1"), native("tx-9")),
        "unexpected transaction_id 'tx-9'",
    ),
    ("twice", native_answer(native("tx-1"), native("tx-1")), "transaction_id tx-1 answered twice"),
    (
        "score above 1",
        native_answer(native("tx-1"), native("tx-2", 1.5)),
        "fraud_score of tx-2 is outside",
    ),
    (
        "string score",
        native_answer(native("tx-1", "0.1"), native("tx-2")),
        "fraud_score of tx-1 is not a number",
    ),
    (
        "boolean score",
        native_answer(native("tx-1"), native("tx-2", True)),
        "fraud_score of tx-2 is not a number",
    ),
    (
        "no score",
        native_answer(native("tx-1"), {"transaction_id": "tx-2", "is_fraud": False}),
        "fraud_score of tx-2 is not a number",
    ),
    (
        "flag not boolean",
        native_answer(native("tx-1"), native("tx-2", 0.1, 1)),
        "is_fraud of tx-2 is not a boolean",
    ),
    (
        "first error named",
        native_answer(native("tx-1", 2.0), native("tx-1")),
        "fraud_score of tx-1 is outside",
    ),
    ("no version", native_answer(native("tx-1"), native("tx-2"), version=""), "no model_version"),
    ("too few", native_answer(native("tx-1")), "expected 2 predictions, got 1"),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in NATIVE_MALFORMED], ids=[c[0] for c in NATIVE_MALFORMED]
)
def test_native_malformed_answers_name_the_first_bad_row(body: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message):
        NativeCodec().decode(body, ["tx-1", "tx-2"])


def test_merged_answers_keep_each_ones_model_version() -> None:
    merged = Predictions()
    merged.extend(Predictions.answer(["a", "b"], [0.1, 0.2], [False, False], "v1"))
    merged.extend(Predictions.answer(["c"], [0.9], [True], "v1"))
    merged.extend(Predictions.answer([], [], [], "v9"))  # an empty answer adds no version
    merged.extend(Predictions.answer(["d"], [0.3], [False], "v2"))
    assert merged.versions == [(3, "v1"), (1, "v2")] and merged.last_version == "v2"
    assert list(merged)[2:] == [Prediction("c", 0.9, True, "v1"), Prediction("d", 0.3, False, "v2")]
    assert Predictions.of(merged) == merged


def test_mlflow_needs_a_version() -> None:
    with pytest.raises(ValueError, match="version"):
        MlflowCodec("", 0.5)


# -- v2 codec -------------------------------------------------------------------------------


def test_v2_paths() -> None:
    codec = V2Codec("fraud", None, 0.5)
    assert codec.predict_path == "/v2/models/fraud/infer"
    assert codec.health_path == "/v2/models/fraud/ready"
    # MODEL_VERSION is the label stored when the server reports none, not a route.
    assert V2Codec("fraud", "3", 0.5).predict_path == "/v2/models/fraud/infer"
    assert V2Codec("a b/c", None, 0.5).predict_path == "/v2/models/a%20b%2Fc/infer"


def test_v2_request_has_one_typed_input_per_contract_column() -> None:
    frame = typed([row(1, amount="42.10", card_present="true"), row(2, card_present="false")])
    codec = V2Codec("fraud", None, 0.5)
    body = orjson.loads(codec.encode(frame, codec.prepare(frame)))
    assert body["parameters"] == {"content_type": "pd"}
    assert body["outputs"] == [{"name": "predict_proba"}]
    assert body["id"] == "tx-000001#2"
    assert [i["name"] for i in body["inputs"]] == list(REQUIRED_COLUMNS)
    inputs = {i["name"]: i for i in body["inputs"]}
    assert all(i["shape"] == [2] for i in inputs.values())
    assert {n: i["datatype"] for n, i in inputs.items() if i["datatype"] != "BYTES"} == {
        "amount": "FP64",
        "card_present": "BOOL",
    }
    assert inputs["amount"]["data"] == [42.1, 1 + 37 * 2 % 99999 / 100]
    assert inputs["card_present"]["data"] == [True, False]
    assert inputs["event_time"]["data"] == ["2026-01-02T01:01:00Z", "2026-01-03T02:02:00Z"]
    assert inputs["transaction_id"]["data"] == ["tx-000001", "tx-000002"]
    assert codec.prepare(frame).columns == ["event_time", "amount"]


def test_v2_answers_map_to_ids_by_position_with_the_servers_version() -> None:
    ids = ["tx-c", "tx-a", "tx-b"]
    flat = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5]
    got = V2Codec("fraud", "fallback", 0.5).decode(v2_answer(flat, 3, version="7"), ids)
    assert list(got) == [
        Prediction("tx-c", 0.1, False, "7"),
        Prediction("tx-a", 0.8, True, "7"),
        Prediction("tx-b", 0.5, True, "7"),
    ]
    nested = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]
    assert V2Codec("fraud", "fallback", 0.5).decode(v2_answer(nested, 3), ids) == got


@pytest.mark.parametrize(
    ("configured", "answered", "stored"),
    [("fallback", None, "fallback"), (None, None, "fraud"), (None, "", "fraud"), ("x", "2", "2")],
)
def test_v2_model_version_falls_back(
    configured: str | None, answered: str | None, stored: str
) -> None:
    [got] = V2Codec("fraud", configured, 0.3).decode(
        v2_answer([0.6, 0.4], 1, version=answered), ["a"]
    )
    assert got == Prediction("a", 0.4, True, stored)


def test_v2_echoed_request_id_is_checked() -> None:
    codec = V2Codec("fraud", None, 0.5)
    ok = codec.decode(v2_answer([0.6, 0.4], 1, request_id="tx-1#1"), ["tx-1"])
    assert ok.scores == [0.4]
    with pytest.raises(MalformedResponse, match="response id 'tx-9#1' is not the request's"):
        codec.decode(v2_answer([0.6, 0.4], 1, request_id="tx-9#1"), ["tx-1"])


def _v2(outputs: Any, **extra: Any) -> bytes:
    return orjson.dumps({"model_name": "fraud", "outputs": outputs, **extra})


def _proba(data: Any, shape: Any = (2, 2), name: str = "predict_proba") -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "datatype": "FP32", "data": data}


V2_MALFORMED = [
    ("not JSON", b"Internal Server Error", "not JSON"),
    ("a list", b"[0.1, 0.2]", "not a JSON object"),
    ("no outputs", b'{"model_name": "fraud"}', "no outputs list"),
    ("outputs not a list", _v2({"predict_proba": [0.1]}), "no outputs list"),
    ("other output", _v2([_proba([0, 1, 0, 1], name="predict")]), "0 'predict_proba' outputs"),
    ("two outputs", _v2([_proba([0.5] * 4), _proba([0.5] * 4)]), "2 'predict_proba' outputs"),
    ("shape [n]", _v2([_proba([0.1, 0.2], shape=[2])]), r"shape \[2\], expected \[2, 2\]"),
    ("shape [n, 1]", _v2([_proba([0.1, 0.2], shape=[2, 1])]), "expected"),
    ("shape of another n", _v2([_proba([0.5] * 6, shape=[3, 2])]), "expected"),
    ("no shape", _v2([{"name": "predict_proba", "data": [0.5] * 4}]), "shape None"),
    ("data not a list", _v2([_proba("0.5,0.5")]), "no data list"),
    ("too few values", _v2([_proba([0.5, 0.5, 0.5])]), "3 values for shape"),
    ("too many values", _v2([_proba([0.5] * 5)]), "5 values for shape"),
    ("nested triples", _v2([_proba([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]])]), "not pairs"),
    ("string value", _v2([_proba([0.5, "0.5", 0.5, 0.5])]), "p_fraud of tx-1 is not a number"),
    ("null value", _v2([_proba([None, 0.5, 0.5, 0.5])]), "p_legit of tx-1 is not a number"),
    ("above 1", _v2([_proba([0.5, 0.5, -1.0, 2.0])]), "p_legit of tx-2 is outside"),
    ("p_fraud above 1", _v2([_proba([0.5, 0.5, 0.0, 1.01])]), "p_fraud of tx-2 is outside"),
    ("boolean", _v2([_proba([False, True, False, True])]), "not a number"),
    ("wrong id", _v2([_proba([0.5] * 4)], id="other"), "response id 'other'"),
]


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in V2_MALFORMED], ids=[c[0] for c in V2_MALFORMED]
)
def test_v2_malformed_answers_raise(body: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message) as caught:
        V2Codec("fraud", None, 0.5).decode(body, ["tx-1", "tx-2"])
    assert caught.value.status == 200


def _fake_mlflow(body: bytes) -> bytes:
    """A server in miniature: p_fraud = amount / 1000, answered in request order."""
    split = orjson.loads(body)["dataframe_split"]
    amount = split["columns"].index("amount")
    return mlflow_answer([[1 - r[amount] / 1000, r[amount] / 1000] for r in split["data"]])


def _fake_v2(body: bytes) -> bytes:
    request = orjson.loads(body)
    amounts = next(i["data"] for i in request["inputs"] if i["name"] == "amount")
    flat = [v for a in amounts for v in (1 - a / 1000, a / 1000)]
    return v2_answer(flat, len(amounts), version="9", request_id=request["id"])


@pytest.mark.parametrize(
    ("codec", "server"),
    [(MlflowCodec("v1", 0.5), _fake_mlflow), (V2Codec("fraud", "v1", 0.5), _fake_v2)],
    ids=["mlflow", "v2"],
)
def test_round_trip_keeps_every_row_with_its_own_score(codec: Codec, server: Any) -> None:
    records = [row(i, amount=f"{i * 7 % 1000}.25") for i in range(100)]
    frame = typed(records)
    requests = codec.prepare(frame)
    for start, length in ((0, 100), (13, 50), (99, 1)):
        batch = frame.slice(start, length)
        ids = batch.get_column("transaction_id").to_list()
        got = codec.decode(server(codec.encode(batch, requests.slice(start, length))), ids)
        assert [p.transaction_id for p in got] == ids
        expected = [float(a) / 1000 for a in batch.get_column("amount").to_list()]
        assert [p.fraud_score for p in got] == pytest.approx(expected)
        assert [p.is_fraud for p in got] == [s >= 0.5 for s in expected]


# -- the real servers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedModels:
    ensure_venvs()
    models = train_models(tmp_path_factory.mktemp("models") / "fraud")
    assert models.auc > 0.75
    return models


@pytest.fixture(scope="session")
def real_servers(
    trained: TrainedModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ModelServer]]:
    workdir = tmp_path_factory.mktemp("servers")
    servers = {
        "mlflow": mlflow_server(trained.mlflow_model, free_port(), workdir / "mlflow"),
        "mlserver": mlserver_server(
            trained.mlserver_repository,
            trained.model_name,
            free_port(),
            free_port(),
            workdir / "mlserver",
        ),
    }
    try:
        for server in servers.values():
            server.spawn()  # both start at once
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(params=["mlflow", "mlserver"])
def server(request: pytest.FixtureRequest, real_servers: dict[str, ModelServer]) -> ModelServer:
    chosen = real_servers[request.param]
    chosen.ensure_running()  # a test that failed mid-restart leaves it running for the next
    return chosen


def protocol_env(
    server: ModelServer, trained: TrainedModels, cli_env: dict[str, str]
) -> tuple[dict[str, str], str]:
    """The run's environment for this server, and the model version it must store."""
    env = {**cli_env, "ML_API_URL": server.url}
    if server.kind == "mlflow":
        env.update(ML_API_PROTOCOL="mlflow", MODEL_VERSION=MLFLOW_VERSION)
        return env, MLFLOW_VERSION
    # The version the server reports wins over MODEL_VERSION (a fallback label).
    env.update(ML_API_PROTOCOL="v2", MODEL_NAME=trained.model_name, MODEL_VERSION="unused")
    return env, trained.model_version


def codec_for(server: ModelServer, trained: TrainedModels) -> Codec:
    if server.kind == "mlflow":
        return MlflowCodec(MLFLOW_VERSION, 0.5)
    return V2Codec(trained.model_name, None, 0.5)


PREDICTIONS = (
    "SELECT transaction_id, model_version, fraud_score, prediction FROM predictions ORDER BY 1"
)


@SERVER_TIMEOUT
def test_servers_answer_the_planted_pattern_alike(
    real_servers: dict[str, ModelServer], trained: TrainedModels
) -> None:
    """The same model behind both servers: the same scores, and the columns reach the
    model in their types (a card_present sent as text would score wrongly, silently)."""
    night_online = dict(
        event_time="2026-01-05T02:30:00Z", channel="online", card_present="false", country="FR"
    )
    day_pos = dict(event_time="2026-01-05T14:30:00Z", channel="pos", card_present="true")
    frame = typed(
        [
            row(1, merchant_category="jewelry", amount="2500.00", **night_online),
            row(2, merchant_category="grocery", amount="12.50", **day_pos),
            row(
                3,
                merchant_category="grocery",
                amount="12.50",
                **{**day_pos, "card_present": "false"},
            ),
        ]
    )
    http = urllib3.PoolManager()
    scores = {}
    for kind, srv in real_servers.items():
        srv.ensure_running()
        codec = codec_for(srv, trained)
        response = post_batch(http, srv, codec, frame)
        assert response.status == 200, response.data[:300]
        got = codec.decode(response.data, ["tx-000001", "tx-000002", "tx-000003"])
        scores[kind] = [p.fraud_score for p in got]
        if kind == "mlserver":
            assert {p.model_version for p in got} == {trained.model_version}
    assert scores["mlflow"] == pytest.approx(scores["mlserver"], abs=1e-9)
    risky, safe, card_absent = scores["mlflow"]
    assert risky > 0.5 > safe
    assert card_absent > safe * 1.5  # the boolean reached the model as a boolean


def post_batch(
    http: urllib3.PoolManager, srv: ModelServer, codec: Any, frame: pl.DataFrame
) -> urllib3.BaseHTTPResponse:
    """One request, by hand: the codec's body, the server's answer as it comes."""
    return http.request(
        "POST",
        srv.url + codec.predict_path,
        body=codec.encode(frame, codec.prepare(frame)),
        headers={"Content-Type": "application/json"},
    )


@SERVER_TIMEOUT
def test_each_server_refuses_a_poison_transaction_with_its_own_400(
    real_servers: dict[str, ModelServer], trained: TrainedModels
) -> None:
    frame = typed([row(1, merchant_category=trained.poison_category)])
    http = urllib3.PoolManager()
    for srv in real_servers.values():
        srv.ensure_running()
        codec = codec_for(srv, trained)
        response = post_batch(http, srv, codec, frame)
        assert response.status == 400, (srv.kind, response.status, response.data[:300])
        error = orjson.loads(response.data)
        text = error.get("error") or error.get("message")
        assert text, error
        if srv.kind == "mlserver":
            assert "unknown categories ['crypto_atm']" in text


@SERVER_TIMEOUT
def test_clean_run_scores_every_row(
    server: ModelServer,
    trained: TrainedModels,
    bucket: Bucket,
    cli_env: dict[str, str],
    database: Database,
) -> None:
    env, version = protocol_env(server, trained, cli_env)
    bucket.put("in/a.csv", to_csv(rows(250)))
    result = run_cli(["run", "--source", bucket.uri("in/")], env)
    assert result.code == 0, result.output
    assert "Pipeline complete: 250 processed, 0 failed, 0 invalid" in result.stderr
    predictions = database.rows(PREDICTIONS)
    assert len(predictions) == 250
    assert {p[1] for p in predictions} == {version}
    assert all(0 <= p[2] <= 1 and p[3] == (p[2] >= 0.5) for p in predictions)
    assert len({p[2] for p in predictions}) > 20  # the model tells rows apart
    assert database.value("SELECT count(*) FROM failed_transactions") == 0
    assert database.rows(
        "SELECT status, rows_read, rows_valid, rows_scored, rows_failed FROM pipeline_runs"
    ) == [("completed", 250, 250, 250, 0)]


@SERVER_TIMEOUT
def test_check_asks_each_real_server_for_a_test_prediction(
    server: ModelServer, trained: TrainedModels, bucket: Bucket, cli_env: dict[str, str]
) -> None:
    env, version = protocol_env(server, trained, cli_env)
    bucket.put("in/a.csv", to_csv(rows(3)))
    result = run_cli(["check", "--source", bucket.uri("in/")], env)
    assert result.code == 0, result.output
    [model] = [line for line in result.stdout.splitlines() if line.split()[1] == "model"]
    protocol = "mlflow" if server.kind == "mlflow" else "v2"
    assert model.startswith(f"ok    model       {server.url} ({protocol}): ready; test prediction")
    assert model.endswith(f"model_version {version}")


@SERVER_TIMEOUT
def test_poison_rows_fail_alone_through_the_servers_own_400(
    server: ModelServer,
    trained: TrainedModels,
    bucket: Bucket,
    cli_env: dict[str, str],
    database: Database,
) -> None:
    env, version = protocol_env(server, trained, cli_env)
    poison = {57, 180}
    records = [
        row(i, merchant_category=trained.poison_category) if i in poison else row(i)
        for i in range(250)
    ]
    bucket.put("in/a.csv", to_csv(records))
    result = run_cli(["run", "--source", bucket.uri("in/"), "--max-failed-ratio", "0.05"], env)
    assert result.code == 3, result.output
    assert "Pipeline complete: 248 processed, 2 failed, 0 invalid" in result.stderr
    failed = database.rows(
        "SELECT transaction_id, http_status, attempts, reason FROM failed_transactions ORDER BY 1"
    )
    assert [(f[0], f[1], f[2]) for f in failed] == [("tx-000057", 400, 1), ("tx-000180", 400, 1)]
    assert all("HTTP 400" in f[3] for f in failed)
    predictions = database.rows(PREDICTIONS)
    assert len(predictions) == 248 and {p[1] for p in predictions} == {version}
    assert not {p[0] for p in predictions} & {"tx-000057", "tx-000180"}
    assert database.value("SELECT count(*) FROM transactions") == 250


@SERVER_TIMEOUT
def test_server_killed_and_restarted_mid_run_loses_no_row(
    server: ModelServer,
    trained: TrainedModels,
    bucket: Bucket,
    cli_env: dict[str, str],
    database: Database,
) -> None:
    env, version = protocol_env(server, trained, cli_env)
    total = 3000
    bucket.put("in/a.csv", to_csv(rows(total)))
    env.update(
        SOURCE_URI=bucket.uri("in/"),
        API_BATCH_SIZE="10",  # 300 requests...
        API_RATE_LIMIT="40",  # ...over about 8 s, so that the kill lands mid-run
        API_MAX_WORKERS="2",
        API_MAX_RETRIES="60",  # about 30 s of retries: MLflow's restart takes 5-12 s
        API_RETRY_BACKOFF="0.2",
        API_RETRY_BACKOFF_MAX="1",
        PROGRESS="off",
    )
    before = server.requests_seen()
    with subprocess.Popen(
        [*CLI, "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as run:
        deadline = time.monotonic() + 60
        while server.requests_seen() - before < 40 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before the server could be killed"
        server.kill()
        killed_at = server.requests_seen()
        time.sleep(0.5)
        restart = server.start()
        stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stdout + stderr
    assert server.requests_seen() > killed_at + 10, "no request after the restart"
    assert "ML API request failed" in stderr  # the outage was seen, and bridged
    assert f"Pipeline complete: {total} processed, 0 failed, 0 invalid" in stderr
    assert (
        database.value("SELECT count(*) FROM predictions WHERE model_version = %s", [version])
        == total
    )
    assert database.value("SELECT count(*) FROM failed_transactions") == 0
    assert restart < 60


@SERVER_TIMEOUT
def test_repeated_run_leaves_predictions_identical(
    server: ModelServer,
    trained: TrainedModels,
    bucket: Bucket,
    cli_env: dict[str, str],
    database: Database,
) -> None:
    env, _ = protocol_env(server, trained, cli_env)
    records = [*rows(120), row(7, amount="999.99", merchant_category="electronics")]  # a duplicate
    bucket.put("in/a.csv", to_csv(records))
    first = run_cli(["run", "--source", bucket.uri("in/")], env)
    assert first.code == 0, first.output
    before = database.rows(PREDICTIONS)
    again = run_cli(["run", "--source", bucket.uri("in/"), "--reprocess"], env)
    assert again.code == 0, again.output
    assert database.rows(PREDICTIONS) == before
    assert len(before) == 120
    assert database.value("SELECT count(*) FROM pipeline_runs") == 2


def test_real_server_helpers_pick_free_loopback_ports(tmp_path: Path) -> None:
    srv = mlflow_server(tmp_path / "model", 12345, tmp_path)
    assert srv.url == "http://127.0.0.1:12345"
    assert srv.command[srv.command.index("-h") + 1] == "127.0.0.1"
    assert "local" in srv.command and srv.env["PATH"].startswith(str(ROOT / ".model-servers"))
    mls = mlserver_server(tmp_path, "fraud", 1, 2, tmp_path)
    assert mls.env["MLSERVER_HOST"] == "127.0.0.1" and mls.ready_path == "/v2/models/fraud/ready"
    assert mls.env["MLSERVER_METRICS_ENDPOINT"] == ""
