-- 022_first_implementation_compatibility.sql: the first implementation's interface keeps working, and the decay
-- functions and the four views never raise for any row.
--
-- An application or dashboard written for the first implementation's 016 calls
--   calculate_decay_score(memory_created_at => ..., memory_neuro_type => ..., memory_importance_score => ...,
--                         memory_access_count => ...)
--   calculate_expires_at(decay_tier => ..., created_at => ...)
-- and reads current_decay_score, total_count, access_date, source_content, ... from the views. The functions
-- take its parameter names (same argument types and order as 016, so positional callers are unchanged); the
-- views keep every column of 016 in place and gain the first implementation's names as extra columns at the end.
-- memory_relationships gets its update_memory_relationships_updated_at trigger.
-- Never raising: infinite and far-future or far-past times are clamped before any arithmetic, averages are cast
-- to types wide enough for every INTEGER, and expiry saturates at 'infinity' instead of overflowing.
-- Atomic and idempotent like 016; the down file puts 016's definitions back.

BEGIN;

-- 1. 016's definitions go (views first: they call the function). Ours carry a comment 'unified-memory 022'.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = current_schema()::regnamespace
               AND proname = 'calculate_decay_score' AND 'p_created_at' = ANY(proargnames)) THEN
        DROP VIEW IF EXISTS active_memories_with_decay;
        DROP VIEW IF EXISTS memory_analytics_by_tenant;
        DROP FUNCTION calculate_decay_score(TIMESTAMPTZ, TEXT, INTEGER, INTEGER);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = current_schema()::regnamespace
               AND proname = 'calculate_expires_at' AND 'p_decay_tier' = ANY(proargnames)) THEN
        DROP FUNCTION calculate_expires_at(TEXT, TIMESTAMPTZ);
    END IF;
    IF coalesce(obj_description(to_regclass('memory_relationship_details'), 'pg_class'), '') LIKE 'unified-memory 016%' THEN
        DROP VIEW memory_relationship_details;
    END IF;
    IF coalesce(obj_description(to_regclass('memory_audit_summary'), 'pg_class'), '') LIKE 'unified-memory 016%' THEN
        DROP VIEW memory_audit_summary;
    END IF;
    IF coalesce(obj_description(to_regclass('active_memories_with_decay'), 'pg_class'), '') LIKE 'unified-memory 016%' THEN
        DROP VIEW active_memories_with_decay;
    END IF;
    IF coalesce(obj_description(to_regclass('memory_analytics_by_tenant'), 'pg_class'), '') LIKE 'unified-memory 016%' THEN
        DROP VIEW memory_analytics_by_tenant;
    END IF;
END
$$;

-- 2. The functions, with the first implementation's parameter names.
CREATE OR REPLACE FUNCTION calculate_expires_at(decay_tier TEXT, created_at TIMESTAMPTZ DEFAULT now())
RETURNS TIMESTAMPTZ LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN $1 IS NULL OR $1 NOT IN ('short', 'medium', 'long') OR $2 IS NULL THEN NULL
                WHEN NOT isfinite($2) THEN $2
                WHEN $2 > timestamptz '294275-06-01 00:00:00+00' THEN 'infinity'::timestamptz
                ELSE $2 + CASE $1 WHEN 'short' THEN interval '7 days' WHEN 'medium' THEN interval '30 days'
                                  ELSE interval '180 days' END
           END
$$;
COMMENT ON FUNCTION calculate_expires_at(TEXT, TIMESTAMPTZ)
    IS 'unified-memory 022: expiry per decay tier; pinned never expires; never raises';

-- exp(-(lambda - boost) * age_days), clamped to [0, 1]: the age is clamped to [0, 1e7] days (an infinite or
-- far-past time is as old as that, a future one is new), the importance is read as a double, the exponent is
-- clamped to [-80, 0]: no argument can overflow, underflow or divide.
CREATE OR REPLACE FUNCTION calculate_decay_score(memory_created_at TIMESTAMPTZ, memory_neuro_type TEXT DEFAULT 'episodic',
                                                 memory_importance_score INTEGER DEFAULT 5,
                                                 memory_access_count INTEGER DEFAULT 0)
RETURNS REAL LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN $1 IS NULL OR $1 = 'infinity'::timestamptz THEN 1.0::real ELSE
        exp(greatest(-80.0::float8, least(0.0::float8,
            -(default_decay_lambda($2)::float8
              - (least(0.01 * greatest(coalesce($4, 0), 0)::float8, 0.5) + 0.02 * (coalesce($3, 5)::float8 - 5.0)))
            * CASE WHEN $1 = '-infinity'::timestamptz THEN 1e7::float8
                   ELSE least(greatest((extract(epoch FROM now())::float8 - extract(epoch FROM $1)::float8) / 86400.0,
                                       0.0), 1e7) END)))::real
    END
$$;
COMMENT ON FUNCTION calculate_decay_score(TIMESTAMPTZ, TEXT, INTEGER, INTEGER)
    IS 'unified-memory 022: decay score in [0, 1]; never raises';

-- 3. The views: 016's columns in place, the first implementation's names at the end.
CREATE OR REPLACE VIEW active_memories_with_decay AS
SELECT m.id, m.user_id, m.org_id, m.text, m.embedding_id, m.importance, m.decay_tier, m.tags, m.meta, m.created_at,
       m.updated_at, m.expires_at, m.deleted_at, m.version, m.session_id, m.conversation_id, m.ui_source,
       m.memory_type, m.ai_generated, m.user_confirmed, m.access_count, m.last_accessed, m.neuro_type,
       m.decay_lambda, m.reflection_count, m.source_memories, m.derived_memories, m.importance_decay,
       m.last_reflection, m.source_table, m.source_key, m.migrated_at,
       s.decay_score, (s.decay_score < 0.1 AND m.decay_tier <> 'pinned') AS should_cleanup,
       s.decay_score AS current_decay_score
FROM memories m
CROSS JOIN LATERAL (SELECT calculate_decay_score(m.created_at, m.neuro_type, m.importance, m.access_count)
                           AS decay_score) s
WHERE m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now());
COMMENT ON VIEW active_memories_with_decay
    IS 'unified-memory 022: live memories with their decay score (current_decay_score: the first implementation''s name)';

CREATE OR REPLACE VIEW memory_relationship_details AS
SELECT r.id, r.source_memory_id, r.derived_memory_id, r.relationship_type, r.confidence_score, r.metadata,
       r.created_at, r.updated_at,
       s.text AS source_text, s.memory_type AS source_memory_type, s.importance AS source_importance,
       d.text AS derived_text, d.memory_type AS derived_memory_type, d.importance AS derived_importance,
       s.user_id, s.org_id,
       s.text AS source_content, s.memory_type AS source_type, d.text AS derived_content,
       d.memory_type AS derived_type, s.created_at AS source_created_at, d.created_at AS derived_created_at
FROM memory_relationships r
JOIN memories s ON s.id = r.source_memory_id
JOIN memories d ON d.id = r.derived_memory_id;
COMMENT ON VIEW memory_relationship_details
    IS 'unified-memory 022: relationships with both sides (and the first implementation''s column names)';

CREATE OR REPLACE VIEW memory_analytics_by_tenant AS
SELECT user_id, org_id, neuro_type, memory_type, ui_source,
       count(*) AS memory_count,
       avg(importance)::numeric(6, 2) AS avg_importance,
       avg(calculate_decay_score(created_at, neuro_type, importance, access_count))::numeric(6, 4) AS avg_decay_score,
       count(*) FILTER (WHERE decay_tier = 'pinned') AS pinned_count,
       min(created_at) AS first_created_at,
       max(created_at) AS last_created_at,
       sum(access_count) AS total_accesses,
       count(*) AS total_count,
       avg(access_count)::numeric(14, 2) AS avg_access_count,
       count(*) FILTER (WHERE ai_generated) AS ai_generated_count,
       count(*) FILTER (WHERE user_confirmed) AS user_confirmed_count,
       max(created_at) AS latest_created,
       min(created_at) AS earliest_created
FROM memories
WHERE deleted_at IS NULL
GROUP BY user_id, org_id, neuro_type, memory_type, ui_source;
COMMENT ON VIEW memory_analytics_by_tenant
    IS 'unified-memory 022: per-tenant memory statistics (and the first implementation''s column names)';

CREATE OR REPLACE VIEW memory_audit_summary AS
SELECT user_id, org_id, access_type, date_trunc('day', accessed_at) AS access_day,
       count(*) AS access_count,
       count(DISTINCT memory_id) AS distinct_memories,
       avg(processing_time_ms)::numeric(14, 2) AS avg_processing_time_ms,
       count(*) FILTER (WHERE response_status >= 400) AS error_count,
       date_trunc('day', accessed_at)::date AS access_date,
       count(DISTINCT memory_id) AS unique_memories_accessed
FROM memory_access_log
GROUP BY user_id, org_id, access_type, date_trunc('day', accessed_at);
COMMENT ON VIEW memory_audit_summary
    IS 'unified-memory 022: audit activity per tenant and day (and the first implementation''s column names)';

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

-- 4. memory_relationships.updated_at follows every update (the first implementation's trigger name).
CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION update_updated_at_column() IS 'unified-memory 022: updated_at := now() on update';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'memory_relationships'::regclass
                   AND tgname = 'update_memory_relationships_updated_at') THEN
        CREATE TRIGGER update_memory_relationships_updated_at BEFORE UPDATE ON memory_relationships
            FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
    END IF;
END
$$;

-- 5. Re-applying 016 by hand after this file moves our views and functions to unified_memory_displaced (they
--    are not 016's); re-applying this file after it removes those copies, so the pair changes nothing.
DO $$
DECLARE
    obj record;
BEGIN
    IF to_regnamespace('unified_memory_displaced') IS NULL THEN
        RETURN;
    END IF;
    FOR obj IN SELECT c.relname FROM pg_class c
               WHERE c.relnamespace = 'unified_memory_displaced'::regnamespace AND c.relkind = 'v'
                 AND coalesce(obj_description(c.oid, 'pg_class'), '') LIKE 'unified-memory 022%' LOOP
        EXECUTE format('DROP VIEW unified_memory_displaced.%I', obj.relname);
    END LOOP;
    FOR obj IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
               WHERE p.pronamespace = 'unified_memory_displaced'::regnamespace
                 AND coalesce(obj_description(p.oid, 'pg_proc'), '') LIKE 'unified-memory 022%' LOOP
        EXECUTE format('DROP FUNCTION %s', obj.signature);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = 'unified_memory_displaced'::regnamespace)
       AND NOT EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = 'unified_memory_displaced'::regnamespace)
       AND NOT EXISTS (SELECT 1 FROM pg_type WHERE typnamespace = 'unified_memory_displaced'::regnamespace) THEN
        DROP SCHEMA unified_memory_displaced;
    END IF;
END
$$;

COMMIT;
