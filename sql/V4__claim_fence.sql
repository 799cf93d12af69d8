-- V4: fencing for object claims.
--
-- An object is held by a session advisory lock, but a lock lost with its
-- connection (a backend terminated, a network cut, a paused process) does not
-- stop the old holder from writing when it comes back. Each claim bumps the
-- object's fence; every flush names the fence it claimed with and is refused,
-- in its own transaction, when the fence has moved on (Kleppmann, "How to do
-- distributed locking"). The refusal is the error below, with its own SQLSTATE.
ALTER TABLE source_objects ADD COLUMN claim_fence bigint NOT NULL DEFAULT 0;

CREATE FUNCTION batch_pipeline_claim_lost(detail text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'claim lost: %', detail USING ERRCODE = 'BPF01';
END
$$;
