-- 018_tenant_isolation.down.sql: back to 016's isolation, functions and grants.
BEGIN;

DROP POLICY IF EXISTS memory_relationships_tenant_isolation ON memory_relationships;
ALTER TABLE memory_relationships NO FORCE ROW LEVEL SECURITY;
ALTER TABLE memory_relationships DISABLE ROW LEVEL SECURITY;

ALTER TABLE memory_access_log DROP CONSTRAINT IF EXISTS memory_access_log_user_id_not_blank;
DROP POLICY IF EXISTS memory_access_log_tenant_isolation ON memory_access_log;
CREATE POLICY memory_access_log_tenant_isolation ON memory_access_log
    USING (user_id = current_setting('app.user_id', true)
           AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''))
    WITH CHECK (user_id = current_setting('app.user_id', true)
                AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''));

DROP FUNCTION IF EXISTS update_memory_access(UUID, VARCHAR, VARCHAR, VARCHAR, VARCHAR, INET, TEXT, TEXT, INTEGER,
                                             TEXT, INTEGER, INTEGER);
DROP FUNCTION IF EXISTS create_memory_relationship(UUID, UUID, VARCHAR, REAL, JSONB);
DROP FUNCTION IF EXISTS soft_delete_memory(UUID, VARCHAR, VARCHAR, VARCHAR);
CREATE OR REPLACE FUNCTION update_memory_access(
    p_memory_id UUID, p_user_id VARCHAR DEFAULT NULL, p_org_id VARCHAR DEFAULT NULL,
    p_access_type VARCHAR DEFAULT 'read', p_correlation_id VARCHAR DEFAULT NULL, p_ip_address INET DEFAULT NULL,
    p_user_agent TEXT DEFAULT NULL, p_request_path TEXT DEFAULT NULL, p_response_status INTEGER DEFAULT NULL,
    p_query_text TEXT DEFAULT NULL, p_results_count INTEGER DEFAULT NULL, p_processing_time_ms INTEGER DEFAULT NULL)
RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    v_user VARCHAR := p_user_id;
    v_org VARCHAR := p_org_id;
BEGIN
    IF p_memory_id IS NOT NULL THEN
        UPDATE memories SET access_count = access_count + 1, last_accessed = now()
        WHERE id = p_memory_id
        RETURNING coalesce(v_user, user_id), coalesce(v_org, org_id) INTO v_user, v_org;
    END IF;
    IF v_user IS NULL THEN
        RAISE EXCEPTION 'update_memory_access: unknown memory % and no user given', p_memory_id
            USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO memory_access_log (memory_id, user_id, org_id, access_type, correlation_id, ip_address, user_agent,
                                   request_path, response_status, query_text, results_count, processing_time_ms)
    VALUES (p_memory_id, v_user, v_org, p_access_type, p_correlation_id, p_ip_address, p_user_agent,
            p_request_path, p_response_status, p_query_text, p_results_count, p_processing_time_ms);
END
$$;
COMMENT ON FUNCTION update_memory_access(UUID, VARCHAR, VARCHAR, VARCHAR, VARCHAR, INET, TEXT, TEXT, INTEGER, TEXT,
                                         INTEGER, INTEGER) IS 'unified-memory 016: count an access and audit it';

CREATE OR REPLACE FUNCTION create_memory_relationship(
    p_source_memory_id UUID, p_derived_memory_id UUID, p_relationship_type VARCHAR,
    p_confidence_score REAL DEFAULT 1.0, p_metadata JSONB DEFAULT '{}')
RETURNS UUID LANGUAGE plpgsql AS $$
DECLARE
    v_id UUID;
BEGIN
    INSERT INTO memory_relationships (source_memory_id, derived_memory_id, relationship_type, confidence_score, metadata)
    VALUES (p_source_memory_id, p_derived_memory_id, p_relationship_type, p_confidence_score, coalesce(p_metadata, '{}'))
    ON CONFLICT (source_memory_id, derived_memory_id, relationship_type)
    DO UPDATE SET confidence_score = EXCLUDED.confidence_score, metadata = EXCLUDED.metadata, updated_at = now()
    RETURNING id INTO v_id;
    UPDATE memories SET derived_memories = derived_memories || to_jsonb(p_derived_memory_id::text)
    WHERE id = p_source_memory_id AND NOT derived_memories ? p_derived_memory_id::text;
    UPDATE memories SET source_memories = source_memories || to_jsonb(p_source_memory_id::text)
    WHERE id = p_derived_memory_id AND NOT source_memories ? p_source_memory_id::text;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION create_memory_relationship(UUID, UUID, VARCHAR, REAL, JSONB) IS 'unified-memory 016: link two memories';

CREATE OR REPLACE FUNCTION soft_delete_memory(p_memory_id UUID, p_user_id VARCHAR DEFAULT NULL,
                                              p_org_id VARCHAR DEFAULT NULL, p_correlation_id VARCHAR DEFAULT NULL)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    v_user VARCHAR;
    v_org VARCHAR;
BEGIN
    UPDATE memories SET deleted_at = now()
    WHERE id = p_memory_id AND deleted_at IS NULL AND (p_user_id IS NULL OR user_id = p_user_id)
    RETURNING user_id, org_id INTO v_user, v_org;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO memory_access_log (memory_id, user_id, org_id, access_type, correlation_id)
    VALUES (p_memory_id, v_user, coalesce(p_org_id, v_org), 'delete', p_correlation_id);
    RETURN true;
END
$$;
COMMENT ON FUNCTION soft_delete_memory(UUID, VARCHAR, VARCHAR, VARCHAR) IS 'unified-memory 016: soft delete with an audit row';

DO $$
DECLARE
    here TEXT := current_schema();
    legacy TEXT;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
        REVOKE ALL ON memories, memory_relationships, memory_access_log FROM unified_memory_app;
        GRANT SELECT, INSERT, UPDATE, DELETE ON memories, memory_relationships TO unified_memory_app;
        GRANT SELECT, INSERT ON memory_access_log TO unified_memory_app;
        GRANT SELECT ON active_memories_with_decay, memory_relationship_details, memory_analytics_by_tenant,
                        memory_audit_summary TO unified_memory_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT ALL ON memory_access_log TO unified_memory_maintenance;
        REVOKE ALL ON memory_migration_runs, memory_migration_checkpoints, memory_migration_quarantine,
                      memory_migration_deferred_indexes, memory_legacy_embeddings FROM unified_memory_maintenance;
        REVOKE ALL ON SEQUENCE memory_migration_runs_run_id_seq, memory_migration_quarantine_id_seq
            FROM unified_memory_maintenance;
        EXECUTE format('REVOKE CREATE ON DATABASE %I FROM unified_memory_maintenance', current_database());
        FOREACH legacy IN ARRAY ARRAY['memory_items', 'memory_entries', 'web_ui_memory_entries', 'long_term_memory']
        LOOP
            IF to_regclass(format('%I.%I', here, legacy)) IS NOT NULL THEN
                EXECUTE format('REVOKE SELECT ON %I.%I FROM unified_memory_maintenance', here, legacy);
            END IF;
        END LOOP;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
            REVOKE unified_memory_app FROM unified_memory_maintenance;
        END IF;
    END IF;
END
$$;

DROP FUNCTION IF EXISTS memory_migration_analyze();

COMMENT ON TABLE memory_relationships IS 'unified-memory 016: NeuroVault links between memories';

COMMIT;
