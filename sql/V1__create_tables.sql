-- V1: the tables of the contract (shared/CONTRACT.md, section 3) and the ledger
-- that makes runs resumable. Later migrations add; they never edit this file.

-- One row per run. Counts are set (not incremented) by every flush, in the same
-- database transaction as the rows they count, so they never disagree with the data.
CREATE TABLE pipeline_runs (
    run_id          text PRIMARY KEY,
    status          text NOT NULL DEFAULT 'processing'
                    CHECK (status IN ('processing', 'completed', 'completed_with_errors',
                                      'failed', 'interrupted')),
    source_uri      text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    rows_read       bigint NOT NULL DEFAULT 0,
    rows_valid      bigint NOT NULL DEFAULT 0,
    rows_invalid    bigint NOT NULL DEFAULT 0,
    rows_scored     bigint NOT NULL DEFAULT 0,
    rows_failed     bigint NOT NULL DEFAULT 0,
    objects_total   integer NOT NULL DEFAULT 0,
    objects_done    integer NOT NULL DEFAULT 0,
    objects_skipped integer NOT NULL DEFAULT 0,
    objects_failed  integer NOT NULL DEFAULT 0,
    model_version   text,
    error           text,
    settings        jsonb,          -- the run's settings, secrets removed
    summary         jsonb           -- the end-of-run summary as printed
);

-- One row per version of a source object: the lineage record and the checkpoint.
CREATE TABLE source_objects (
    source_uri      text NOT NULL,
    source_version  text NOT NULL,          -- S3 ETag, or size and mtime for a local file
    size_bytes      bigint,
    status          text NOT NULL DEFAULT 'processing'
                    CHECK (status IN ('processing', 'completed', 'failed')),
    run_id          text NOT NULL REFERENCES pipeline_runs (run_id),
    -- The physical line where the last row already written starts: a resumed run
    -- skips every row that starts at or before it.
    checkpoint_line bigint NOT NULL DEFAULT 1,
    rows_read       bigint NOT NULL DEFAULT 0,
    rows_valid      bigint NOT NULL DEFAULT 0,
    rows_invalid    bigint NOT NULL DEFAULT 0,
    rows_scored     bigint NOT NULL DEFAULT 0,
    rows_failed     bigint NOT NULL DEFAULT 0,
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (source_uri, source_version)
);
CREATE INDEX source_objects_run_idx ON source_objects (run_id);

CREATE TABLE transactions (
    transaction_id    text PRIMARY KEY,
    event_time        timestamptz NOT NULL,
    account_id        text NOT NULL,
    merchant_id       text NOT NULL,
    merchant_category text NOT NULL,
    amount            numeric(12, 2) NOT NULL,
    currency          char(3) NOT NULL,
    country           char(2) NOT NULL,
    channel           text NOT NULL CHECK (channel IN ('online', 'pos', 'atm')),
    card_present      boolean NOT NULL,
    source_uri        text NOT NULL,
    source_version    text NOT NULL,
    source_line       bigint NOT NULL,
    run_id            text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE predictions (
    transaction_id  text NOT NULL REFERENCES transactions (transaction_id),
    model_version   text NOT NULL,
    fraud_score     double precision NOT NULL CHECK (fraud_score >= 0 AND fraud_score <= 1),
    prediction      boolean NOT NULL,        -- true = fraud
    run_id          text NOT NULL,
    scored_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, model_version)
);
CREATE INDEX predictions_run_idx ON predictions (run_id);

CREATE TABLE invalid_rows (
    id              bigserial PRIMARY KEY,
    source_uri      text NOT NULL,
    source_version  text NOT NULL,
    line_number     bigint NOT NULL,
    raw_text        text NOT NULL,
    reasons         jsonb NOT NULL,          -- [{"column": ..., "message": ..., "value": ...}]
    run_id          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_uri, source_version, line_number)
);
CREATE INDEX invalid_rows_run_idx ON invalid_rows (run_id);

-- A transaction that could not be scored. At most one unresolved row per
-- transaction; resolved rows stay as history with resolved_at set.
CREATE TABLE failed_transactions (
    id              bigserial PRIMARY KEY,
    transaction_id  text NOT NULL REFERENCES transactions (transaction_id),
    model_version   text,                    -- the version the run was scoring with, if known
    reason          text NOT NULL,
    http_status     integer,
    attempts        integer NOT NULL,
    run_id          text NOT NULL,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    resolved_by_run text
);
CREATE UNIQUE INDEX failed_transactions_open_idx
    ON failed_transactions (transaction_id) WHERE resolved_at IS NULL;
CREATE INDEX failed_transactions_run_idx ON failed_transactions (run_id);
