-- 025_first_implementation_names.down.sql: our own index, trigger and function names back (016's down file
-- and an adoption's undoing drop them by these names).
BEGIN;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass AND tgname = 'update_memories_updated_at'
               AND tgfoid = to_regprocedure('memories_before_update()'))
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                       AND tgname = 'memories_before_update') THEN
        ALTER TRIGGER update_memories_updated_at ON memories RENAME TO memories_before_update;
    END IF;
    IF coalesce(obj_description(to_regprocedure('set_memory_defaults()'), 'pg_proc'), '') LIKE 'unified-memory 025%'
       AND to_regprocedure('memories_before_insert()') IS NULL THEN
        ALTER FUNCTION set_memory_defaults() RENAME TO memories_before_insert;
        COMMENT ON FUNCTION memories_before_insert() IS 'unified-memory 016: insert defaults for decay_lambda and expires_at';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass AND tgname = 'set_memory_defaults_trigger'
               AND tgfoid = to_regprocedure('memories_before_insert()'))
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                       AND tgname = 'memories_before_insert') THEN
        ALTER TRIGGER set_memory_defaults_trigger ON memories RENAME TO memories_before_insert;
    END IF;
END
$$;

DO $$
DECLARE
    pair text[];
BEGIN
    FOREACH pair SLICE 1 IN ARRAY ARRAY[
        ['idx_memories_tenant', 'idx_memories_user_org'],
        ['idx_memories_created', 'idx_memories_created_at'],
        ['idx_memories_updated', 'idx_memories_updated_at'],
        ['idx_memories_expires', 'idx_memories_expires_at'],
        ['idx_memories_deleted', 'idx_memories_deleted_at'],
        ['idx_memories_decay_tier', 'idx_memories_tier_expires'],
        ['idx_memories_importance', 'idx_memories_importance_created'],
        ['idx_memories_embedding', 'idx_memories_embedding_id'],
        ['idx_memories_session', 'idx_memories_session_created'],
        ['idx_memories_conversation', 'idx_memories_conversation_created'],
        ['idx_memories_ui_source', 'idx_memories_ui_source_created'],
        ['idx_memories_memory_type', 'idx_memories_memory_type_created'],
        ['idx_memories_neuro_type', 'idx_memories_neuro_type_created'],
        ['idx_memories_access_count', 'idx_memories_access_count_last'],
        ['idx_memories_tenant_type', 'idx_memories_user_org_type_created'],
        ['idx_memories_tenant_importance', 'idx_memories_user_org_importance_created'],
        ['idx_memory_access_log_type', 'idx_memory_access_log_type_time'],
        ['idx_memory_access_log_accessed', 'idx_memory_access_log_time']
    ] LOOP
        IF EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relname = pair[2]) THEN
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relname = pair[1]
                   AND relkind = 'i') THEN
            EXECUTE format('COMMENT ON INDEX %I IS NULL', pair[1]);
            EXECUTE format('ALTER INDEX %I RENAME TO %I', pair[1], pair[2]);
        ELSIF to_regclass('memory_migration_deferred_indexes') IS NOT NULL THEN
            UPDATE memory_migration_deferred_indexes
            SET index_name = pair[2],
                definition = regexp_replace(definition, '^CREATE INDEX ' || pair[1] || ' ON ',
                                            'CREATE INDEX ' || pair[2] || ' ON ')
            WHERE index_name = pair[1];
        END IF;
    END LOOP;
END
$$;

COMMIT;
