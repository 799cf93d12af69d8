"""The demo: the real pipeline, end to end, on a laptop with nothing else running.

It writes a deterministic sample (plain, gzip and zstd files, with some invalid
rows and duplicates), serves the reference model on a free loopback port, and
runs the same `run` as production into the embedded PostgreSQL (or
DATABASE_URL when set).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from library.config import Settings
from library.demo.reference_model import make_server
from library.demo.sample_data import write_sample
from library.jobs.run import RunOptions, RunReport, StopSignal, run_pipeline

log = logging.getLogger(__name__)

DEMO_FOLDER = Path(".batch-pipeline/demo-data")
LOOK_QUERY = "SELECT prediction, COUNT(*) AS count, AVG(fraud_score) AS avg_score FROM predictions GROUP BY prediction"


@contextmanager
def reference_model() -> Iterator[str]:
    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, name="reference-model", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_demo(settings: Settings, rows: int, folder: Path, stop: StopSignal) -> RunReport:
    files = write_sample(folder, rows)
    log.info("wrote %d sample rows to %s (%s)", rows, folder, ", ".join(f.name for f in files))
    with reference_model() as url:
        log.info("reference model serving on %s", url)
        demo_settings = settings.updated({"SOURCE_URI": str(folder), "ML_API_URL": url})
        return run_pipeline(demo_settings, RunOptions(reprocess=True, migrate=True), stop)
