-- 025_first_implementation_names.sql: the first implementation's index and trigger names exist in our schema.
--
-- An application, a dashboard or an operator's runbook written for the first implementation's 016 names its
-- indexes and triggers: REINDEX INDEX idx_memories_tenant, pg_stat_user_indexes WHERE indexrelname = ...,
-- ALTER TABLE memories DISABLE TRIGGER update_memories_updated_at, set_memory_defaults(). Every one of its 33
-- index names has an index of ours serving the same purpose (same leading columns; ours are partial on live
-- rows where 016 says so), so ours is RENAMED to its name: no second index costs every write, no index is
-- created. The same for the two triggers on memories (ours do the same job and more: defaults on insert;
-- updated_at, version, decay_lambda and expiry on update) and for the insert trigger's function, which becomes
-- set_memory_defaults(). The update trigger keeps executing memories_before_update() (update_updated_at_column()
-- exists since 022 and only sets updated_at: memories also needs its version and expiry maintained).
--
-- Guarded, so it is idempotent and works on a fresh and on an adopted database: a rename happens only when
-- our object exists under our name and nothing holds its name yet (a same-named object someone created is
-- left alone: nothing is dropped). A bulk load that deferred the indexes of an empty memories
-- (memory_migration_deferred_indexes) rebuilds them under the new names. The down file renames back.
-- Every renamed object carries a 'unified-memory 025' comment, so a 025 applied with psql is recognised and
-- recorded by `schema up`. 016's own guards look for 016's names: after 025, run 016 only through the runner
-- (which never re-runs an applied file), not again with psql.

BEGIN;

DO $$
DECLARE
    pair text[];
BEGIN
    FOREACH pair SLICE 1 IN ARRAY ARRAY[
        ['idx_memories_user_org', 'idx_memories_tenant'],
        ['idx_memories_created_at', 'idx_memories_created'],
        ['idx_memories_updated_at', 'idx_memories_updated'],
        ['idx_memories_expires_at', 'idx_memories_expires'],
        ['idx_memories_deleted_at', 'idx_memories_deleted'],
        ['idx_memories_tier_expires', 'idx_memories_decay_tier'],
        ['idx_memories_importance_created', 'idx_memories_importance'],
        ['idx_memories_embedding_id', 'idx_memories_embedding'],
        ['idx_memories_session_created', 'idx_memories_session'],
        ['idx_memories_conversation_created', 'idx_memories_conversation'],
        ['idx_memories_ui_source_created', 'idx_memories_ui_source'],
        ['idx_memories_memory_type_created', 'idx_memories_memory_type'],
        ['idx_memories_neuro_type_created', 'idx_memories_neuro_type'],
        ['idx_memories_access_count_last', 'idx_memories_access_count'],
        ['idx_memories_user_org_type_created', 'idx_memories_tenant_type'],
        ['idx_memories_user_org_importance_created', 'idx_memories_tenant_importance'],
        ['idx_memory_access_log_type_time', 'idx_memory_access_log_type'],
        ['idx_memory_access_log_time', 'idx_memory_access_log_accessed']
    ] LOOP
        IF EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relname = pair[2]) THEN
            CONTINUE;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relname = pair[1]
                   AND relkind = 'i') THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', pair[1], pair[2]);
            EXECUTE format('COMMENT ON INDEX %I IS %L', pair[2],
                           'unified-memory 025: the first implementation''s name (was ' || pair[1] || ')');
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

DO $$
BEGIN
    IF to_regprocedure('memories_before_insert()') IS NOT NULL AND to_regprocedure('set_memory_defaults()') IS NULL THEN
        ALTER FUNCTION memories_before_insert() RENAME TO set_memory_defaults;
        COMMENT ON FUNCTION set_memory_defaults()
            IS 'unified-memory 025: insert defaults for decay_lambda and expires_at (the first implementation''s name)';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass AND tgname = 'memories_before_insert')
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                       AND tgname = 'set_memory_defaults_trigger') THEN
        ALTER TRIGGER memories_before_insert ON memories RENAME TO set_memory_defaults_trigger;
        COMMENT ON TRIGGER set_memory_defaults_trigger ON memories
            IS 'unified-memory 025: the first implementation''s name (was memories_before_insert)';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass AND tgname = 'memories_before_update')
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass
                       AND tgname = 'update_memories_updated_at') THEN
        ALTER TRIGGER memories_before_update ON memories RENAME TO update_memories_updated_at;
        COMMENT ON TRIGGER update_memories_updated_at ON memories
            IS 'unified-memory 025: the first implementation''s name (was memories_before_update)';
    END IF;
END
$$;

COMMIT;
