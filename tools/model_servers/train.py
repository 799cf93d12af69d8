"""Train a small fraud model and save it for MLflow and for MLServer.

    .model-servers/mlflow/bin/python tools/model_servers/train.py OUT_DIR [--rows N]

Run it with the mlflow venv's Python (tools/model_servers/build.py makes it). It
writes

    OUT_DIR/mlflow/              an MLflow model: `mlflow models serve -m OUT_DIR/mlflow`
    OUT_DIR/mlserver/            an MLServer repository: `mlserver start OUT_DIR/mlserver`
                                 (settings.json, and fraud/ with model-settings.json,
                                 model.joblib and runtime.py)
    OUT_DIR/metrics.json         held-out AUC, the model's version and categories

The training rows are generated with a planted fraud pattern (night hours,
online, card absent, large amounts, risky categories, foreign countries), from a
fixed seed: the same command gives the same model. The model is a scikit-learn
Pipeline that reads the contract's columns by name, with its own encoding:
log(amount), the hour of the day read from the ISO `event_time` string, one-hot channel and
country (unknown values ignored), card_present as 0/1, and one-hot
merchant_category with `handle_unknown="error"`: a category it never saw (for
example `crypto_atm`) makes predict raise, which is how a "poison" transaction
is refused by the real servers (see POISON_CATEGORY).

Every step is a scikit-learn estimator or a NumPy function, so the pickled model
needs no code of this file to load (MLServer's joblib.load, MLflow's skops).

MLServer's stock `mlserver_sklearn.SKLearnModel` answers HTTP 500 (plain text)
for any exception the model raises, which a client must treat as transient. The
MLServer repository therefore uses a four-line subclass (`runtime.py`, written
next to the model; MLServer puts the model folder on sys.path) that turns a
ValueError of the model into MLServer's own `InferenceError`, an HTTP 400 with a
JSON error, as MLflow's scoring server does on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, SplineTransformer

SEED = 20260111
MODEL_NAME = "fraud"
MODEL_VERSION = "fraud-sk-1"
COLUMNS = (
    "transaction_id",
    "event_time",
    "account_id",
    "merchant_id",
    "merchant_category",
    "amount",
    "currency",
    "country",
    "channel",
    "card_present",
)
CATEGORIES = (
    "grocery",
    "travel",
    "electronics",
    "fuel",
    "restaurants",
    "pharmacy",
    "jewelry",
    "gift_cards",
)
RISKY_CATEGORIES = ("electronics", "jewelry", "gift_cards")
POISON_CATEGORY = "crypto_atm"  # valid per the contract, never seen in training: refused
COUNTRIES = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "CA")
CURRENCIES = {"US": "USD", "GB": "GBP", "CA": "CAD"}
CHANNELS = ("online", "pos", "atm")
EVENT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # what the pipeline's codecs send

RUNTIME_SOURCE = '''"""MLServer's scikit-learn runtime, answering 400 when the model refuses its input."""

from mlserver.errors import InferenceError
from mlserver_sklearn import SKLearnModel


class RefusingSKLearnModel(SKLearnModel):
    """A ValueError of the model (an unknown category, say) is the request's fault:
    MLServer's own InferenceError makes it an HTTP 400 instead of a 500."""

    async def predict(self, payload):
        try:
            return await super().predict(payload)
        except ValueError as exc:
            raise InferenceError(f"the model refused the input: {exc}") from None
'''


def generate(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """`n` contract rows and their fraud labels, drawn from a planted pattern."""
    rng = np.random.default_rng(seed)
    country = rng.choice(COUNTRIES, n, p=[0.45, 0.1, 0.1, 0.1, 0.07, 0.07, 0.06, 0.05])
    channel = rng.choice(CHANNELS, n, p=[0.45, 0.45, 0.10])
    card_present = (channel == "pos") & (rng.random(n) < 0.9)
    category = rng.choice(CATEGORIES, n)
    amount = np.clip(np.round(rng.lognormal(3.3, 1.1, n), 2), 0.01, 99_999.99)
    hour = rng.integers(0, 24, n)
    start = np.datetime64("2026-01-01T00:00:00")
    seconds = rng.integers(0, 28 * 86_400, n) // 86_400 * 86_400 + hour * 3600
    seconds += rng.integers(0, 3600, n)
    event_time = pd.Series(start + seconds.astype("timedelta64[s]")).dt.strftime(EVENT_TIME_FORMAT)
    logit = (
        -5.0
        + 1.3 * (channel == "online")
        + 1.0 * ~card_present
        + 0.9 * (np.log(amount) - 3.3)
        + 1.6 * (hour < 5)
        + 1.3 * np.isin(category, RISKY_CATEGORIES)
        + 0.8 * (country != "US")
    )
    label = rng.random(n) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame(
        {
            "transaction_id": [f"train-{i:07d}" for i in range(n)],
            "event_time": event_time.astype(str),
            "account_id": [f"acc-{a:05d}" for a in rng.integers(0, 50_000, n)],
            "merchant_id": [f"m-{m:04d}" for m in rng.integers(0, 5_000, n)],
            "merchant_category": category.astype(str),
            "amount": amount.astype("float64"),
            "currency": [CURRENCIES.get(c, "EUR") for c in country],
            "country": country.astype(str),
            "channel": channel.astype(str),
            "card_present": card_present.astype(bool),
        },
        columns=list(COLUMNS),
    )
    return frame, label.astype(int)


def build_pipeline() -> Pipeline:
    hour = Pipeline(
        [
            # "2026-01-11T10:00:00.000000Z" -> "2026-01-11T10" -> hours since 1970 -> the
            # hour of the day as 24 periodic indicators; NumPy and scikit-learn only.
            ("hour_text", FunctionTransformer(np.asarray, kw_args={"dtype": "U13"})),
            ("hours", FunctionTransformer(np.asarray, kw_args={"dtype": "datetime64[h]"})),
            ("number", FunctionTransformer(np.asarray, kw_args={"dtype": "float64"})),
            (
                "of_day",
                SplineTransformer(
                    knots=np.arange(25.0).reshape(-1, 1), degree=1, extrapolation="periodic"
                ),
            ),
        ]
    )
    features = ColumnTransformer(
        [
            ("amount", FunctionTransformer(np.log1p), ["amount"]),
            ("hour", hour, ["event_time"]),
            (
                "category",
                OneHotEncoder(categories=[list(CATEGORIES)], handle_unknown="error"),
                ["merchant_category"],
            ),
            (
                "place",
                OneHotEncoder(
                    categories=[list(CHANNELS), list(COUNTRIES)], handle_unknown="ignore"
                ),
                ["channel", "country"],
            ),
            (
                "card",
                FunctionTransformer(np.asarray, kw_args={"dtype": "float64"}),
                ["card_present"],
            ),
        ],
        remainder="drop",
        sparse_threshold=0.0,
    )
    return Pipeline([("features", features), ("model", LogisticRegression(max_iter=1000))])


def save_mlflow(model: Pipeline, sample: pd.DataFrame, folder: Path) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network but the registries
    import mlflow.sklearn
    import scipy
    import sklearn
    import skops.io
    from mlflow.models import infer_signature

    signature = infer_signature(sample, model.predict_proba(sample))
    # skops refuses to load what it does not know; the NumPy functions above are ours to trust.
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    mlflow.sklearn.save_model(
        model,
        str(folder),
        signature=signature,
        pyfunc_predict_fn="predict_proba",
        skops_trusted_types=trusted,
        # Spelled out: MLflow would otherwise infer them, slowly, from whatever project
        # (uv.lock, pyproject.toml) the current directory belongs to.
        pip_requirements=[
            f"scikit-learn=={sklearn.__version__}",
            f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}",
            f"scipy=={scipy.__version__}",
            f"skops=={skops.__version__}",
        ],
    )


def save_mlserver(model: Pipeline, repository: Path) -> None:
    import joblib

    folder = repository / MODEL_NAME
    folder.mkdir(parents=True)
    joblib.dump(model, folder / "model.joblib")
    (folder / "runtime.py").write_text(RUNTIME_SOURCE)
    settings = {
        "name": MODEL_NAME,
        "implementation": "runtime.RefusingSKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": MODEL_VERSION},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    # Server-wide: inference in the server process. The default (one worker process)
    # needs uvloop<0.22 and costs an extra process and a hop per request.
    (repository / "settings.json").write_text(json.dumps({"parallel_workers": 0}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the fraud model for MLflow and MLServer.")
    parser.add_argument("out", type=Path, help="output folder (replaced)")
    parser.add_argument("--rows", type=int, default=20_000, help="training + held-out rows")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    frame, label = generate(args.rows, SEED)
    cut = int(len(frame) * 0.75)
    model = build_pipeline()
    model.fit(frame.iloc[:cut], label[:cut])
    auc = float(roc_auc_score(label[cut:], model.predict_proba(frame.iloc[cut:])[:, 1]))
    print(f"held-out AUC {auc:.3f} on {len(frame) - cut} rows (fraud rate {label.mean():.3f})")
    if auc < 0.75:
        print("the model does not beat chance clearly: refusing to save it", file=sys.stderr)
        return 1

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_mlflow(model, frame.iloc[:5], out / "mlflow")
    save_mlserver(model, out / "mlserver")
    metrics = {
        "auc": round(auc, 4),
        "rows": args.rows,
        "fraud_rate": round(float(label.mean()), 4),
        "model_name": MODEL_NAME,
        "model_version": MODEL_VERSION,
        "categories": list(CATEGORIES),
        "poison_category": POISON_CATEGORY,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {out}/mlflow and {out}/mlserver in {time.perf_counter() - began:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
