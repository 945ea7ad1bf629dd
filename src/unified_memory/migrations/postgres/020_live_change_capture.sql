-- 020_live_change_capture.sql: migrate while the assistant keeps writing to the legacy tables.
--   memory_migration_changes    every insert, update and delete on a captured legacy table (applied_at NULL:
--                               waiting for catch-up); keys are the row's key, or its ctid for long_term_memory
--   memory_migration_synced     per memory, the version the migration last wrote (a higher version: the
--                               application changed it in the unified store, and no legacy change overwrites it)
--   memory_migration_conflicts  legacy changes not applied because the memory was changed in the unified store
--   memory_migration_live       per legacy table: capture since, cutover, cleanup (with the final backup)
--   memory_migration_live_log   the ledger of capture, cutover, cleanup and their undoing
-- Triggers on legacy tables are created by the functions below (called by the tool), never by this file.
-- Atomic and idempotent like 016/017; depends on 016 + 017 only; PostgreSQL 12..16.

BEGIN;

CREATE TABLE IF NOT EXISTS memory_migration_changes (
    change_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_table TEXT NOT NULL,
    op           TEXT NOT NULL CONSTRAINT memory_migration_changes_op_vocab CHECK (op IN ('I', 'U', 'D')),
    old_key      TEXT,
    new_key      TEXT,
    captured_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    applied_at   TIMESTAMPTZ,
    outcome      TEXT
);
COMMENT ON TABLE memory_migration_changes IS 'unified-memory 020: legacy writes captured during the migration';
-- one index besides the key: each one costs every captured write (the waiting set is small; scans use this)
CREATE INDEX IF NOT EXISTS idx_memory_migration_changes_waiting
    ON memory_migration_changes (change_id) WHERE applied_at IS NULL;

CREATE TABLE IF NOT EXISTS memory_migration_synced (
    memory_id UUID PRIMARY KEY REFERENCES memories (id) ON DELETE CASCADE,
    version   INTEGER NOT NULL
);
COMMENT ON TABLE memory_migration_synced IS 'unified-memory 020: the version of a memory the migration last wrote';

CREATE TABLE IF NOT EXISTS memory_migration_conflicts (
    conflict_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    change_id      BIGINT,
    source_table   TEXT NOT NULL,
    source_key     TEXT NOT NULL,
    op             TEXT,
    memory_id      UUID,
    memory_version INTEGER,
    synced_version INTEGER,
    detected_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE memory_migration_conflicts IS 'unified-memory 020: legacy changes kept out because the app changed the memory';

CREATE TABLE IF NOT EXISTS memory_migration_live (
    source_table  TEXT PRIMARY KEY,
    capture_since TIMESTAMPTZ,
    cutover_at    TIMESTAMPTZ,
    cleaned_at    TIMESTAMPTZ,
    final_backup  TEXT
);
COMMENT ON TABLE memory_migration_live IS 'unified-memory 020: capture, cutover and cleanup state per legacy table';

CREATE TABLE IF NOT EXISTS memory_migration_live_log (
    entry_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    action   TEXT NOT NULL CONSTRAINT memory_migration_live_log_action_vocab
             CHECK (action IN ('capture_on', 'cutover', 'cleanup', 'rollback')),
    tables   TEXT[] NOT NULL DEFAULT '{}',
    detail   JSONB NOT NULL DEFAULT '{}'
);
COMMENT ON TABLE memory_migration_live_log IS 'unified-memory 020: ledger of capture, cutover, cleanup and rollback';

-- Capture: an AFTER ROW trigger per legacy table writes the old and new key of every change. The key is a
-- column of the table (p_key) or, for a table without one (p_key NULL), the row's ctid: an UPDATE moves the
-- ctid, so an edited long_term_memory row is seen as its old version gone and its new version arrived.
-- The trigger function is generated per table (no dynamic SQL per row) and runs as its owner, so the
-- application needs no privilege on the change log.
CREATE OR REPLACE FUNCTION memory_migration_capture_on(p_table REGCLASS, p_key TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v_table TEXT;
    v_schema TEXT;
    v_fn TEXT;
    v_old TEXT;
    v_new TEXT;
    v_qualified TEXT;
BEGIN
    SELECT c.relname, format('%I.%I', n.nspname, c.relname) INTO v_table, v_qualified
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
    IF v_table IS NULL OR v_table NOT IN ('memory_items', 'memory_entries', 'web_ui_memory_entries',
                                          'long_term_memory') THEN
        RAISE EXCEPTION 'change capture is only for the legacy memory tables' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'memory_migration_capture') THEN
        RETURN false;
    END IF;
    SELECT n.nspname INTO v_schema FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'memory_migration_changes'::regclass;
    v_fn := 'memory_migration_capture_' || v_table;
    v_old := CASE WHEN p_key IS NULL THEN 'OLD.ctid::text' ELSE format('OLD.%I::text', p_key) END;
    v_new := CASE WHEN p_key IS NULL THEN 'NEW.ctid::text' ELSE format('NEW.%I::text', p_key) END;
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$I.%2$I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp AS $b$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO %1$I.memory_migration_changes (source_table, op, new_key) VALUES (%3$L, 'I', %5$s);
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO %1$I.memory_migration_changes (source_table, op, old_key, new_key)
                VALUES (%3$L, 'U', %4$s, %5$s);
            ELSE
                INSERT INTO %1$I.memory_migration_changes (source_table, op, old_key) VALUES (%3$L, 'D', %4$s);
            END IF;
            RETURN NULL;
        END $b$ $f$, v_schema, v_fn, v_table, v_old, v_new);
    EXECUTE format('COMMENT ON FUNCTION %I.%I() IS %L', v_schema, v_fn,
                   'unified-memory 020: change capture of ' || v_table);
    EXECUTE format('REVOKE ALL ON FUNCTION %I.%I() FROM PUBLIC', v_schema, v_fn);  -- fired as a trigger only
    EXECUTE format('CREATE TRIGGER memory_migration_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION %I.%I()', p_table, v_schema, v_fn);
    -- TRUNCATE fires no row trigger: before it, every row still there is recorded as deleted
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$I.%2$I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp AS $b$
        BEGIN
            INSERT INTO %1$I.memory_migration_changes (source_table, op, old_key) SELECT %3$L, 'D', %4$s FROM %5$s t;
            RETURN NULL;
        END $b$ $f$, v_schema, v_fn || '_truncate', v_table,
        CASE WHEN p_key IS NULL THEN 't.ctid::text' ELSE format('t.%I::text', p_key) END, v_qualified);
    EXECUTE format('REVOKE ALL ON FUNCTION %I.%I() FROM PUBLIC', v_schema, v_fn || '_truncate');
    EXECUTE format('CREATE TRIGGER memory_migration_capture_truncate BEFORE TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()', p_table, v_schema, v_fn || '_truncate');
    RETURN true;
END
$$;
COMMENT ON FUNCTION memory_migration_capture_on(REGCLASS, TEXT) IS 'unified-memory 020: start capturing a legacy table';

CREATE OR REPLACE FUNCTION memory_migration_capture_off(p_table REGCLASS) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v_fn TEXT := 'memory_migration_capture_' || (SELECT relname FROM pg_class WHERE oid = p_table);
    v_schema TEXT;
BEGIN
    SELECT n.nspname INTO v_schema FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'memory_migration_changes'::regclass;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'memory_migration_capture') THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER memory_migration_capture ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS memory_migration_capture_truncate ON %s', p_table);
    EXECUTE format('DROP FUNCTION IF EXISTS %I.%I()', v_schema, v_fn);
    EXECUTE format('DROP FUNCTION IF EXISTS %I.%I()', v_schema, v_fn || '_truncate');
    RETURN true;
END
$$;
COMMENT ON FUNCTION memory_migration_capture_off(REGCLASS) IS 'unified-memory 020: stop capturing a legacy table';

-- After cutover the legacy tables are read-only for everyone: a write fails loudly instead of vanishing.
CREATE OR REPLACE FUNCTION memory_migration_read_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'legacy table % is read-only since the cutover to memories', TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'the assistant writes to the unified memories table now';
END
$$;
COMMENT ON FUNCTION memory_migration_read_only() IS 'unified-memory 020: refuses writes to a legacy table after cutover';

CREATE OR REPLACE FUNCTION memory_migration_read_only_on(p_table REGCLASS) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT relname FROM pg_class WHERE oid = p_table) NOT IN ('memory_items', 'memory_entries',
                                                                   'web_ui_memory_entries', 'long_term_memory') THEN
        RAISE EXCEPTION 'the read-only guard is only for the legacy memory tables' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'memory_migration_read_only') THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TRIGGER memory_migration_read_only BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION memory_migration_read_only()', p_table);
    RETURN true;
END
$$;
COMMENT ON FUNCTION memory_migration_read_only_on(REGCLASS) IS 'unified-memory 020: make a legacy table read-only';

CREATE OR REPLACE FUNCTION memory_migration_read_only_off(p_table REGCLASS) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'memory_migration_read_only') THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TRIGGER memory_migration_read_only ON %s', p_table);
    RETURN true;
END
$$;
COMMENT ON FUNCTION memory_migration_read_only_off(REGCLASS) IS 'unified-memory 020: undo the read-only guard';

-- Least privilege: the maintenance role starts and stops capture and the read-only guard only through these
-- functions, which run as their owner (a fixed search_path, pg_temp last) and accept only the legacy tables; it
-- needs no TRIGGER privilege on the legacy tables nor CREATE on the schema. The application calls none of them.
DO $$
DECLARE
    f TEXT;
BEGIN
    FOREACH f IN ARRAY ARRAY['memory_migration_capture_on(regclass, text)', 'memory_migration_capture_off(regclass)',
                             'memory_migration_read_only_on(regclass)', 'memory_migration_read_only_off(regclass)']
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %I, pg_temp', f, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO unified_memory_maintenance', f);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'unified_memory_maintenance') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON memory_migration_changes, memory_migration_synced,
            memory_migration_conflicts, memory_migration_live, memory_migration_live_log TO unified_memory_maintenance;
    END IF;
END
$$;

COMMIT;
