-- 016_unified_memory_schema.sql: the unified memory store (memories, audit log, relationships).
--
-- Atomic and idempotent: run it with `unified-memory schema up`, or by hand with
--   psql -v ON_ERROR_STOP=1 -f data/migrations/postgres/016_unified_memory_schema.sql
-- (set PGOPTIONS='-c lock_timeout=5s' so that a busy table is never blocked for long).
-- Applying it a second time changes nothing. Needs PostgreSQL 12+ and no extension:
-- gen_random_uuid() is core since 13; on 12 it needs pgcrypto and this file says so.
-- Objects of ours carry a COMMENT starting 'unified-memory 016'; same-named objects without it
-- (legacy shape I2) are moved, data and all, to schema unified_memory_displaced, and the down
-- migration moves them back.

BEGIN;

DO $$
BEGIN
    IF current_setting('server_version_num')::int < 130000
       AND NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'gen_random_uuid') THEN
        RAISE EXCEPTION 'PostgreSQL 12 needs the pgcrypto extension for gen_random_uuid()';
    END IF;
END
$$;

-- 1. Move conflicting legacy objects (same names, other definitions) out of the way, keeping their data.
DO $$
DECLARE
    obj record;
    here text := current_schema();
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = here AND c.relname IN ('memories', 'memory_access_log')
                 AND coalesce(obj_description(c.oid, 'pg_class'), '') NOT LIKE 'unified-memory 016%') THEN
        RAISE EXCEPTION 'a table named memories or memory_access_log exists but was not created by 016';
    END IF;
    FOR obj IN
        SELECT c.oid, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = here AND c.relkind IN ('r', 'v', 'm', 'p')
          AND c.relname IN ('memory_relationships', 'active_memories_with_decay',
                            'memory_relationship_details', 'memory_analytics_by_tenant', 'memory_audit_summary')
          AND coalesce(obj_description(c.oid, 'pg_class'), '') NOT LIKE 'unified-memory 016%'
    LOOP
        CREATE SCHEMA IF NOT EXISTS unified_memory_displaced;
        IF obj.relkind = 'v' THEN
            EXECUTE format('ALTER VIEW %I.%I SET SCHEMA unified_memory_displaced', here, obj.relname);
        ELSIF obj.relkind = 'm' THEN
            EXECUTE format('ALTER MATERIALIZED VIEW %I.%I SET SCHEMA unified_memory_displaced', here, obj.relname);
        ELSE
            EXECUTE format('ALTER TABLE %I.%I SET SCHEMA unified_memory_displaced', here, obj.relname);
        END IF;
        RAISE NOTICE 'moved legacy % to schema unified_memory_displaced', obj.relname;
    END LOOP;
    FOR obj IN
        SELECT p.oid::regprocedure AS signature, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = here
          AND p.proname IN ('calculate_decay_score', 'calculate_expires_at', 'update_memory_access',
                            'create_memory_relationship', 'soft_delete_memory')
          AND coalesce(obj_description(p.oid, 'pg_proc'), '') NOT LIKE 'unified-memory 016%'
    LOOP
        CREATE SCHEMA IF NOT EXISTS unified_memory_displaced;
        EXECUTE format('ALTER FUNCTION %s SET SCHEMA unified_memory_displaced', obj.signature);
        RAISE NOTICE 'moved legacy function % to schema unified_memory_displaced', obj.signature;
    END LOOP;
END
$$;

-- 2. Roles: the application role (subject to row-level security) and the maintenance role (BYPASSRLS).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
        CREATE ROLE unified_memory_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        CREATE ROLE unified_memory_maintenance NOLOGIN BYPASSRLS;
    END IF;
EXCEPTION WHEN insufficient_privilege OR unique_violation OR duplicate_object THEN
    RAISE WARNING 'roles unified_memory_app / unified_memory_maintenance could not be created here: %', SQLERRM;
END
$$;

-- 3. Tables.
CREATE TABLE IF NOT EXISTS memories (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          VARCHAR(255) NOT NULL CONSTRAINT memories_user_id_not_blank CHECK (btrim(user_id) <> ''),
    org_id           VARCHAR(255),
    text             TEXT NOT NULL CONSTRAINT memories_text_not_empty CHECK (text <> ''),
    embedding_id     VARCHAR(255),
    importance       INTEGER NOT NULL DEFAULT 5 CONSTRAINT memories_importance_range CHECK (importance BETWEEN 1 AND 10),
    decay_tier       VARCHAR(20) NOT NULL DEFAULT 'short'
                     CONSTRAINT memories_decay_tier_vocab CHECK (decay_tier IN ('short', 'medium', 'long', 'pinned')),
    tags             JSONB NOT NULL DEFAULT '[]' CONSTRAINT memories_tags_array CHECK (jsonb_typeof(tags) = 'array'),
    meta             JSONB NOT NULL DEFAULT '{}' CONSTRAINT memories_meta_object CHECK (jsonb_typeof(meta) = 'object'),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    deleted_at       TIMESTAMPTZ,
    version          INTEGER NOT NULL DEFAULT 1,
    session_id       VARCHAR(255),
    conversation_id  UUID,
    ui_source        VARCHAR(50) NOT NULL DEFAULT 'api'
                     CONSTRAINT memories_ui_source_vocab
                     CHECK (ui_source IN ('web', 'streamlit', 'desktop', 'api', 'ag_ui', 'copilot')),
    memory_type      VARCHAR(50) NOT NULL DEFAULT 'general'
                     CONSTRAINT memories_memory_type_vocab
                     CHECK (memory_type IN ('general', 'fact', 'preference', 'context', 'conversation', 'insight',
                                            'episodic', 'semantic', 'procedural')),
    ai_generated     BOOLEAN NOT NULL DEFAULT false,
    user_confirmed   BOOLEAN NOT NULL DEFAULT true,
    access_count     INTEGER NOT NULL DEFAULT 0 CONSTRAINT memories_access_count_positive CHECK (access_count >= 0),
    last_accessed    TIMESTAMPTZ,
    neuro_type       VARCHAR(20) NOT NULL DEFAULT 'episodic'
                     CONSTRAINT memories_neuro_type_vocab
                     CHECK (neuro_type IN ('episodic', 'semantic', 'procedural', 'general', 'fact', 'preference',
                                           'context', 'conversation', 'insight')),
    decay_lambda     REAL CONSTRAINT memories_decay_lambda_range CHECK (decay_lambda BETWEEN 0 AND 1),
    reflection_count INTEGER NOT NULL DEFAULT 0 CONSTRAINT memories_reflection_count_positive CHECK (reflection_count >= 0),
    source_memories  JSONB NOT NULL DEFAULT '[]' CONSTRAINT memories_source_memories_array CHECK (jsonb_typeof(source_memories) = 'array'),
    derived_memories JSONB NOT NULL DEFAULT '[]' CONSTRAINT memories_derived_memories_array CHECK (jsonb_typeof(derived_memories) = 'array'),
    importance_decay REAL NOT NULL DEFAULT 1.0 CONSTRAINT memories_importance_decay_range CHECK (importance_decay BETWEEN 0 AND 1),
    last_reflection  TIMESTAMPTZ,
    -- provenance, written by the data migration: which legacy row this memory came from, and when
    source_table     VARCHAR(64),
    source_key       TEXT,
    migrated_at      TIMESTAMPTZ,
    CONSTRAINT memories_source_unique UNIQUE (source_table, source_key),
    CONSTRAINT memories_source_complete CHECK ((source_table IS NULL) = (source_key IS NULL))
);
COMMENT ON TABLE memories IS 'unified-memory 016: every memory of every tenant';

-- The audit trail has no foreign key on purpose: it must survive the deletion of the memory it describes.
CREATE TABLE IF NOT EXISTS memory_access_log (
    id                 UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    memory_id          UUID,
    user_id            VARCHAR(255) NOT NULL,
    org_id             VARCHAR(255),
    access_type        VARCHAR(20) NOT NULL
                       CONSTRAINT memory_access_log_type_vocab
                       CHECK (access_type IN ('read', 'write', 'update', 'delete', 'search')),
    correlation_id     VARCHAR(255),
    accessed_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    ip_address         INET,
    user_agent         TEXT,
    request_path       TEXT,
    response_status    INTEGER,
    query_text         TEXT,
    results_count      INTEGER,
    processing_time_ms INTEGER,
    meta               JSONB NOT NULL DEFAULT '{}'
);
COMMENT ON TABLE memory_access_log IS 'unified-memory 016: audit trail of memory access; memory_id is kept after deletion';

CREATE TABLE IF NOT EXISTS memory_relationships (
    id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    source_memory_id  UUID NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    derived_memory_id UUID NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    relationship_type VARCHAR(50) NOT NULL
                      CONSTRAINT memory_relationships_type_vocab
                      CHECK (relationship_type IN ('reflection', 'consolidation', 'pattern', 'decay_promotion',
                                                   'semantic_link')),
    confidence_score  REAL NOT NULL DEFAULT 1.0
                      CONSTRAINT memory_relationships_confidence_range CHECK (confidence_score BETWEEN 0 AND 1),
    metadata          JSONB NOT NULL DEFAULT '{}',
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT memory_relationships_no_self CHECK (source_memory_id <> derived_memory_id),
    CONSTRAINT memory_relationships_unique UNIQUE (source_memory_id, derived_memory_id, relationship_type)
);
COMMENT ON TABLE memory_relationships IS 'unified-memory 016: NeuroVault links between memories';

-- 4. Indexes: tenant first; most are partial on live rows.
CREATE INDEX IF NOT EXISTS idx_memories_user_org ON memories (user_id, org_id) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_user ON memories (user_id) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_org ON memories (org_id) WHERE deleted_at IS NULL AND org_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_memories_created_at ON memories (created_at DESC) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_updated_at ON memories (updated_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_expires_at ON memories (expires_at) WHERE deleted_at IS NULL AND expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_memories_deleted_at ON memories (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_memories_tier_expires ON memories (decay_tier, expires_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_importance_created ON memories (importance DESC, created_at DESC) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_importance_decay ON memories (importance_decay, last_accessed) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_tags ON memories USING gin (tags);
CREATE INDEX IF NOT EXISTS idx_memories_meta ON memories USING gin (meta jsonb_path_ops);
CREATE INDEX IF NOT EXISTS idx_memories_embedding_id ON memories (embedding_id) WHERE embedding_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_memories_session_created ON memories (session_id, created_at) WHERE session_id IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_conversation_created ON memories (conversation_id, created_at) WHERE conversation_id IS NOT NULL AND deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_ui_source_created ON memories (ui_source, created_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_memory_type_created ON memories (memory_type, created_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_neuro_type_created ON memories (neuro_type, created_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_access_count_last ON memories (access_count, last_accessed) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_last_accessed ON memories (last_accessed) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_user_org_type_created ON memories (user_id, org_id, memory_type, created_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_user_org_importance_created ON memories (user_id, org_id, importance, created_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS idx_memories_decay_cleanup ON memories (decay_tier, expires_at, importance) WHERE deleted_at IS NULL AND decay_tier <> 'pinned';
CREATE INDEX IF NOT EXISTS idx_memory_access_log_memory ON memory_access_log (memory_id, accessed_at DESC);
CREATE INDEX IF NOT EXISTS idx_memory_access_log_user ON memory_access_log (user_id, accessed_at DESC);
CREATE INDEX IF NOT EXISTS idx_memory_access_log_org ON memory_access_log (org_id, accessed_at DESC) WHERE org_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_memory_access_log_correlation ON memory_access_log (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_memory_access_log_type_time ON memory_access_log (access_type, accessed_at DESC);
CREATE INDEX IF NOT EXISTS idx_memory_access_log_time ON memory_access_log (accessed_at DESC);
CREATE INDEX IF NOT EXISTS idx_memory_relationships_source ON memory_relationships (source_memory_id);
CREATE INDEX IF NOT EXISTS idx_memory_relationships_derived ON memory_relationships (derived_memory_id);
CREATE INDEX IF NOT EXISTS idx_memory_relationships_type ON memory_relationships (relationship_type);
CREATE INDEX IF NOT EXISTS idx_memory_relationships_created ON memory_relationships (created_at DESC);

-- 5. Functions. None reads the clock while declared IMMUTABLE.
CREATE OR REPLACE FUNCTION default_decay_lambda(p_neuro_type TEXT) RETURNS REAL
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE p_neuro_type WHEN 'episodic' THEN 0.12 WHEN 'semantic' THEN 0.04
                             WHEN 'procedural' THEN 0.02 ELSE 0.08 END::real
$$;
COMMENT ON FUNCTION default_decay_lambda(TEXT) IS 'unified-memory 016: decay rate per neuro_type';

CREATE OR REPLACE FUNCTION calculate_expires_at(p_decay_tier TEXT, p_from TIMESTAMPTZ DEFAULT now())
RETURNS TIMESTAMPTZ LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE p_decay_tier WHEN 'short' THEN p_from + interval '7 days'
                             WHEN 'medium' THEN p_from + interval '30 days'
                             WHEN 'long' THEN p_from + interval '180 days'
                             ELSE NULL END
$$;
COMMENT ON FUNCTION calculate_expires_at(TEXT, TIMESTAMPTZ) IS 'unified-memory 016: expiry per decay tier; pinned never expires';

-- exp(-(lambda - boost) * age_days), clamped to [0, 1]. The exponent is clamped before exp() so that old,
-- often-read, important memories can neither overflow nor underflow REAL.
CREATE OR REPLACE FUNCTION calculate_decay_score(p_created_at TIMESTAMPTZ, p_neuro_type TEXT,
                                                 p_importance INTEGER DEFAULT 5, p_access_count INTEGER DEFAULT 0)
RETURNS REAL LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_created_at IS NULL THEN 1.0::real ELSE
        exp(greatest(-80.0, least(0.0,
            -(default_decay_lambda(p_neuro_type)
              - (least(0.01 * greatest(coalesce(p_access_count, 0), 0), 0.5) + 0.02 * (coalesce(p_importance, 5) - 5)))
            * greatest(extract(epoch FROM now() - p_created_at) / 86400.0, 0)::double precision)))::real
    END
$$;
COMMENT ON FUNCTION calculate_decay_score(TIMESTAMPTZ, TEXT, INTEGER, INTEGER) IS 'unified-memory 016: decay score in [0, 1]';

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

-- 6. Triggers: defaults on insert; updated_at, version and expiry maintenance on update.
CREATE OR REPLACE FUNCTION memories_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.decay_lambda := coalesce(NEW.decay_lambda, default_decay_lambda(NEW.neuro_type));
    IF NEW.decay_tier = 'pinned' THEN
        NEW.expires_at := NULL;
    ELSIF NEW.expires_at IS NULL THEN
        NEW.expires_at := calculate_expires_at(NEW.decay_tier, coalesce(NEW.created_at, now()));
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION memories_before_insert() IS 'unified-memory 016: insert defaults for decay_lambda and expires_at';

-- Counting an access (access_count, last_accessed) is not a change of the memory, nor is the vectors step
-- pointing embedding_id at the memory's vector: they move neither version nor updated_at. Every other change does.
CREATE OR REPLACE FUNCTION memories_before_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.neuro_type IS DISTINCT FROM OLD.neuro_type AND NEW.decay_lambda IS NOT DISTINCT FROM OLD.decay_lambda
       OR NEW.decay_lambda IS NULL THEN
        NEW.decay_lambda := default_decay_lambda(NEW.neuro_type);
    END IF;
    IF NEW.decay_tier = 'pinned' THEN
        NEW.expires_at := NULL;
    ELSIF NEW.decay_tier IS DISTINCT FROM OLD.decay_tier AND NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at THEN
        NEW.expires_at := calculate_expires_at(NEW.decay_tier, now());
    END IF;
    IF (to_jsonb(NEW) - 'access_count' - 'last_accessed' - 'updated_at' - 'version' - 'embedding_id')
       IS DISTINCT FROM (to_jsonb(OLD) - 'access_count' - 'last_accessed' - 'updated_at' - 'version' - 'embedding_id')
    THEN
        NEW.updated_at := now();
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION memories_before_update() IS 'unified-memory 016: updated_at, version, decay_lambda and expiry on update';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass AND tgname = 'memories_before_insert') THEN
        CREATE TRIGGER memories_before_insert BEFORE INSERT ON memories
            FOR EACH ROW EXECUTE FUNCTION memories_before_insert();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memories'::regclass AND tgname = 'memories_before_update') THEN
        -- Only an UPDATE that sets one of these columns can change a memory; the bookkeeping columns
        -- (access_count, last_accessed, embedding_id; updated_at and version themselves) do not fire it.
        CREATE TRIGGER memories_before_update
            BEFORE UPDATE OF id, user_id, org_id, text, importance, decay_tier, tags, meta, created_at, expires_at,
                             deleted_at, session_id, conversation_id, ui_source, memory_type, ai_generated,
                             user_confirmed, neuro_type, decay_lambda, reflection_count, source_memories,
                             derived_memories, importance_decay, last_reflection, source_table, source_key,
                             migrated_at
            ON memories FOR EACH ROW EXECUTE FUNCTION memories_before_update();
    END IF;
END
$$;

-- 7. Views (security_invoker on PostgreSQL 15+, so row-level security applies to whoever reads them).
CREATE OR REPLACE VIEW active_memories_with_decay AS
SELECT m.*, s.decay_score, (s.decay_score < 0.1 AND m.decay_tier <> 'pinned') AS should_cleanup
FROM memories m
CROSS JOIN LATERAL (SELECT calculate_decay_score(m.created_at, m.neuro_type, m.importance, m.access_count)
                           AS decay_score) s
WHERE m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now());
COMMENT ON VIEW active_memories_with_decay IS 'unified-memory 016: live memories with their decay score';

CREATE OR REPLACE VIEW memory_relationship_details AS
SELECT r.id, r.source_memory_id, r.derived_memory_id, r.relationship_type, r.confidence_score, r.metadata,
       r.created_at, r.updated_at,
       s.text AS source_text, s.memory_type AS source_memory_type, s.importance AS source_importance,
       d.text AS derived_text, d.memory_type AS derived_memory_type, d.importance AS derived_importance,
       s.user_id, s.org_id
FROM memory_relationships r
JOIN memories s ON s.id = r.source_memory_id
JOIN memories d ON d.id = r.derived_memory_id;
COMMENT ON VIEW memory_relationship_details IS 'unified-memory 016: relationships with both sides';

CREATE OR REPLACE VIEW memory_analytics_by_tenant AS
SELECT user_id, org_id, neuro_type, memory_type, ui_source,
       count(*) AS memory_count,
       avg(importance)::numeric(6, 2) AS avg_importance,
       avg(calculate_decay_score(created_at, neuro_type, importance, access_count))::numeric(6, 4) AS avg_decay_score,
       count(*) FILTER (WHERE decay_tier = 'pinned') AS pinned_count,
       min(created_at) AS first_created_at,
       max(created_at) AS last_created_at,
       sum(access_count) AS total_accesses
FROM memories
WHERE deleted_at IS NULL
GROUP BY user_id, org_id, neuro_type, memory_type, ui_source;
COMMENT ON VIEW memory_analytics_by_tenant IS 'unified-memory 016: per-tenant memory statistics';

CREATE OR REPLACE VIEW memory_audit_summary AS
SELECT user_id, org_id, access_type, date_trunc('day', accessed_at) AS access_day,
       count(*) AS access_count,
       count(DISTINCT memory_id) AS distinct_memories,
       avg(processing_time_ms)::numeric(10, 2) AS avg_processing_time_ms,
       count(*) FILTER (WHERE response_status >= 400) AS error_count
FROM memory_access_log
GROUP BY user_id, org_id, access_type, date_trunc('day', accessed_at);
COMMENT ON VIEW memory_audit_summary IS 'unified-memory 016: audit activity per tenant and day';

DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW active_memories_with_decay SET (security_invoker = true);
        ALTER VIEW memory_relationship_details SET (security_invoker = true);
        ALTER VIEW memory_analytics_by_tenant SET (security_invoker = true);
        ALTER VIEW memory_audit_summary SET (security_invoker = true);
    END IF;
END
$$;

-- 8. Tenant isolation, enforced by the database. A session says who it is with
--    SET app.user_id = '...' (and app.org_id for an organisation); unset means no rows.
ALTER TABLE memories ENABLE ROW LEVEL SECURITY;
ALTER TABLE memories FORCE ROW LEVEL SECURITY;
ALTER TABLE memory_access_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE memory_access_log FORCE ROW LEVEL SECURITY;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE tablename = 'memories' AND policyname = 'memories_tenant_isolation'
                   AND schemaname = current_schema()) THEN
        CREATE POLICY memories_tenant_isolation ON memories
            USING (user_id = current_setting('app.user_id', true)
                   AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''))
            WITH CHECK (user_id = current_setting('app.user_id', true)
                        AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE tablename = 'memory_access_log'
                   AND policyname = 'memory_access_log_tenant_isolation' AND schemaname = current_schema()) THEN
        CREATE POLICY memory_access_log_tenant_isolation ON memory_access_log
            USING (user_id = current_setting('app.user_id', true)
                   AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''))
            WITH CHECK (user_id = current_setting('app.user_id', true)
                        AND org_id IS NOT DISTINCT FROM nullif(current_setting('app.org_id', true), ''));
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON memories, memory_relationships TO unified_memory_app;
        GRANT SELECT, INSERT ON memory_access_log TO unified_memory_app;
        GRANT SELECT ON active_memories_with_decay, memory_relationship_details, memory_analytics_by_tenant,
                        memory_audit_summary TO unified_memory_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT ALL ON memories, memory_access_log, memory_relationships TO unified_memory_maintenance;
        GRANT SELECT ON active_memories_with_decay, memory_relationship_details, memory_analytics_by_tenant,
                        memory_audit_summary TO unified_memory_maintenance;
    END IF;
END
$$;

COMMIT;
