"""A snapshot of the user-visible catalog, to compare a database before and after."""

from __future__ import annotations

import psycopg

from unified_memory.schema import TRACKING_TABLE

_QUERIES = {
    "relations": "SELECT n.nspname, c.relname, c.relkind::text, c.relrowsecurity, c.relforcerowsecurity "
                 "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND c.relname <> %(t)s::text "
                 "AND c.relname NOT LIKE %(t)s::text || '%%'",
    "columns": "SELECT table_schema, table_name, column_name, data_type, is_nullable, column_default "
               "FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
               "AND table_name <> %(t)s::text",
    "indexes": "SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes "
               "WHERE schemaname NOT IN ('pg_catalog') AND tablename <> %(t)s::text",
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                   "WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) "
                   "AND conrelid::regclass::text <> %(t)s::text",
    "functions": "SELECT p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)) FROM pg_proc p "
                 "JOIN pg_namespace n ON n.oid = p.pronamespace "
                 "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND p.prokind = 'f' "
                 "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e') "
                 "AND %(t)s::text IS NOT NULL",
    "views": "SELECT schemaname, viewname, md5(definition) FROM pg_views "
             "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND %(t)s::text IS NOT NULL",
    "triggers": "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
                "WHERE NOT tgisinternal AND %(t)s::text IS NOT NULL",
    "policies": "SELECT schemaname, tablename, policyname, qual, with_check FROM pg_policies "
                "WHERE %(t)s::text IS NOT NULL",
    "schemas": "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg_%%' AND %(t)s::text IS NOT NULL",
}


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every table, column, index, constraint, function, view, trigger, policy and schema (sorted)."""
    return {name: sorted(conn.execute(q, {"t": TRACKING_TABLE}).fetchall(), key=repr)  # type: ignore[arg-type]
            for name, q in _QUERIES.items()}
