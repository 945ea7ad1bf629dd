-- 020_live_change_capture.down.sql: remove change capture, the read-only guard and their bookkeeping.
BEGIN;
DO $$
DECLARE
    t RECORD;
BEGIN
    FOR t IN SELECT tgrelid::regclass AS rel, tgname FROM pg_trigger
             WHERE tgname IN ('memory_migration_capture', 'memory_migration_capture_truncate',
                                      'memory_migration_read_only') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    FOR t IN SELECT p.oid::regprocedure AS fn FROM pg_proc p
             WHERE p.proname LIKE 'memory\_migration\_capture\_%' AND p.pronargs = 0
               AND p.pronamespace = current_schema()::regnamespace LOOP
        EXECUTE format('DROP FUNCTION %s', t.fn);
    END LOOP;
END
$$;
DROP FUNCTION IF EXISTS memory_migration_read_only_off(REGCLASS);
DROP FUNCTION IF EXISTS memory_migration_read_only_on(REGCLASS);
DROP FUNCTION IF EXISTS memory_migration_read_only();
DROP FUNCTION IF EXISTS memory_migration_capture_off(REGCLASS);
DROP FUNCTION IF EXISTS memory_migration_capture_on(REGCLASS, TEXT);
DROP TABLE IF EXISTS memory_migration_live_log;
DROP TABLE IF EXISTS memory_migration_live;
DROP TABLE IF EXISTS memory_migration_conflicts;
DROP TABLE IF EXISTS memory_migration_synced;
DROP TABLE IF EXISTS memory_migration_changes;
COMMIT;
