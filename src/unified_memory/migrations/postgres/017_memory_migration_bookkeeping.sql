-- 017_memory_migration_bookkeeping.sql: what the data migration needs to be resumable and accountable.
--   memory_migration_runs        the run ledger: options, times, per-table outcome counts, status
--   memory_migration_checkpoints per legacy table, the last key committed (with the batch that moved it)
--   memory_migration_quarantine  every legacy row or item that did not become a memory, with its reason
--   memory_migration_deferred_indexes  secondary indexes dropped for a bulk load, rebuilt at its end
--   memory_legacy_embeddings     memory_items' vectors, kept for the vectors step (pgvector or real[])
-- Atomic and idempotent like 016; run after it.

BEGIN;

CREATE TABLE IF NOT EXISTS memory_migration_runs (
    run_id      BIGSERIAL PRIMARY KEY,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    status      TEXT NOT NULL DEFAULT 'running'
                CONSTRAINT memory_migration_runs_status_vocab
                CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted', 'nothing_to_do', 'rolled_back')),
    options     JSONB NOT NULL DEFAULT '{}',
    shapes      JSONB NOT NULL DEFAULT '{}',
    counts      JSONB NOT NULL DEFAULT '{}',
    error       TEXT
);
COMMENT ON TABLE memory_migration_runs IS 'unified-memory 017: one row per data migration run';

CREATE TABLE IF NOT EXISTS memory_migration_checkpoints (
    source_table TEXT PRIMARY KEY,
    shape        TEXT NOT NULL,
    last_key     TEXT,
    batches      BIGINT NOT NULL DEFAULT 0,
    completed_at TIMESTAMPTZ,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id       BIGINT
);
COMMENT ON TABLE memory_migration_checkpoints IS 'unified-memory 017: resume points of the data migration';

CREATE TABLE IF NOT EXISTS memory_migration_quarantine (
    id             BIGSERIAL PRIMARY KEY,
    source_table   TEXT NOT NULL,
    source_key     TEXT NOT NULL,
    reason         TEXT NOT NULL,
    sqlstate       TEXT,
    duplicate_of   UUID,
    raw_row        JSONB,
    run_id         BIGINT,
    quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT memory_migration_quarantine_source_unique UNIQUE (source_table, source_key)
);
COMMENT ON TABLE memory_migration_quarantine IS 'unified-memory 017: legacy rows that did not become memories, and why';
CREATE INDEX IF NOT EXISTS idx_memory_migration_quarantine_reason ON memory_migration_quarantine (source_table, reason);

CREATE TABLE IF NOT EXISTS memory_migration_deferred_indexes (
    index_name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    dropped_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE memory_migration_deferred_indexes IS 'unified-memory 017: indexes to rebuild after a bulk load';

CREATE TABLE IF NOT EXISTS memory_legacy_embeddings (
    memory_id  UUID PRIMARY KEY REFERENCES memories (id) ON DELETE CASCADE,
    source     TEXT NOT NULL,
    dimension  INTEGER NOT NULL,
    embedding  REAL[] NOT NULL
);
COMMENT ON TABLE memory_legacy_embeddings IS 'unified-memory 017: legacy vectors waiting for the vectors step';

-- Deterministic ids for legacy rows that have no UUID: RFC 4122 version 3 (MD5, name-based) in a fixed
-- namespace, equal to Python's uuid.uuid3(UUID('3334e2db-51f2-5d45-9545-6fec3e93dfe0'), name).
CREATE OR REPLACE FUNCTION memory_migration_uuid(p_name TEXT) RETURNS UUID
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (substr(h, 1, 12) || '3' || substr(h, 14, 3)
            || substr('89ab', ((('x' || substr(h, 17, 1))::bit(4)::int) & 3) + 1, 1) || substr(h, 18))::uuid
    FROM (SELECT md5('\x3334e2db51f25d4595456fec3e93dfe0'::bytea || convert_to(p_name, 'UTF8')) AS h) AS digest
$$;
COMMENT ON FUNCTION memory_migration_uuid(TEXT) IS 'unified-memory 017: uuid3 of a legacy key';

-- Invalid JSON must not abort a batch: NULL for text that is not JSON (pg_input_is_valid on 16+).
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 160000 THEN
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_try_jsonb(p_text TEXT) RETURNS JSONB
            LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
            'SELECT CASE WHEN pg_input_is_valid(p_text, ''jsonb'') THEN p_text::jsonb END'$f$;
    ELSE
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_try_jsonb(p_text TEXT) RETURNS JSONB
            LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE AS
            'BEGIN RETURN p_text::jsonb; EXCEPTION WHEN invalid_text_representation THEN RETURN NULL; END'$f$;
    END IF;
END
$$;
COMMENT ON FUNCTION memory_migration_try_jsonb(TEXT) IS 'unified-memory 017: text to jsonb, NULL when invalid';

-- A time written in a legacy JSON item: with an offset after its time of day it is absolute; without one it
-- is read in p_zone. NULL when unreadable. On 16+ pg_input_is_valid checks without an exception; on 12-15 the
-- EXCEPTION block is a subtransaction, which no process of a parallel query may start: PARALLEL UNSAFE.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 160000 THEN
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_parse_time(p_text TEXT, p_zone TEXT)
            RETURNS TIMESTAMPTZ LANGUAGE sql STABLE STRICT PARALLEL SAFE AS
            'SELECT CASE WHEN p_text ~ ''[0-9]:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$''
                         THEN CASE WHEN pg_input_is_valid(p_text, ''timestamptz'') THEN p_text::timestamptz END
                         ELSE CASE WHEN pg_input_is_valid(p_text, ''timestamp'')
                                   THEN p_text::timestamp AT TIME ZONE p_zone END END'$f$;
    ELSE
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_parse_time(p_text TEXT, p_zone TEXT)
            RETURNS TIMESTAMPTZ LANGUAGE plpgsql STABLE STRICT PARALLEL UNSAFE AS
            'BEGIN
                IF p_text ~ ''[0-9]:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$'' THEN
                    RETURN p_text::timestamptz;
                END IF;
                RETURN p_text::timestamp AT TIME ZONE p_zone;
            EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR invalid_text_representation THEN
                RETURN NULL;
            END'$f$;
    END IF;
END
$$;
COMMENT ON FUNCTION memory_migration_parse_time(TEXT, TEXT) IS 'unified-memory 017: legacy time text, NULL when unreadable';

COMMIT;
