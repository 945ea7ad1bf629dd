-- 017_memory_migration_bookkeeping.down.sql: remove the data migration's bookkeeping tables.
BEGIN;
DROP TABLE IF EXISTS memory_legacy_embeddings;
DROP TABLE IF EXISTS memory_migration_deferred_indexes;
DROP TABLE IF EXISTS memory_migration_quarantine;
DROP TABLE IF EXISTS memory_migration_checkpoints;
DROP TABLE IF EXISTS memory_migration_runs;
DROP FUNCTION IF EXISTS memory_migration_parse_time(TEXT, TEXT);
DROP FUNCTION IF EXISTS memory_migration_try_jsonb(TEXT);
DROP FUNCTION IF EXISTS memory_migration_uuid(TEXT);
COMMIT;
