-- 021_memory_vector_outbox.sql: the Milvus collection follows memories.
--   memory_vector_outbox  one row per change of a memory the collection must see (a row means "waiting";
--                         `unified-memory vectors sync` deletes it once the collection holds the change)
--   triggers on memories  queue a memory when a field the collection holds changes (text, tenant, scalars,
--                         expiry, soft delete), when it is hard-deleted while it had a vector, and when it is
--                         inserted with embedding_id already set. A memory inserted without embedding_id (every
--                         migrated row) is found through idx_memories_vector_pending instead, so the bulk load
--                         writes no outbox rows and calls no trigger function.
-- Existing deployments: memories synced before this file and changed since (version > 1, soft-deleted, expired)
-- are queued once, when the outbox is created; memories still without a vector are pending anyway.
-- Atomic and idempotent like 016 and 017; needs PostgreSQL 11+ (EXECUTE FUNCTION, transition tables).

BEGIN;

DO $$
BEGIN
    IF to_regclass('memory_vector_outbox') IS NULL THEN
        CREATE TABLE memory_vector_outbox (
            seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            memory_id UUID NOT NULL,
            queued_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
        );
        INSERT INTO memory_vector_outbox (memory_id)
        SELECT id FROM memories
        WHERE embedding_id IS NOT NULL AND (version > 1 OR deleted_at IS NOT NULL OR expires_at <= now())
        ORDER BY id;
    END IF;
END
$$;
COMMENT ON TABLE memory_vector_outbox IS 'unified-memory 021: memories whose change the Milvus collection has not seen yet';
CREATE INDEX IF NOT EXISTS memory_vector_outbox_memory_id ON memory_vector_outbox (memory_id, seq);

-- Memories no vector points at yet (new, or taken out of the collection): what sync upserts besides the outbox.
CREATE INDEX IF NOT EXISTS idx_memories_vector_pending ON memories (id)
    WHERE embedding_id IS NULL AND deleted_at IS NULL;
-- Memories the collection holds, by expiry: what each sync's expiry sweep reads (`vectors sync --follow` polls).
CREATE INDEX IF NOT EXISTS idx_memories_vector_expiry ON memories (expires_at)
    WHERE embedding_id IS NOT NULL AND expires_at IS NOT NULL;

CREATE OR REPLACE FUNCTION memory_vector_outbox_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory_vector_outbox (memory_id) VALUES (NEW.id);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION memory_vector_outbox_row() IS 'unified-memory 021: queue a changed memory for the Milvus collection';

CREATE OR REPLACE FUNCTION memory_vector_outbox_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory_vector_outbox (memory_id) SELECT id FROM memory_vector_gone WHERE embedding_id IS NOT NULL;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION memory_vector_outbox_gone() IS 'unified-memory 021: queue hard-deleted memories that had a vector';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                   AND tgname = 'memories_vector_outbox_insert') THEN
        CREATE TRIGGER memories_vector_outbox_insert AFTER INSERT ON memories
            FOR EACH ROW WHEN (NEW.embedding_id IS NOT NULL) EXECUTE FUNCTION memory_vector_outbox_row();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                   AND tgname = 'memories_vector_outbox_update') THEN
        -- the fields the collection holds (vectors.SCALARS and the text); the WHEN clause is evaluated without
        -- calling the function, so access counting and embedding_id pointers cost nothing here
        CREATE TRIGGER memories_vector_outbox_update
            AFTER UPDATE OF id, user_id, org_id, text, importance, decay_tier, memory_type, neuro_type, ui_source,
                            created_at, expires_at, deleted_at, source_table
            ON memories FOR EACH ROW
            WHEN (OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.org_id IS DISTINCT FROM NEW.org_id
                  OR OLD.text IS DISTINCT FROM NEW.text OR OLD.importance IS DISTINCT FROM NEW.importance
                  OR OLD.decay_tier IS DISTINCT FROM NEW.decay_tier OR OLD.memory_type IS DISTINCT FROM NEW.memory_type
                  OR OLD.neuro_type IS DISTINCT FROM NEW.neuro_type OR OLD.ui_source IS DISTINCT FROM NEW.ui_source
                  OR OLD.created_at IS DISTINCT FROM NEW.created_at OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
                  OR OLD.deleted_at IS DISTINCT FROM NEW.deleted_at
                  OR OLD.source_table IS DISTINCT FROM NEW.source_table OR OLD.id IS DISTINCT FROM NEW.id)
            EXECUTE FUNCTION memory_vector_outbox_row();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                   AND tgname = 'memories_vector_outbox_delete') THEN
        -- one INSERT ... SELECT per statement: a rollback deleting a whole migration queues in one go
        CREATE TRIGGER memories_vector_outbox_delete AFTER DELETE ON memories
            REFERENCING OLD TABLE AS memory_vector_gone
            FOR EACH STATEMENT EXECUTE FUNCTION memory_vector_outbox_gone();
    END IF;
END
$$;

-- The application writes memories; the triggers queue into the outbox as its owner (SECURITY DEFINER, a fixed
-- search_path with pg_temp last), so the application role has no privilege on the outbox and cannot call them.
DO $$
BEGIN
    ALTER FUNCTION memory_vector_outbox_row() SECURITY DEFINER;
    ALTER FUNCTION memory_vector_outbox_gone() SECURITY DEFINER;
    EXECUTE format('ALTER FUNCTION memory_vector_outbox_row() SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION memory_vector_outbox_gone() SET search_path = %I, pg_temp', current_schema());
    REVOKE ALL ON FUNCTION memory_vector_outbox_row() FROM PUBLIC;
    REVOKE ALL ON FUNCTION memory_vector_outbox_gone() FROM PUBLIC;
    REVOKE ALL ON memory_vector_outbox FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT ALL ON memory_vector_outbox TO unified_memory_maintenance;
    END IF;
END
$$;

COMMIT;
