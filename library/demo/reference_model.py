"""The reference model service: the contract's protocol with deterministic scores.

For the demo, the tests, docker-compose and the benchmark. It must never be the
bottleneck, so it answers keep-alive HTTP/1.1 with TCP_NODELAY (Python's stock
server otherwise stalls every keep-alive response for 40 ms: Nagle plus delayed
ACK) and encodes with orjson.

The score is a fixed logistic function of the transaction's features (amount,
channel, card presence, hour, merchant category) plus a small jitter derived
from its id: the same transaction always gets the same score.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from library.contract import REQUIRED_COLUMNS

log = logging.getLogger(__name__)

MODEL_VERSION = "reference-2026.01"
REQUIRED_FIELDS = REQUIRED_COLUMNS  # the contract's columns, each a field of a request
RISKY_CATEGORIES = frozenset({"electronics", "gift_cards", "jewelry", "crypto", "travel"})
FRAUD_THRESHOLD = 0.5
MAX_BODY_BYTES = 64 * 1024 * 1024


class RequestRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def fraud_score(tx: dict[str, Any]) -> float:
    amount = float(tx["amount"])
    event_time = str(tx["event_time"])
    hour = int(event_time[11:13]) if len(event_time) >= 13 and event_time[11:13].isdigit() else 12
    z = -4.2 + 0.42 * math.log1p(max(amount, 0.0))
    z += 1.1 if tx["channel"] == "online" else 0.0
    z += 0.9 if not tx["card_present"] else 0.0
    z += 1.0 if hour < 6 else 0.0
    z += 0.7 if tx["merchant_category"] in RISKY_CATEGORIES else 0.0
    jitter = (zlib.crc32(str(tx["transaction_id"]).encode()) % 1000) / 1000.0 - 0.5
    z += jitter
    return round(1.0 / (1.0 + math.exp(-z)), 6)


def check_transaction(tx: Any, index: int) -> None:
    if not isinstance(tx, dict):
        raise RequestRejected(400, f"transactions[{index}] is not an object")
    missing = [f for f in REQUIRED_FIELDS if f not in tx]
    if missing:
        raise RequestRejected(422, f"transactions[{index}] lacks {', '.join(missing)}")
    amount = tx["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        raise RequestRejected(422, f"transactions[{index}].amount is not a number")
    if not isinstance(tx["card_present"], bool):
        raise RequestRejected(422, f"transactions[{index}].card_present is not a boolean")
    if not isinstance(tx["transaction_id"], str):
        raise RequestRejected(422, f"transactions[{index}].transaction_id is not a string")


def predict(body: bytes, model_version: str = MODEL_VERSION) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestRejected(400, f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("transactions"), list):
        raise RequestRejected(400, 'body must be {"transactions": [...]}')
    predictions = []
    for i, tx in enumerate(doc["transactions"]):
        check_transaction(tx, i)
        score = fraud_score(tx)
        predictions.append(
            {
                "transaction_id": tx["transaction_id"],
                "fraud_score": score,
                "is_fraud": score >= FRAUD_THRESHOLD,
            }
        )
    return {"model_version": model_version, "predictions": predictions}


class ModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms stall per response
    server_version = "batch-pipeline-reference-model"
    model_version = MODEL_VERSION
    latency = 0.0  # seconds added to every /predict, to mimic a remote model
    capacity: int | None = None  # answer 429 while more requests than this are in flight
    _in_flight = 0
    _lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def send_json(
        self, status: int, payload: Any, extra_headers: dict[str, str] | None = None
    ) -> None:
        body = orjson.dumps(payload)
        self.send_raw(status, body, "application/json", extra_headers)

    def send_raw(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestRejected(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        if self.path in ("/health", "/ping"):
            self.send_json(200, {"status": "ok", "model_version": self.model_version})
        else:
            self.send_json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        try:
            body = self.read_body()
        except (ValueError, RequestRejected) as exc:
            self.send_json(413, {"error": str(exc)})
            self.close_connection = True
            return
        if self.path != "/predict":
            self.send_json(404, {"error": f"no route {self.path}"})
            return
        self.handle_predict(body)

    def handle_predict(self, body: bytes) -> None:
        cls = type(self)
        with cls._lock:
            cls._in_flight += 1
            crowded = cls.capacity is not None and cls._in_flight > cls.capacity
        try:
            if crowded:
                self.send_json(429, {"error": f"over capacity ({cls.capacity} requests in flight)"})
                return
            if self.latency:
                time.sleep(self.latency)
            try:
                self.send_json(200, predict(body, self.model_version))
            except RequestRejected as exc:
                self.send_json(exc.status, {"error": str(exc)})
        finally:
            with cls._lock:
                cls._in_flight -= 1


def make_server(
    host: str = "127.0.0.1", port: int = 0, handler: type[ModelHandler] = ModelHandler
) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(host: str, port: int, latency_ms: float = 0.0, capacity: int | None = None) -> None:
    handler = type(
        "ConfiguredModelHandler",
        (ModelHandler,),
        {
            "latency": latency_ms / 1000.0,
            "capacity": capacity,
            "_lock": threading.Lock(),
            "_in_flight": 0,
        },
    )
    server = make_server(host, port, handler)
    address = server.server_address
    log.info(
        "reference model %s listening on http://%s:%s (latency %g ms, capacity %s)",
        MODEL_VERSION,
        address[0],
        address[1],
        latency_ms,
        capacity or "unlimited",
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
