"""Seeing what a run does: progress, structured logs, metrics, stage times."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLI, ROOT, S3_SECRET, Bucket, Database, free_port, run_cli, wait_http
from tests.helpers.data import row, rows, to_csv
from tests.helpers.fake_model import FakeModel


@pytest.fixture
def slow_env(bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel) -> dict[str, str]:
    """A run long enough to report progress: ~1.5 s of scoring."""
    fake_model.knobs.delay_seconds = 0.02
    bucket.put("in/a.csv", to_csv(rows(1500)))
    bucket.put("in/b.csv", to_csv([*rows(1500, start=2000), row(9999, amount="-1")]))
    return {
        **cli_env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "API_BATCH_SIZE": "50",
        "API_MAX_WORKERS": "2",
        "API_CONCURRENCY": "fixed",
        "PROGRESS_INTERVAL": "0.3",
    }


def test_progress_lines_when_not_a_terminal(slow_env: dict[str, str]) -> None:
    result = run_cli(["run"], {**slow_env, "PROGRESS": "auto"})
    assert result.code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if " - Progress: " in line]
    assert len(lines) >= 2
    assert re.search(
        r"Progress: \d+% of rows done, ETA \d:\d\d:\d\d; \d/2 objects, [\d.]+ of [\d.]+ MB, "
        r"[\d,]+ rows read \([\d,]+ rows/s\), [\d,]+ scored, \d+ failed, \d+ invalid",
        lines[-1],
    ), lines[-1]


def test_progress_off_prints_no_progress(slow_env: dict[str, str]) -> None:
    result = run_cli(["run", "--progress", "off"], slow_env)
    assert result.code == 3
    assert "Progress:" not in result.stderr


def run_on_a_terminal(env: dict[str, str], columns: int) -> tuple[int, str]:
    """The real CLI on a pty `columns` wide; its whole output, as the terminal got it."""
    import fcntl
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**env, "PROGRESS": "auto", "COLUMNS": str(columns), "TERM": "xterm"}
    proc = subprocess.Popen(
        [*CLI, "run"], cwd=ROOT, env=env, stdin=secondary, stdout=secondary, stderr=secondary
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        output += data
    proc.wait(60)
    os.close(primary)
    return proc.returncode, output.decode("utf-8", "replace")


def test_a_live_bar_on_a_terminal_does_not_garble_log_lines(slow_env: dict[str, str]) -> None:
    code, text = run_on_a_terminal(slow_env, 200)
    assert code == 3, text
    assert "2/2 objects" in text and "3,001 rows" in text and "ETA" in text  # the bar
    assert " - Progress: " not in text  # a bar, not log lines
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    # Log lines printed during the bar come out whole, each on its own line.
    for expected in (
        "- INFO - Pipeline Run ID: batch_",
        "- INFO - Pipeline complete: 3000 processed",
    ):
        [line] = [line for line in plain.splitlines() if expected in line]
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - INFO - ", line.strip()), line


def test_the_bar_fits_80_columns_with_the_eta_first_and_log_lines_unwrapped(
    slow_env: dict[str, str],
) -> None:
    code, text = run_on_a_terminal(slow_env, 80)
    assert code == 3, text
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    bars = [line for line in plain.splitlines() if re.match(r"^ *(\d+|\?)% ETA ", line)]
    assert bars, plain
    assert all(len(line.rstrip()) <= 80 for line in bars), [len(b) for b in bars]
    assert re.match(r"^100% ETA 0:00:00 +━+ 3,001 rows · 3,000 scored · 0 failed · 1 in", bars[-1])
    # A log line longer than the terminal is one line, left to the terminal to wrap.
    [done] = [line for line in plain.splitlines() if "- INFO - Pipeline complete: 3000" in line]
    batches = [line for line in plain.splitlines() if " - INFO - Batch " in line]
    assert batches and all(line.rstrip().endswith(".csv") for line in batches)
    assert max(len(line) for line in batches) > 80
    assert done.rstrip().endswith("invalid")


def test_eta_follows_rows_done_against_rows_expected() -> None:
    from library.models import Counts
    from library.observability.progress import LiveState, describe, snapshot

    state = LiveState(objects_total=3, bytes_total=3_000_000)
    state.started -= 10  # 10 s into the run
    state.skip_object(1_000_000)  # completed already: neither its bytes nor its rows count
    state.bytes_finished += 1_000_000  # half of what is to be read is read: 40,000 rows
    state.rows_read = 40_000
    s = snapshot(state, Counts(read=20_000))  # 20,000 rows written in 10 s
    assert s["rows_expected"] == 80_000 and s["rows_done"] == 20_000
    assert s["percent"] == 25.0
    assert s["eta_seconds"] == 30  # 60,000 rows left at 2,000 rows/s
    assert describe(s).startswith("25% of rows done, ETA 0:00:30; 1/3 objects, 1.9 of 2.9 MB")
    # Everything read (the bytes say 100%) but a quarter not yet written: the ETA is not 0.
    state.bytes_finished = 3_000_000
    state.rows_read = 80_000
    s = snapshot(state, Counts(read=60_000))
    assert s["rows_expected"] == 80_000 and s["percent"] == 75.0 and s["eta_seconds"] >= 3


def test_json_logs_carry_run_object_batch_and_stage(
    slow_env: dict[str, str], fake_model: FakeModel
) -> None:
    fake_model.knobs.fail_times, fake_model.knobs.fail_status = 1, 503
    result = run_cli(["run"], {**slow_env, "LOG_FORMAT": "json", "PROGRESS": "log"})
    assert result.code == 3, result.output
    records = [json.loads(line) for line in result.stderr.splitlines()]
    run_id = next(r["run_id"] for r in records if "run_id" in r)
    started = next(i for i, r in enumerate(records) if r["message"].startswith("Pipeline Run ID"))
    assert all(r.get("run_id") == run_id for r in records[started:])
    [warning] = [r for r in records if r["level"] == "WARNING"]
    assert warning["object"].startswith("s3://") and isinstance(warning["batch"], int)
    assert warning["stage"] == "score"
    progress = [r for r in records if r.get("stage") == "progress"]
    assert progress and {"rows_read", "scored", "eta_seconds", "bytes_total"} <= set(
        progress[-1]["progress"]
    )


def test_text_warnings_name_the_run_object_and_batch(
    slow_env: dict[str, str], fake_model: FakeModel
) -> None:
    fake_model.knobs.fail_times, fake_model.knobs.fail_status = 1, 503
    result = run_cli(["run"], slow_env)
    [warning] = [line for line in result.stderr.splitlines() if " - WARNING - " in line]
    assert re.search(
        r"\[run batch_\d{8}_\d{6}(_\d+)?, object s3://[^,]+/in/a\.csv, batch \d+\]$", warning
    ), warning


def test_no_secret_in_any_line(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel
) -> None:
    token = "tok-9f8e7d6c"
    url_secret = "urlpw-5a4b3c"
    host = fake_model.url.removeprefix("http://")
    fake_model.knobs.fail_times, fake_model.knobs.fail_status = 2, 503
    bucket.put("in/a.csv", to_csv([*rows(30), row(99, amount="-2")]))
    env = {
        **cli_env,
        "ML_API_URL": f"http://svc:{url_secret}@{host}",
        "ML_API_TOKEN": token,
        "SOURCE_URI": bucket.uri("in/"),
        "LOG_LEVEL": "DEBUG",
        "MAX_INVALID_RATIO": "1",
    }
    outputs = [run_cli(["run"], env), run_cli(["run", "--log-format", "json", "--reprocess"], env)]
    outputs.append(run_cli(["run"], {**env, "ML_API_URL": f"http://svc:{url_secret}@127.0.0.1:9"}))
    outputs.append(run_cli(["status"], env))
    for result in outputs:
        for secret in (token, url_secret, S3_SECRET):
            assert secret not in result.output
    assert outputs[0].code == 3 and outputs[2].code == 1


def metric(
    families: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float | None:
    return families.get(name, {}).get(tuple(sorted(labels.items())))


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("job", "instance")}
            out.setdefault(sample.name, {})[tuple(sorted(labels.items()))] = sample.value
    return out


def test_metrics_textfile_keeps_the_last_success_through_a_failed_run(
    bucket: Bucket, cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "textfile" / "batch_pipeline.prom"
    bucket.put("in/a.csv", to_csv([*rows(40), row(90, amount="-1")]))
    env = {
        **cli_env,
        "SOURCE_URI": bucket.uri("in/"),
        "METRICS_TEXTFILE": str(path),
        "MAX_INVALID_RATIO": "1",
    }
    assert run_cli(["run"], env).code == 3
    first = parse(path.read_text())
    assert metric(first, "batch_pipeline_rows_total", outcome="read") == 41
    assert metric(first, "batch_pipeline_rows_total", outcome="invalid") == 1
    assert metric(first, "batch_pipeline_rows_total", outcome="scored") == 40
    assert metric(first, "batch_pipeline_run_status", status="completed_with_errors") == 1
    assert metric(first, "batch_pipeline_api_requests_total", status="200") == 1
    success = metric(first, "batch_pipeline_last_success_timestamp_seconds")
    assert success and abs(success - time.time()) < 120
    failed = run_cli(["run", "--reprocess"], {**env, "ML_API_URL": "http://127.0.0.1:9"})
    assert failed.code == 1
    second = parse(path.read_text())
    assert metric(second, "batch_pipeline_run_status", status="failed") == 1
    assert metric(second, "batch_pipeline_last_success_timestamp_seconds") == success


@pytest.fixture
def pushgateway() -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "prometheus-pushgateway is not installed: .ci/run must install it (apt-get)"
            )
        pytest.skip(
            "prometheus-pushgateway is not installed (Debian: apt-get install prometheus-pushgateway)"
        )
    port = free_port()
    proc = subprocess.Popen(
        # Debian's build persists to /var/lib/prometheus/pushgateway.data by default,
        # shared by every gateway started here: each test's gateway keeps its own, in memory.
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def gateway_metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    families = parse(text)
    return {k: v for k, v in families.items() if k.startswith("batch_pipeline_")}


def test_metrics_pushed_to_a_real_pushgateway(
    bucket: Bucket, cli_env: dict[str, str], fake_model: FakeModel, pushgateway: str
) -> None:
    fake_model.knobs.poison_ids = {"tx-000007"}
    fake_model.knobs.fail_times, fake_model.knobs.fail_status = 1, 503
    bucket.put("in/a.csv", to_csv([*rows(200), row(500, currency="x")]))
    env = {
        **cli_env,
        "ML_API_URL": fake_model.url,
        "SOURCE_URI": bucket.uri("in/"),
        "PUSHGATEWAY_URL": pushgateway,
        "MAX_INVALID_RATIO": "1",
        "MAX_FAILED_RATIO": "1",
        "API_CONCURRENCY": "fixed",
    }
    assert run_cli(["run"], env).code == 3
    got = gateway_metrics(pushgateway)
    assert metric(got, "batch_pipeline_rows_total", outcome="read") == 201
    assert metric(got, "batch_pipeline_rows_total", outcome="valid") == 200
    assert metric(got, "batch_pipeline_rows_total", outcome="invalid") == 1
    assert metric(got, "batch_pipeline_rows_total", outcome="scored") == 199
    assert metric(got, "batch_pipeline_rows_total", outcome="failed") == 1
    assert metric(got, "batch_pipeline_api_requests_total", status="503") == 1
    assert metric(got, "batch_pipeline_api_requests_total", status="422") == 8  # the bisection
    assert metric(got, "batch_pipeline_api_retries_total") == 1
    assert metric(got, "batch_pipeline_api_request_duration_seconds_count") == sum(
        v for k, v in got["batch_pipeline_api_requests_total"].items()
    )
    assert (metric(got, "batch_pipeline_flushes_total") or 0) >= 1
    assert metric(got, "batch_pipeline_run_status", status="completed_with_errors") == 1
    success = metric(got, "batch_pipeline_last_success_timestamp_seconds")
    assert success and abs(success - time.time()) < 120

    failed = run_cli(["run", "--reprocess"], {**env, "ML_API_URL": "http://127.0.0.1:9"})
    assert failed.code == 1
    after = gateway_metrics(pushgateway)
    assert metric(after, "batch_pipeline_run_status", status="failed") == 1
    assert metric(after, "batch_pipeline_run_status", status="completed_with_errors") == 0
    assert metric(after, "batch_pipeline_last_success_timestamp_seconds") == success  # not wiped


def test_summary_shows_stage_times_and_the_limiting_stage(
    slow_env: dict[str, str], database: Database
) -> None:
    result = run_cli(["run"], slow_env)
    assert result.code == 3
    assert re.search(
        r"stage times:   read [\d.]+s, validate [\d.]+s, score [\d.]+s over 2 workers, write [\d.]+s",
        result.stdout,
    )
    assert "limited by:    score" in result.stdout  # a slow model and two workers
    stored = database.value("SELECT summary->'stage_times' FROM pipeline_runs")
    assert stored["limited_by"] == "score" and stored["score"] > 1.0


def test_json_logs_make_every_line_of_both_streams_one_json_object(
    bucket: Bucket, cli_env: dict[str, str]
) -> None:
    bucket.put("in/a.csv", to_csv([*rows(30), row(99, amount="-2")]))
    bucket.put("in/b.csv", to_csv(rows(10, start=100)))
    env = {
        **cli_env,
        "SOURCE_URI": bucket.uri("in/"),
        "LOG_FORMAT": "json",
        "MAX_INVALID_RATIO": "1",
    }
    result = run_cli(["run"], env)
    assert result.code == 3, result.output
    records = [json.loads(line) for line in result.stderr.splitlines()]
    [summary] = [json.loads(line) for line in result.stdout.splitlines()]
    assert summary["message"] == "Run summary" and summary["level"] == "INFO"
    s = summary["summary"]
    assert summary["run_id"] == s["run_id"] and s["status"] == "completed_with_errors"
    assert s["rows"] == {"read": 41, "valid": 40, "invalid": 1, "scored": 40, "failed": 0}
    assert s["objects"] == {"completed": 2} and s["exit_code"] == 3
    assert s["stage_times"]["limited_by"] in ("read", "score", "write")
    # Run-level lines carry the run, not the context of the last object read.
    for message in ("Successfully wrote", "Pipeline complete", "Found 2 object(s)"):
        [line] = [r for r in records if r["message"].startswith(message)]
        assert line["run_id"] == s["run_id"]
        assert "object" not in line and "stage" not in line and "batch" not in line, line
    assert any(r.get("object", "").endswith("in/b.csv") for r in records)

    again = run_cli(["run"], env)
    [skipped] = [json.loads(line) for line in again.stdout.splitlines()]
    assert skipped["summary"]["notes"] == [
        "every object was skipped: already completed at this version; "
        "use --reprocess to read them again"
    ]
    assert "limited_by" not in (skipped["summary"]["stage_times"] or {})

    down = run_cli(["run", "--reprocess"], {**env, "ML_API_URL": "http://127.0.0.1:9"})
    assert down.code == 1
    [failed] = [json.loads(line) for line in down.stdout.splitlines()]
    assert failed["level"] == "ERROR" and "cannot reach the ML API" in failed["summary"]["error"]
    assert all(json.loads(line) for line in down.stderr.splitlines())
