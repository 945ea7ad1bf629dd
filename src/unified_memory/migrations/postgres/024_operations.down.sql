-- 024_operations.down.sql: nothing to undo in this database. The role unified_memory_restore is cluster-wide
-- and shared by databases (like 016's roles): it stays. It owns nothing outside a running rollback.

BEGIN;
SELECT 1;
COMMIT;
