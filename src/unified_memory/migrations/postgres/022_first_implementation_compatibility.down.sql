-- 022_first_implementation_compatibility.down.sql: 016's definitions of the decay functions and the views back.
BEGIN;

DROP TRIGGER IF EXISTS update_memory_relationships_updated_at ON memory_relationships;
DO $$
BEGIN
    IF coalesce(obj_description(to_regprocedure('update_updated_at_column()'), 'pg_proc'), '') LIKE 'unified-memory 022%'
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = to_regprocedure('update_updated_at_column()')) THEN
        DROP FUNCTION update_updated_at_column();
    END IF;
END
$$;

DROP VIEW IF EXISTS memory_audit_summary;
DROP VIEW IF EXISTS memory_analytics_by_tenant;
DROP VIEW IF EXISTS memory_relationship_details;
DROP VIEW IF EXISTS active_memories_with_decay;
DROP FUNCTION IF EXISTS calculate_decay_score(TIMESTAMPTZ, TEXT, INTEGER, INTEGER);
DROP FUNCTION IF EXISTS calculate_expires_at(TEXT, TIMESTAMPTZ);

CREATE FUNCTION calculate_expires_at(p_decay_tier TEXT, p_from TIMESTAMPTZ DEFAULT now())
RETURNS TIMESTAMPTZ LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE p_decay_tier WHEN 'short' THEN p_from + interval '7 days'
                             WHEN 'medium' THEN p_from + interval '30 days'
                             WHEN 'long' THEN p_from + interval '180 days'
                             ELSE NULL END
$$;
COMMENT ON FUNCTION calculate_expires_at(TEXT, TIMESTAMPTZ) IS 'unified-memory 016: expiry per decay tier; pinned never expires';

CREATE FUNCTION calculate_decay_score(p_created_at TIMESTAMPTZ, p_neuro_type TEXT,
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

CREATE VIEW active_memories_with_decay AS
SELECT m.id, m.user_id, m.org_id, m.text, m.embedding_id, m.importance, m.decay_tier, m.tags, m.meta, m.created_at,
       m.updated_at, m.expires_at, m.deleted_at, m.version, m.session_id, m.conversation_id, m.ui_source,
       m.memory_type, m.ai_generated, m.user_confirmed, m.access_count, m.last_accessed, m.neuro_type,
       m.decay_lambda, m.reflection_count, m.source_memories, m.derived_memories, m.importance_decay,
       m.last_reflection, m.source_table, m.source_key, m.migrated_at,
       s.decay_score, (s.decay_score < 0.1 AND m.decay_tier <> 'pinned') AS should_cleanup
FROM memories m
CROSS JOIN LATERAL (SELECT calculate_decay_score(m.created_at, m.neuro_type, m.importance, m.access_count)
                           AS decay_score) s
WHERE m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now());
COMMENT ON VIEW active_memories_with_decay IS 'unified-memory 016: live memories with their decay score';

CREATE VIEW memory_relationship_details AS
SELECT r.id, r.source_memory_id, r.derived_memory_id, r.relationship_type, r.confidence_score, r.metadata,
       r.created_at, r.updated_at,
       s.text AS source_text, s.memory_type AS source_memory_type, s.importance AS source_importance,
       d.text AS derived_text, d.memory_type AS derived_memory_type, d.importance AS derived_importance,
       s.user_id, s.org_id
FROM memory_relationships r
JOIN memories s ON s.id = r.source_memory_id
JOIN memories d ON d.id = r.derived_memory_id;
COMMENT ON VIEW memory_relationship_details IS 'unified-memory 016: relationships with both sides';

CREATE VIEW memory_analytics_by_tenant AS
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

CREATE VIEW memory_audit_summary AS
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
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_app') THEN
        GRANT SELECT ON active_memories_with_decay, memory_relationship_details, memory_analytics_by_tenant,
                        memory_audit_summary TO unified_memory_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT SELECT ON active_memories_with_decay, memory_relationship_details, memory_analytics_by_tenant,
                        memory_audit_summary TO unified_memory_maintenance;
    END IF;
END
$$;

COMMIT;
