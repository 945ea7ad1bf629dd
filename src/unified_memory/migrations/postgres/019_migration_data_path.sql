-- 019_migration_data_path.sql: the data migration's parallel key ranges, raw rows quarantined once, and
-- legacy-value conversions that never raise.
--   memory_migration_ranges          per legacy table, the key ranges of one pass (one worker each) and how far
--                                    each got; a pass resumes its ranges after a crash
--   memory_migration_quarantine_rows a legacy row whose items were quarantined, stored once (item rows name it
--                                    in memory_migration_quarantine.raw_key)
--   memory_migration_try_jsonb, memory_migration_parse_time   redefined: NULL on every data exception (22xxx),
--                                    not only 22P02 (a NUL escape raises 22P05 on PostgreSQL 12-15)
--   memory_migration_json_doc        legacy JSON text to jsonb, a \u0000 escape replaced by \ufffd when that is
--                                    all that stops it
-- Atomic and idempotent like 016/017; depends on 016 and 017 only.

BEGIN;

CREATE TABLE IF NOT EXISTS memory_migration_ranges (
    source_table TEXT NOT NULL,
    range_no     INTEGER NOT NULL,
    shape        TEXT NOT NULL,
    lower_key    TEXT,             -- exclusive; NULL: from the start
    upper_key    TEXT,             -- inclusive; NULL: to the end
    last_key     TEXT,             -- the last key committed in this range
    anti_join    BOOLEAN NOT NULL, -- false: the table had no outcome when the pass began, rows past last_key are new
    completed_at TIMESTAMPTZ,
    run_id       BIGINT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, range_no)
);
COMMENT ON TABLE memory_migration_ranges IS 'unified-memory 019: key ranges of a migration pass and their progress';

CREATE TABLE IF NOT EXISTS memory_migration_quarantine_rows (
    source_table TEXT NOT NULL,
    source_key   TEXT NOT NULL,
    raw_row      JSONB,
    run_id       BIGINT,
    stored_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, source_key)
);
COMMENT ON TABLE memory_migration_quarantine_rows IS
    'unified-memory 019: a legacy row whose items were quarantined, stored once';

ALTER TABLE memory_migration_quarantine ADD COLUMN IF NOT EXISTS raw_key TEXT;
COMMENT ON COLUMN memory_migration_quarantine.raw_key IS
    'unified-memory 019: source_key of the row in memory_migration_quarantine_rows holding this item''s source row';

DO $$
BEGIN
    IF current_setting('server_version_num')::int < 160000 THEN
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_try_jsonb(p_text TEXT) RETURNS JSONB
            LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE AS
            'BEGIN RETURN p_text::jsonb; EXCEPTION WHEN data_exception THEN RETURN NULL; END'$f$;
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_parse_time(p_text TEXT, p_zone TEXT)
            RETURNS TIMESTAMPTZ LANGUAGE plpgsql STABLE STRICT PARALLEL UNSAFE AS
            'BEGIN
                IF p_text ~ ''[0-9]:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$'' THEN
                    RETURN p_text::timestamptz;
                END IF;
                RETURN p_text::timestamp AT TIME ZONE p_zone;
            EXCEPTION WHEN data_exception THEN
                RETURN NULL;
            END'$f$;
    ELSE
        -- pg_input_is_valid checks the text; AT TIME ZONE can still leave the range near its ends: guarded.
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_parse_time(p_text TEXT, p_zone TEXT)
            RETURNS TIMESTAMPTZ LANGUAGE sql STABLE STRICT PARALLEL SAFE AS
            'SELECT CASE WHEN p_text ~ ''[0-9]:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$''
                         THEN CASE WHEN pg_input_is_valid(p_text, ''timestamptz'') THEN p_text::timestamptz END
                         ELSE CASE WHEN pg_input_is_valid(p_text, ''timestamp'')
                                   AND (p_text::timestamp IN (''infinity'', ''-infinity'')
                                        OR p_text::timestamp BETWEEN ''4713-11-26 BC'' AND ''294276-12-29'')
                                   THEN p_text::timestamp AT TIME ZONE p_zone END END'$f$;
    END IF;
END
$$;

-- Parallel safety follows memory_migration_try_jsonb's (an EXCEPTION block before 16).
DO $$
BEGIN
    EXECUTE format($f$CREATE OR REPLACE FUNCTION memory_migration_json_doc(p_text TEXT) RETURNS JSONB
        LANGUAGE sql IMMUTABLE STRICT PARALLEL %s AS $body$
        SELECT coalesce(memory_migration_try_jsonb(p_text),
                        CASE WHEN strpos(p_text, E'\\u0000') > 0 THEN memory_migration_try_jsonb(
                            replace(replace(replace(p_text, E'\\\\', E'\x01'), E'\\u0000', E'\\ufffd'), E'\x01', E'\\\\'))
                        END)
        $body$
    $f$,
        CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'SAFE' ELSE 'UNSAFE' END);
END
$$;
COMMENT ON FUNCTION memory_migration_json_doc(TEXT) IS
    'unified-memory 019: legacy JSON text to jsonb; a \u0000 escape becomes \ufffd; NULL when not JSON';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON memory_migration_ranges, memory_migration_quarantine_rows
            TO unified_memory_maintenance;
    END IF;
END
$$;

COMMIT;
