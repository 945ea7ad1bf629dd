-- 026_inline_legacy_ids.sql: memory_migration_uuid as one expression the planner inlines (issue 15).
--
-- 017 read the MD5 through a FROM subquery, and a SQL function whose body has a FROM clause is never inlined:
-- every call ran the SQL-function executor (about 10 us, against 2 us for the MD5 itself), once per
-- long_term_memory item and per memory_items row without a UUID of its own. The same uuid3 (the version nibble
-- set to 3, the variant bits to 10), as one expression the planner substitutes into the calling query.
-- STABLE, not IMMUTABLE: convert_to is STABLE, and PostgreSQL never inlines an IMMUTABLE function whose body
-- is less than immutable. Same name, argument and result: every caller is unchanged.

BEGIN;

CREATE OR REPLACE FUNCTION memory_migration_uuid(p_name TEXT) RETURNS UUID
LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT overlay(overlay(md5('\x3334e2db51f25d4595456fec3e93dfe0'::bytea || convert_to(p_name, 'UTF8'))
                           PLACING '3' FROM 13 FOR 1)
                   PLACING translate(substr(md5('\x3334e2db51f25d4595456fec3e93dfe0'::bytea
                                                || convert_to(p_name, 'UTF8')), 17, 1),
                                     '0123456789abcdef', '89ab89ab89ab89ab') FROM 17 FOR 1)::uuid
$$;
COMMENT ON FUNCTION memory_migration_uuid(TEXT) IS 'unified-memory 026: uuid3 of a legacy key (inlined)';

COMMIT;
