-- 023_memory_monitoring.sql: what monitoring reads that no other table records.
--   memory_validation_runs  one row per `unified-memory validate` run: when, passed or failed, how many checks
--                           ran, failed and warned (check names only: never memory text)
-- Grants the maintenance role (which `unified-memory metrics` and `validate` run as when they are not
-- superuser) what it needs to read the migration's bookkeeping and write this ledger.
-- Atomic and idempotent like 016 and 017; depends on them only.

BEGIN;

CREATE TABLE IF NOT EXISTS memory_validation_runs (
    run_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    status        TEXT NOT NULL
                  CONSTRAINT memory_validation_runs_status_vocab CHECK (status IN ('passed', 'failed')),
    checks        INTEGER NOT NULL CONSTRAINT memory_validation_runs_checks_positive CHECK (checks >= 0),
    failed        INTEGER NOT NULL CONSTRAINT memory_validation_runs_failed_positive CHECK (failed >= 0),
    warnings      INTEGER NOT NULL CONSTRAINT memory_validation_runs_warnings_positive CHECK (warnings >= 0),
    failed_checks JSONB NOT NULL DEFAULT '[]'
                  CONSTRAINT memory_validation_runs_failed_checks_array CHECK (jsonb_typeof(failed_checks) = 'array')
);
COMMENT ON TABLE memory_validation_runs IS 'unified-memory 023: one row per validation run';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT SELECT, INSERT ON memory_validation_runs TO unified_memory_maintenance;
        GRANT SELECT ON memory_migration_runs, memory_migration_checkpoints, memory_migration_quarantine
            TO unified_memory_maintenance;
    END IF;
END
$$;

COMMIT;
