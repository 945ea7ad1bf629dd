-- 018_tenant_isolation.sql: tenant isolation that holds against a hostile tenant, and least privilege.
--
--   1. memory_relationships: forced row-level security; a tenant sees and changes only links whose two
--      memories it can see. A link to a memory it cannot see fails exactly like a link to a missing one.
--   2. memory_access_log: user_id never blank; append-only for the application and the maintenance role
--      (only the table owner can prune it, see README "Tenant isolation").
--   3. Provenance (source_table, source_key, migrated_at) and ids belong to the migration: the application
--      role may insert and update every other column, never these (column privileges).
--   4. update_memory_access, create_memory_relationship, soft_delete_memory with the first implementation's
--      parameter names, and no existence oracle (a foreign id and a missing id give the same answer).
--   5. What unified_memory_maintenance needs (017 tables and sequences, legacy tables, a staging schema).
--   6. Provenance no migration run wrote (the application could, before 018) is set aside, not believed.
-- Atomic and idempotent like 016/017: run after them. Needs PostgreSQL 12+.

BEGIN;

-- 1. Relationships: forced RLS; both ends must be visible (memories' own policy decides what is).
ALTER TABLE memory_relationships ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory_relationships FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS memory_relationships_tenant_isolation ON memory_relationships;
CREATE POLICY memory_relationships_tenant_isolation ON memory_relationships
    USING (EXISTS (SELECT 1 FROM memories s WHERE s.id = source_memory_id)
           AND EXISTS (SELECT 1 FROM memories d WHERE d.id = derived_memory_id))
    WITH CHECK (EXISTS (SELECT 1 FROM memories s WHERE s.id = source_memory_id)
                AND EXISTS (SELECT 1 FROM memories d WHERE d.id = derived_memory_id));

-- 2. The audit log: a blank user is refused; a session whose app.user_id is blank sees nothing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'memory_access_log'::regclass
                   AND conname = 'memory_access_log_user_id_not_blank') THEN
        ALTER TABLE memory_access_log ADD CONSTRAINT memory_access_log_user_id_not_blank
            CHECK (btrim(user_id) <> '') NOT VALID;
    END IF;
    IF EXISTS (SELECT 1 FROM memory_access_log WHERE btrim(user_id) = '') THEN
        -- kept as they are (an audit trail is never rewritten); no application session can see them
        RAISE WARNING 'memory_access_log holds % rows with a blank user_id: the constraint stays NOT VALID',
            (SELECT count(*) FROM memory_access_log WHERE btrim(user_id) = '');
    ELSE
        ALTER TABLE memory_access_log VALIDATE CONSTRAINT memory_access_log_user_id_not_blank;
    END IF;
END
$$;
DROP POLICY IF EXISTS memory_access_log_tenant_isolation ON memory_access_log;
CREATE POLICY memory_access_log_tenant_isolation ON memory_access_log
    USING (user_id = nullif(btrim(current_setting('app.user_id', true)), '')
           AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''))
    WITH CHECK (user_id = nullif(btrim(current_setting('app.user_id', true)), '')
                AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''));

-- 3. Functions: the first implementation's parameter names (callers may pass them by name), security
--    invoker as before (row-level security applies to the caller). Dropped first: a parameter cannot be
--    renamed in place. EXECUTE stays granted to PUBLIC, as in 016.
DROP FUNCTION IF EXISTS update_memory_access(UUID, VARCHAR, VARCHAR, VARCHAR, VARCHAR, INET, TEXT, TEXT, INTEGER,
                                             TEXT, INTEGER, INTEGER);
CREATE FUNCTION update_memory_access(
    memory_id UUID, access_user_id VARCHAR DEFAULT NULL, access_org_id VARCHAR DEFAULT NULL,
    access_type VARCHAR DEFAULT 'read', correlation_id VARCHAR DEFAULT NULL, ip_address INET DEFAULT NULL,
    user_agent TEXT DEFAULT NULL, request_path TEXT DEFAULT NULL, response_status INTEGER DEFAULT 200,
    query_text TEXT DEFAULT NULL, results_count INTEGER DEFAULT NULL, processing_time_ms INTEGER DEFAULT NULL)
RETURNS VOID LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_user VARCHAR := access_user_id;
    v_org VARCHAR := access_org_id;
BEGIN
    IF memory_id IS NOT NULL THEN
        -- only a memory the caller can see, of the user (and org) it names: else "not found", whatever the reason
        UPDATE memories m SET access_count = m.access_count + 1, last_accessed = now()
        WHERE m.id = memory_id AND m.deleted_at IS NULL
          AND (access_user_id IS NULL OR m.user_id = access_user_id)
          AND (access_org_id IS NULL OR m.org_id = access_org_id)
        RETURNING m.user_id, m.org_id INTO v_user, v_org;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'memory % not found', memory_id USING ERRCODE = 'no_data_found';
        END IF;
    END IF;
    IF v_user IS NULL OR btrim(v_user) = '' THEN
        RAISE EXCEPTION 'update_memory_access: no memory and no user given' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    INSERT INTO memory_access_log (memory_id, user_id, org_id, access_type, correlation_id, ip_address, user_agent,
                                   request_path, response_status, query_text, results_count, processing_time_ms)
    VALUES (memory_id, v_user, v_org, access_type, correlation_id, ip_address, user_agent,
            request_path, response_status, query_text, results_count, processing_time_ms);
END
$$;
COMMENT ON FUNCTION update_memory_access(UUID, VARCHAR, VARCHAR, VARCHAR, VARCHAR, INET, TEXT, TEXT, INTEGER, TEXT,
                                         INTEGER, INTEGER)
    IS 'unified-memory 016 (018): count an access and audit it; an unseen memory is not found';

DROP FUNCTION IF EXISTS create_memory_relationship(UUID, UUID, VARCHAR, REAL, JSONB);
CREATE FUNCTION create_memory_relationship(
    source_id UUID, derived_id UUID, rel_type VARCHAR, confidence REAL DEFAULT 1.0, rel_metadata JSONB DEFAULT '{}')
RETURNS UUID LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_id UUID;
    v_missing UUID;
BEGIN
    -- the same error for a memory that does not exist, is deleted, or belongs to another tenant
    SELECT x.id INTO v_missing FROM (VALUES (1, source_id), (2, derived_id)) AS x(n, id)
    WHERE x.id IS NULL OR NOT EXISTS (SELECT 1 FROM memories m WHERE m.id = x.id AND m.deleted_at IS NULL)
    ORDER BY x.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'memory % not found', v_missing USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO memory_relationships AS r (source_memory_id, derived_memory_id, relationship_type, confidence_score,
                                           metadata)
    VALUES (source_id, derived_id, rel_type, confidence, coalesce(rel_metadata, '{}'))
    ON CONFLICT (source_memory_id, derived_memory_id, relationship_type)
    DO UPDATE SET confidence_score = EXCLUDED.confidence_score, metadata = EXCLUDED.metadata, updated_at = now()
    RETURNING r.id INTO v_id;
    UPDATE memories m SET derived_memories = m.derived_memories || to_jsonb(derived_id::text)
    WHERE m.id = source_id AND NOT m.derived_memories ? derived_id::text;
    UPDATE memories m SET source_memories = m.source_memories || to_jsonb(source_id::text)
    WHERE m.id = derived_id AND NOT m.source_memories ? source_id::text;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION create_memory_relationship(UUID, UUID, VARCHAR, REAL, JSONB)
    IS 'unified-memory 016 (018): link two memories the caller can see';

DROP FUNCTION IF EXISTS soft_delete_memory(UUID, VARCHAR, VARCHAR, VARCHAR);
CREATE FUNCTION soft_delete_memory(memory_id UUID, delete_user_id VARCHAR DEFAULT NULL,
                                   delete_org_id VARCHAR DEFAULT NULL, correlation_id VARCHAR DEFAULT NULL)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_user VARCHAR;
    v_org VARCHAR;
BEGIN
    UPDATE memories m SET deleted_at = now()
    WHERE m.id = memory_id AND m.deleted_at IS NULL
      AND (delete_user_id IS NULL OR m.user_id = delete_user_id)
      AND (delete_org_id IS NULL OR m.org_id = delete_org_id)
    RETURNING m.user_id, m.org_id INTO v_user, v_org;
    IF NOT FOUND THEN
        RETURN false;  -- missing, already deleted, or not the caller's: the same answer
    END IF;
    INSERT INTO memory_access_log (memory_id, user_id, org_id, access_type, correlation_id)
    VALUES (memory_id, v_user, v_org, 'delete', correlation_id);
    RETURN true;
END
$$;
COMMENT ON FUNCTION soft_delete_memory(UUID, VARCHAR, VARCHAR, VARCHAR)
    IS 'unified-memory 016 (018): soft delete with an audit row; false when the caller cannot see the memory';

-- 4. Privileges. The application writes every column but ids, provenance and the audit time (column
--    privileges), never TRUNCATE (it bypasses row-level security). The audit log is append-only for the
--    application and the maintenance role. Before PostgreSQL 15 views run as their owner, so the
--    application does not get them there.
DO $$
DECLARE
    here TEXT := current_schema();
    legacy TEXT;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
        REVOKE ALL ON memories, memory_relationships, memory_access_log FROM unified_memory_app;
        GRANT SELECT, DELETE ON memories, memory_relationships TO unified_memory_app;
        GRANT SELECT ON memory_access_log TO unified_memory_app;
        GRANT INSERT (user_id, org_id, text, embedding_id, importance, decay_tier, tags, meta, created_at,
                      updated_at, expires_at, deleted_at, version, session_id, conversation_id, ui_source,
                      memory_type, ai_generated, user_confirmed, access_count, last_accessed, neuro_type,
                      decay_lambda, reflection_count, source_memories, derived_memories, importance_decay,
                      last_reflection),
              UPDATE (user_id, org_id, text, embedding_id, importance, decay_tier, tags, meta, created_at,
                      updated_at, expires_at, deleted_at, version, session_id, conversation_id, ui_source,
                      memory_type, ai_generated, user_confirmed, access_count, last_accessed, neuro_type,
                      decay_lambda, reflection_count, source_memories, derived_memories, importance_decay,
                      last_reflection)
            ON memories TO unified_memory_app;
        GRANT INSERT (source_memory_id, derived_memory_id, relationship_type, confidence_score, metadata,
                      created_at, updated_at),
              UPDATE (source_memory_id, derived_memory_id, relationship_type, confidence_score, metadata, updated_at)
            ON memory_relationships TO unified_memory_app;
        GRANT INSERT (memory_id, user_id, org_id, access_type, correlation_id, ip_address, user_agent, request_path,
                      response_status, query_text, results_count, processing_time_ms, meta)
            ON memory_access_log TO unified_memory_app;
        IF current_setting('server_version_num')::int < 150000 THEN
            REVOKE ALL ON active_memories_with_decay, memory_relationship_details, memory_analytics_by_tenant,
                          memory_audit_summary FROM unified_memory_app;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        REVOKE UPDATE, DELETE, TRUNCATE, TRIGGER, REFERENCES ON memory_access_log FROM unified_memory_maintenance;
        GRANT SELECT, INSERT ON memory_access_log TO unified_memory_maintenance;
        GRANT SELECT, INSERT, UPDATE, DELETE ON memory_migration_runs, memory_migration_checkpoints,
              memory_migration_quarantine, memory_migration_deferred_indexes, memory_legacy_embeddings
            TO unified_memory_maintenance;
        GRANT USAGE, SELECT, UPDATE ON SEQUENCE memory_migration_runs_run_id_seq, memory_migration_quarantine_id_seq
            TO unified_memory_maintenance;
        IF to_regclass('unified_memory_schema_migrations') IS NOT NULL THEN  -- validate reads the schema's drift
            GRANT SELECT ON unified_memory_schema_migrations TO unified_memory_maintenance;
        END IF;
        -- the rollback stages restored tables in a schema of its own
        EXECUTE format('GRANT CREATE ON DATABASE %I TO unified_memory_maintenance', current_database());
        FOREACH legacy IN ARRAY ARRAY['memory_items', 'memory_entries', 'web_ui_memory_entries', 'long_term_memory']
        LOOP
            IF to_regclass(format('%I.%I', here, legacy)) IS NOT NULL THEN
                EXECUTE format('GRANT SELECT ON %I.%I TO unified_memory_maintenance', here, legacy);
            END IF;
        END LOOP;
        -- validate checks isolation as the application role (SET ROLE needs membership)
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
            GRANT unified_memory_app TO unified_memory_maintenance;
        END IF;
    END IF;
    REVOKE UPDATE, DELETE, TRUNCATE, TRIGGER, REFERENCES ON memory_access_log FROM PUBLIC;
END
$$;

-- 4b. Provenance written before 018 by anyone but the migration (the application could then) is not believed:
--     a migrated row's migrated_at lies inside one of the run ledger's runs. Other rows keep their data and
--     lose the provenance, moved to meta.legacy.forged_provenance, so that they neither count as migrated nor
--     get deleted by a rollback. Row-level security is lifted for this one statement (a non-superuser owner
--     would otherwise update nothing, silently).
ALTER TABLE memories NO FORCE ROW LEVEL SECURITY;
DO $$
DECLARE
    moved BIGINT;
BEGIN
    WITH forged AS (
        UPDATE memories m
        SET meta = jsonb_set(m.meta, '{legacy}', coalesce(m.meta -> 'legacy', '{}') || jsonb_build_object(
                       'forged_provenance', jsonb_build_object('source_table', m.source_table,
                                                               'source_key', m.source_key,
                                                               'migrated_at', m.migrated_at))),
            source_table = NULL, source_key = NULL, migrated_at = NULL
        WHERE m.source_table IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM memory_migration_runs r
                          WHERE m.migrated_at >= r.started_at
                            AND m.migrated_at <= coalesce(r.finished_at, 'infinity'::timestamptz))
        RETURNING 1)
    SELECT count(*) INTO moved FROM forged;
    IF moved > 0 THEN
        RAISE WARNING '% memories carried provenance that no migration run wrote: moved to meta.legacy.forged_provenance',
            moved;
    END IF;
END
$$;
ALTER TABLE memories FORCE ROW LEVEL SECURITY;

-- 5. Statistics: before PostgreSQL 17 only a table's owner may ANALYZE it, and the migration's anti-joins and
--    the validator's plans need fresh statistics. This owner's function does only that, for the maintenance role.
DO $$
BEGIN
    EXECUTE format($f$CREATE OR REPLACE FUNCTION memory_migration_analyze() RETURNS VOID
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %I, pg_catalog, pg_temp AS
        'BEGIN ANALYZE memories; ANALYZE memory_migration_quarantine; END'$f$, current_schema());
END
$$;
COMMENT ON FUNCTION memory_migration_analyze() IS 'unified-memory 018: ANALYZE memories and the quarantine as their owner';
REVOKE ALL ON FUNCTION memory_migration_analyze() FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT EXECUTE ON FUNCTION memory_migration_analyze() TO unified_memory_maintenance;
    END IF;
END
$$;

COMMENT ON TABLE memory_relationships IS 'unified-memory 016: NeuroVault links between memories (018: tenant-isolated)';

COMMIT;
