-- 021_memory_vector_outbox.down.sql: remove the vector outbox, its triggers and the pending index.
BEGIN;
DROP TRIGGER IF EXISTS memories_vector_outbox_delete ON memories;
DROP TRIGGER IF EXISTS memories_vector_outbox_update ON memories;
DROP TRIGGER IF EXISTS memories_vector_outbox_insert ON memories;
DROP FUNCTION IF EXISTS memory_vector_outbox_gone();
DROP FUNCTION IF EXISTS memory_vector_outbox_row();
DROP INDEX IF EXISTS idx_memories_vector_expiry;
DROP INDEX IF EXISTS idx_memories_vector_pending;
DROP TABLE IF EXISTS memory_vector_outbox;
COMMIT;
