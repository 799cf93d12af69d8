"""One stage alone, in its own process, for the benchmark.

    python -m bench.stages score   # the valid rows through the scoring client, nothing written
    python -m bench.stages write   # already-scored rows through the sink, no API call
    python -m bench.stages cpu     # each stage's CPU alone, one thread: the breakdown

Both first read, validate and prepare the whole input (not timed), the way a run
does, then time only their stage, with the run's settings from the environment.
Prints one JSON line: rows, seconds, cpu_seconds (`cpu`: seconds of CPU by stage).
"""

from __future__ import annotations

import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import orjson

from library.config import Settings, load_settings
from library.demo.reference_model import FRAUD_THRESHOLD, MODEL_VERSION, fraud_score
from library.jobs.flow import make_client, prepare_units
from library.jobs.reading import ObjectReader
from library.models import Prediction, Predictions, PreparedChunk, ScoreResult, WorkUnit
from library.score.client import ScoringClient, distinct_rows
from library.score.protocol import EVENT_TIME_FORMAT
from library.stages import source
from library.stages.batching import plan_units
from library.stages.sink import FlushBuffer, PreparedFlush, Sink
from library.stages.source import s3_client_for
from library.stages.validate import validate_chunk
from library.state.ledger import Ledger


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_units(settings: Settings, client: ScoringClient) -> list[WorkUnit]:
    """The whole input read, validated and prepared as a run does (ObjectReader,
    prepare_units), as work units."""
    assert settings.source.uri
    s3 = s3_client_for(settings.source)
    reader = ObjectReader.from_settings(settings.source, s3)
    units: list[WorkUnit] = []
    for obj in source.list_objects(settings.source.uri, s3):
        for chunk in reader.chunks(obj):
            units.extend(
                prepare_units(
                    chunk, client, Sink, settings.scoring.batch_size, len(units), chunk.index
                )
            )
    return units


def score() -> dict[str, float]:
    settings = load_settings()
    client = make_client(settings.scoring)
    units = [u for u in load_units(settings, client) if u.transactions.height]
    rows = sum(u.transactions.height for u in units)
    began, cpu0 = time.perf_counter(), cpu()
    with ThreadPoolExecutor(settings.scoring.max_workers) as pool:
        results = list(pool.map(lambda u: client.score(u.transactions, u.requests), units))
    seconds, cpu_seconds = time.perf_counter() - began, cpu() - cpu0
    scored = sum(len(r.predictions) for r in results)
    return {"rows": rows, "scored": scored, "seconds": seconds, "cpu_seconds": cpu_seconds}


def local_scores(unit: WorkUnit) -> ScoreResult:
    """What the reference model would answer, computed here: the sink is timed alone."""
    rows = unit.transactions.select(
        "transaction_id",
        unit.transactions["event_time"].dt.strftime(EVENT_TIME_FORMAT),
        unit.transactions["amount"].cast(float),
        "merchant_category",
        "channel",
        "card_present",
    ).to_dicts()
    seen: dict[str, Prediction] = {}
    for r in rows:
        s = fraud_score(r)
        seen[r["transaction_id"]] = Prediction(
            r["transaction_id"], s, s >= FRAUD_THRESHOLD, MODEL_VERSION
        )
    return ScoreResult(predictions=Predictions.of(seen.values()))


def write() -> dict[str, float]:
    settings = load_settings()
    url = settings.database_url
    assert url
    units = load_units(settings, make_client(settings.scoring))
    results = [local_scores(u) for u in units]
    rows = sum(u.rows for u in units)
    ledger = Ledger(url, settings.sink.retry_timeout)
    run_id = ledger.start_run(datetime.now(), settings.source.uri, {})
    sink = Sink(url, run_id, settings.sink.row_batch_size, settings.sink.retry_timeout)
    began, cpu0 = time.perf_counter(), cpu()
    current = None
    for unit, result in zip(units, results, strict=True):
        if unit.obj != current:
            if current is not None:
                sink.end_object(current)
            claim = ledger.claim(run_id, unit.obj)
            sink.begin_object(unit.obj, 1, None, claim.fence)
            current = unit.obj
        sink.add(unit, result)
    if current is not None:
        sink.end_object(current)
    sink.flush()
    seconds, cpu_seconds = time.perf_counter() - began, cpu() - cpu0
    sink.close()
    ledger.close()
    return {
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "flushes": sink.run.flushes,
    }


def breakdown() -> dict[str, float]:
    """The CPU of each stage of a run, each taken alone on this one thread, over the
    whole input: read (CSV to text columns), validate, encode request (the request
    JSON per chunk and the bodies), decode response, prepare COPY (the COPY line
    columns per chunk and each flush's text). The model's answers are fetched
    beforehand (not timed): decoding is timed on the very bytes a run decodes."""
    import urllib3

    settings = load_settings()
    assert settings.source.uri
    client = make_client(settings.scoring)
    codec = client.codec
    s3 = s3_client_for(settings.source)
    spent = dict.fromkeys(
        ("read", "validate", "encode_request", "decode_response", "prepare_copy"), 0.0
    )

    def timed(name: str, began: float) -> float:
        now = time.thread_time()
        spent[name] += now - began
        return now

    chunks = []
    for obj in source.list_objects(settings.source.uri, s3):
        with source.open_text(obj, s3) as (text, _):
            reader = source.read_chunks(
                obj,
                text,
                settings.source.row_batch_size,
                max_quoted_field_chars=settings.source.max_quoted_field_chars,
            )
            while True:
                began = time.thread_time()
                chunk = next(reader, None)
                timed("read", began)
                if chunk is None:
                    break
                chunks.append(chunk)
    rows = sum(c.rows_read for c in chunks)
    units: list[WorkUnit] = []
    for number, chunk in enumerate(chunks):
        began = time.thread_time()
        validated = validate_chunk(chunk)
        began = timed("validate", began)
        requests = client.prepare(validated.valid)
        began = timed("encode_request", began)
        copy_lines = Sink.prepare_copy_lines(validated.valid)
        timed("prepare_copy", began)
        prepared = PreparedChunk(validated, requests, copy_lines)
        units.extend(plan_units(prepared, settings.scoring.batch_size, len(units), number))
    chunks.clear()
    http = urllib3.PoolManager()
    results: list[ScoreResult] = []
    for unit in units:
        if not unit.transactions.height:
            results.append(ScoreResult())
            continue
        batch, requests = unit.transactions, unit.requests
        began = time.thread_time()
        # As the client does: the latest row of an id.
        batch, requests, ids = distinct_rows(
            batch, requests, batch.get_column("transaction_id").to_list()
        )
        body = codec.encode(batch, requests)
        timed("encode_request", began)
        answer = http.request(
            "POST", client.url, body=body, headers={"Content-Type": "application/json"}
        ).data
        began = time.thread_time()
        results.append(ScoreResult(predictions=codec.decode(answer, ids)))
        timed("decode_response", began)
    buffer = FlushBuffer()
    for unit, result in zip(units, results, strict=True):
        buffer.units.append((unit, result))
        buffer.rows += unit.rows
        if buffer.rows >= settings.sink.row_batch_size:
            began = time.thread_time()
            PreparedFlush.build(buffer, None, 0)
            timed("prepare_copy", began)
            buffer = FlushBuffer()
    if buffer.units:
        began = time.thread_time()
        PreparedFlush.build(buffer, None, 0)
        timed("prepare_copy", began)
    return {"rows": rows, **spent}


if __name__ == "__main__":
    stage = sys.argv[1]
    out = {"score": score, "write": write, "cpu": breakdown}[stage]()
    print(orjson.dumps(out).decode())
