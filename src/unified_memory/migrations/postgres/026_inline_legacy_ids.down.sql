-- 026_inline_legacy_ids.down.sql: 017's definition of memory_migration_uuid again (same results).

BEGIN;

CREATE OR REPLACE FUNCTION memory_migration_uuid(p_name TEXT) RETURNS UUID
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (substr(h, 1, 12) || '3' || substr(h, 14, 3)
            || substr('89ab', ((('x' || substr(h, 17, 1))::bit(4)::int) & 3) + 1, 1) || substr(h, 18))::uuid
    FROM (SELECT md5('\x3334e2db51f25d4595456fec3e93dfe0'::bytea || convert_to(p_name, 'UTF8')) AS h) AS digest
$$;
COMMENT ON FUNCTION memory_migration_uuid(TEXT) IS 'unified-memory 017: uuid3 of a legacy key';

COMMIT;
