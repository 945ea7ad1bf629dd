-- 024_operations.sql: the role a rollback restores table definitions as (issue 10).
--
-- A backup's definitions (defaults, CHECKs, indexes) are data: a rollback runs them as unified_memory_restore,
-- a NOLOGIN role that is a member of nothing and holds no attribute, so a forged expression cannot read server
-- files or call any function revoked from PUBLIC. The maintenance role may SET ROLE to it. Idempotent; roles are
-- cluster-wide, so a second database finds it already there.

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_restore') THEN
        CREATE ROLE unified_memory_restore NOLOGIN NOINHERIT;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance')
       AND NOT pg_has_role('unified_memory_maintenance', 'unified_memory_restore', 'MEMBER') THEN
        GRANT unified_memory_restore TO unified_memory_maintenance;
    END IF;
EXCEPTION WHEN insufficient_privilege OR unique_violation OR duplicate_object THEN
    RAISE WARNING 'role unified_memory_restore could not be set up here: %', SQLERRM;
END
$$;

COMMIT;
