-- 016_unified_memory_schema.down.sql: remove exactly what 016 added and put back what it displaced.
--
-- Refuses while memories holds rows, unless the session sets unified_memory.allow_data_loss = 'on'
-- (`unified-memory schema down --force` does). Roles are cluster-wide and shared by databases: they stay.

BEGIN;

DO $$
BEGIN
    IF to_regclass('memories') IS NOT NULL
       AND coalesce(current_setting('unified_memory.allow_data_loss', true), '') <> 'on'
       AND EXISTS (SELECT 1 FROM memories) THEN
        RAISE EXCEPTION 'memories holds rows: refusing to drop them (schema down --force to override)';
    END IF;
END
$$;

DROP VIEW IF EXISTS memory_audit_summary;
DROP VIEW IF EXISTS memory_analytics_by_tenant;
DROP VIEW IF EXISTS memory_relationship_details;
DROP VIEW IF EXISTS active_memories_with_decay;
DROP TABLE IF EXISTS memory_relationships;
DROP TABLE IF EXISTS memory_access_log;
DROP TABLE IF EXISTS memories;
DROP FUNCTION IF EXISTS memories_before_update();
DROP FUNCTION IF EXISTS memories_before_insert();
DROP FUNCTION IF EXISTS soft_delete_memory(UUID, VARCHAR, VARCHAR, VARCHAR);
DROP FUNCTION IF EXISTS create_memory_relationship(UUID, UUID, VARCHAR, REAL, JSONB);
DROP FUNCTION IF EXISTS update_memory_access(UUID, VARCHAR, VARCHAR, VARCHAR, VARCHAR, INET, TEXT, TEXT, INTEGER, TEXT,
                                             INTEGER, INTEGER);
DROP FUNCTION IF EXISTS calculate_decay_score(TIMESTAMPTZ, TEXT, INTEGER, INTEGER);
DROP FUNCTION IF EXISTS calculate_expires_at(TEXT, TIMESTAMPTZ);
DROP FUNCTION IF EXISTS default_decay_lambda(TEXT);

-- Put back what 016 displaced, then remove the holding schema.
DO $$
DECLARE
    obj record;
    here text := current_schema();
BEGIN
    IF to_regnamespace('unified_memory_displaced') IS NULL THEN
        RETURN;
    END IF;
    FOR obj IN
        SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'unified_memory_displaced' AND c.relkind IN ('r', 'v', 'm', 'p')
    LOOP
        IF obj.relkind = 'v' THEN
            EXECUTE format('ALTER VIEW unified_memory_displaced.%I SET SCHEMA %I', obj.relname, here);
        ELSIF obj.relkind = 'm' THEN
            EXECUTE format('ALTER MATERIALIZED VIEW unified_memory_displaced.%I SET SCHEMA %I', obj.relname, here);
        ELSE
            EXECUTE format('ALTER TABLE unified_memory_displaced.%I SET SCHEMA %I', obj.relname, here);
        END IF;
    END LOOP;
    FOR obj IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'unified_memory_displaced'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET SCHEMA %I', obj.signature, here);
    END LOOP;
    DROP SCHEMA unified_memory_displaced;
END
$$;

COMMIT;
