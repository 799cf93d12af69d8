-- V2: each run's own share of every object it read, and views for monitoring
-- from any SQL client.

CREATE TABLE run_objects (
    run_id          text NOT NULL REFERENCES pipeline_runs (run_id),
    source_uri      text NOT NULL,
    source_version  text NOT NULL,
    status          text NOT NULL,           -- processing, completed, failed
    rows_read       bigint NOT NULL DEFAULT 0,
    rows_valid      bigint NOT NULL DEFAULT 0,
    rows_invalid    bigint NOT NULL DEFAULT 0,
    rows_scored     bigint NOT NULL DEFAULT 0,
    rows_failed     bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, source_uri, source_version)
);

-- Runs with their progress: objects left, duration, throughput.
CREATE VIEW run_progress AS
SELECT run_id, status, source_uri, started_at, finished_at,
       COALESCE(finished_at, now()) - started_at AS duration,
       rows_read, rows_valid, rows_invalid, rows_scored, rows_failed,
       objects_total, objects_done, objects_failed, objects_skipped,
       GREATEST(objects_total - objects_done - objects_failed - objects_skipped, 0) AS objects_left,
       round(rows_read / GREATEST(EXTRACT(EPOCH FROM COALESCE(finished_at, now()) - started_at), 0.001)) AS rows_per_second,
       heartbeat_at, model_version, error
FROM pipeline_runs;

-- Why rows were rejected: one line per column and message.
CREATE VIEW invalid_reasons AS
SELECT r->>'column' AS column_name, r->>'message' AS reason, COUNT(*) AS rows,
       MIN(i.source_uri || ':' || i.line_number) AS example
FROM invalid_rows i, jsonb_array_elements(i.reasons) r
GROUP BY 1, 2;

-- Why transactions could not be scored, for those still waiting.
CREATE VIEW failure_reasons AS
SELECT reason, http_status, COUNT(*) AS transactions, MIN(transaction_id) AS example,
       MAX(failed_at) AS last_failed_at
FROM failed_transactions
WHERE resolved_at IS NULL
GROUP BY 1, 2;

-- Source objects by status.
CREATE VIEW objects_by_status AS
SELECT status, COUNT(*) AS objects, SUM(rows_read) AS rows_read, MAX(finished_at) AS last_finished_at
FROM source_objects
GROUP BY 1;
