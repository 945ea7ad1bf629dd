-- 019_migration_data_path.down.sql: remove 019's tables and column, and give 017's conversions back.
BEGIN;
DROP FUNCTION IF EXISTS memory_migration_json_doc(TEXT);
ALTER TABLE memory_migration_quarantine DROP COLUMN IF EXISTS raw_key;
DROP TABLE IF EXISTS memory_migration_quarantine_rows;
DROP TABLE IF EXISTS memory_migration_ranges;
DO $$
BEGIN
    IF current_setting('server_version_num')::int < 160000 THEN
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_try_jsonb(p_text TEXT) RETURNS JSONB
            LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL UNSAFE AS
            'BEGIN RETURN p_text::jsonb; EXCEPTION WHEN invalid_text_representation THEN RETURN NULL; END'$f$;
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
    ELSE
        EXECUTE $f$CREATE OR REPLACE FUNCTION memory_migration_parse_time(p_text TEXT, p_zone TEXT)
            RETURNS TIMESTAMPTZ LANGUAGE sql STABLE STRICT PARALLEL SAFE AS
            'SELECT CASE WHEN p_text ~ ''[0-9]:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?\s*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$''
                         THEN CASE WHEN pg_input_is_valid(p_text, ''timestamptz'') THEN p_text::timestamptz END
                         ELSE CASE WHEN pg_input_is_valid(p_text, ''timestamp'')
                                   THEN p_text::timestamp AT TIME ZONE p_zone END END'$f$;
    END IF;
END
$$;
COMMIT;
