"""A model server with failure knobs, speaking the contract's protocol on 127.0.0.1.

It serves real HTTP from a thread of the test process, so the pipeline under
test (often a subprocess) talks to it over a real socket. Knobs are set per
test; every request is recorded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from library.demo.reference_model import ModelHandler, RequestRejected, make_server, predict


@dataclass
class Knobs:
    fail_times: int = 0  # answer the next N predict requests with fail_status
    fail_status: int = 503
    retry_after: str | None = None  # header sent with fail_status
    poison_ids: set[str] = field(default_factory=set)  # any request holding one -> poison_status
    poison_status: int = 422
    poison_error: str = "cannot score {id}"  # the error body's message ({id}: the poisoned id)
    malformed_times: int = 0  # answer the next N requests with a malformed body
    malformed_kind: str = "not_json"  # not_json | missing_id | extra_id | bad_score | no_version
    hang_times: int = 0  # the next N requests sleep hang_seconds before answering
    hang_seconds: float = 0.0
    always_status: int | None = None  # answer every request with this status
    model_version: str = "fake-1.0"
    delay_seconds: float = 0.0  # added to every predict request
    max_in_flight: int | None = None  # answer 429 while more requests than this are being served


@dataclass
class Recorded:
    size: int
    status: int
    ids: list[str]


class FakeModel:
    def __init__(self) -> None:
        self.knobs = Knobs()
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        fake = self

        class Handler(ModelHandler):
            def handle_predict(self, body: bytes) -> None:
                fake.handle(self, body)

        self.server = make_server("127.0.0.1", 0, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _take(self, name: str) -> bool:
        with self.lock:
            left = getattr(self.knobs, name)
            if left > 0:
                setattr(self.knobs, name, left - 1)
                return True
            return False

    def predict_requests(self) -> list[Recorded]:
        with self.lock:
            return list(self.requests)

    def handle(self, handler: ModelHandler, body: bytes) -> None:
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            crowded = (
                self.knobs.max_in_flight is not None and self.in_flight > self.knobs.max_in_flight
            )
        try:
            if crowded:
                with self.lock:
                    self.requests.append(Recorded(0, 429, []))
                handler.send_json(429, {"error": "too many requests in flight"})
                return
            self._handle(handler, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _handle(self, handler: ModelHandler, body: bytes) -> None:
        k = self.knobs
        try:
            doc = orjson.loads(body)
            ids = [t.get("transaction_id") for t in doc.get("transactions", [])]
        except Exception:
            ids = []
        status, payload, headers = self._decide(body, ids)
        with self.lock:
            self.requests.append(Recorded(len(ids), status, ids))
        if k.delay_seconds:
            time.sleep(k.delay_seconds)
        if isinstance(payload, bytes):
            handler.send_raw(status, payload, extra_headers=headers)
        else:
            handler.send_json(status, payload, headers)

    def _decide(self, body: bytes, ids: list[Any]) -> tuple[int, Any, dict[str, str]]:
        k = self.knobs
        if k.always_status is not None:
            return k.always_status, {"error": "configured to fail"}, {}
        if self._take("hang_times"):
            time.sleep(k.hang_seconds)
        if self._take("fail_times"):
            headers = {"Retry-After": k.retry_after} if k.retry_after else {}
            return k.fail_status, {"error": "try again"}, headers
        poisoned = sorted(set(ids) & k.poison_ids)
        if poisoned:
            return k.poison_status, {"error": k.poison_error.replace("{id}", poisoned[0])}, {}
        try:
            answer = predict(body, k.model_version)
        except RequestRejected as exc:
            return exc.status, {"error": str(exc)}, {}
        if self._take("malformed_times"):
            return 200, self._malformed(answer), {}
        return 200, answer, {}

    def _malformed(self, answer: dict[str, Any]) -> Any:
        kind = self.knobs.malformed_kind
        preds = answer["predictions"]
        if kind == "not_json":
            return b"<html>502 Bad Gateway</html>"
        if kind == "missing_id":
            return {**answer, "predictions": preds[1:]}
        if kind == "extra_id":
            extra = {"transaction_id": "not-sent", "fraud_score": 0.5, "is_fraud": False}
            return {**answer, "predictions": [*preds[1:], extra]}
        if kind == "bad_score":
            return {**answer, "predictions": [{**preds[0], "fraud_score": 1.5}, *preds[1:]]}
        if kind == "no_version":
            return {"predictions": preds}
        raise ValueError(kind)
