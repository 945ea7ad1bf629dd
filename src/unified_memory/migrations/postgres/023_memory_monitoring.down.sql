-- 023_memory_monitoring.down.sql: remove the validation ledger (the grants on 017's tables go with the roles).
BEGIN;
DROP TABLE IF EXISTS memory_validation_runs;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance')
       AND to_regclass('memory_migration_runs') IS NOT NULL THEN
        REVOKE SELECT ON memory_migration_runs, memory_migration_checkpoints, memory_migration_quarantine
            FROM unified_memory_maintenance;
    END IF;
END
$$;
COMMIT;
