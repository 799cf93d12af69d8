-- V5: run groups, for N workers sharing one night's objects (scale-out).
--
-- Workers started with the same RUN_GROUP share one listing of the source (the
-- first to arrive lists it), claim its objects one at a time through the object
-- locks and fences of V4, and each is recorded as its own run with the group and
-- its worker index. A run started without RUN_GROUP is a group of one.
ALTER TABLE pipeline_runs ADD COLUMN run_group text;
ALTER TABLE pipeline_runs ADD COLUMN worker_index integer;
CREATE INDEX pipeline_runs_group_idx ON pipeline_runs (run_group);

CREATE TABLE run_groups (
    run_group       text PRIMARY KEY,
    source_uri      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    objects_total   integer NOT NULL DEFAULT 0,
    -- Set when a worker met an error that must stop the whole group (a crossed
    -- threshold, a configuration error): no worker claims anything more.
    stopped_by      text,
    stop_reason     text,
    stop_exit_code  integer,
    finished_at     timestamptz
);

-- The group's listing, in key order, as the first worker saw it.
CREATE TABLE run_group_objects (
    run_group       text NOT NULL REFERENCES run_groups (run_group),
    position        integer NOT NULL,
    source_uri      text NOT NULL,
    source_version  text NOT NULL,
    size_bytes      bigint,
    PRIMARY KEY (run_group, position)
);
