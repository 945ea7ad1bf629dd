"""Drift: objects of an applied schema file that are missing or altered, and their repair.

When the runner applies a file it records, per object the file created or changed, a fingerprint of the
object's catalog definition (``unified_memory_schema_objects``): tables, columns, constraints, indexes,
triggers, functions, views, policies and row-level security flags. The newest applied file that touched an
object says what it must look like. ``check`` compares the live catalog with that; ``repair`` recreates what
is missing or altered from the recorded definitions, in one transaction, and records what it did
(``unified_memory_schema_repairs``). A file applied outside the runner, or adopted, is attributed by the
COMMENT every one of our files gives its objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, scalar_row
from psycopg.types.json import Jsonb

from .checks import Serialised
from .db import relation_exists
from .errors import SchemaError

LEDGER = "unified_memory_schema_migrations"
Problem = Literal["missing", "altered"]

_COLUMNS = sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS objects JSONB, ADD COLUMN IF NOT EXISTS repairs JSONB"
                   ).format(sql.Identifier(LEDGER))

# one row per object: kind, name, fingerprint, ddl (a definition the server produced), info, owner comment
_SNAPSHOT = """
WITH rel AS (
    SELECT c.oid, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
           coalesce(obj_description(c.oid, 'pg_class'), '') AS comment
    FROM pg_class c
    WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p', 'v')
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
)
SELECT 'table' AS kind, relname AS name, relkind::text AS fingerprint, NULL AS ddl,
       jsonb_build_object('table', relname) AS info, comment FROM rel WHERE relkind IN ('r', 'p')
UNION ALL
SELECT 'rls', relname, relrowsecurity::text || ',' || relforcerowsecurity::text, NULL,
       jsonb_build_object('table', relname, 'enabled', relrowsecurity, 'forced', relforcerowsecurity), comment
FROM rel WHERE relkind IN ('r', 'p')
UNION ALL
SELECT 'column', r.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || '|' || a.attnotnull::text || '|'
           || coalesce(pg_get_expr(d.adbin, d.adrelid), ''),
       NULL, jsonb_build_object('table', r.relname, 'column', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
                                'notnull', a.attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid)), r.comment
FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE r.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', r.relname || '.' || k.conname, md5(pg_get_constraintdef(k.oid)) || ',' || k.convalidated::text,
       pg_get_constraintdef(k.oid), jsonb_build_object('table', r.relname, 'name', k.conname), r.comment
FROM rel r JOIN pg_constraint k ON k.conrelid = r.oid
UNION ALL
SELECT 'index', i.relname, md5(pg_get_indexdef(x.indexrelid)) || ',' || x.indisvalid::text,
       pg_get_indexdef(x.indexrelid),
       jsonb_build_object('table', r.relname, 'name', i.relname),
       coalesce(nullif(obj_description(i.oid, 'pg_class'), ''), r.comment)
FROM rel r JOIN pg_index x ON x.indrelid = r.oid JOIN pg_class i ON i.oid = x.indexrelid
WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid AND k.contype IN ('p', 'u', 'x'))
UNION ALL
SELECT 'trigger', r.relname || '.' || t.tgname, md5(pg_get_triggerdef(t.oid)) || ',' || t.tgenabled::text,
       pg_get_triggerdef(t.oid), jsonb_build_object('table', r.relname, 'name', t.tgname),
       coalesce(nullif(obj_description(t.oid, 'pg_trigger'), ''), r.comment)
FROM rel r JOIN pg_trigger t ON t.tgrelid = r.oid WHERE NOT t.tgisinternal
UNION ALL
SELECT 'view', relname, md5(pg_get_viewdef(oid) || coalesce(reloptions::text, '')), pg_get_viewdef(oid),
       jsonb_build_object('name', relname, 'options', reloptions), comment FROM rel WHERE relkind = 'v'
UNION ALL
SELECT 'policy', p.tablename || '.' || p.policyname,
       md5(concat_ws('|', p.permissive, p.cmd, p.roles::text, p.qual, p.with_check)), NULL,
       jsonb_build_object('table', p.tablename, 'name', p.policyname, 'permissive', p.permissive, 'cmd', p.cmd,
                          'roles', p.roles, 'qual', p.qual, 'with_check', p.with_check),
       coalesce(obj_description(to_regclass(quote_ident(p.tablename)), 'pg_class'), '')
FROM pg_policies p WHERE p.schemaname = current_schema()
UNION ALL
SELECT 'function', p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)), pg_get_functiondef(p.oid),
       jsonb_build_object('name', p.proname), coalesce(obj_description(p.oid, 'pg_proc'), '')
FROM pg_proc p
WHERE p.pronamespace = current_schema()::regnamespace AND p.prokind = 'f'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
"""

# an index a bulk load dropped (memory_migration_deferred_indexes) is what its recorded definition says: a file
# applied meanwhile (025 renames them) records it, and the rebuilt index matches it
_DEFERRED = """
SELECT 'index' AS kind, d.index_name AS name, md5(d.definition) || ',true' AS fingerprint, d.definition AS ddl,
       jsonb_build_object('table', 'memories', 'name', d.index_name) AS info,
       coalesce(obj_description(to_regclass('memories'), 'pg_class'), '') AS comment
FROM memory_migration_deferred_indexes d
WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace
                  AND c.relname = d.index_name)
"""
DEFERRED_TABLE = "memory_migration_deferred_indexes"


@dataclass(frozen=True)
class Obj:
    """One catalog object as the snapshot sees it."""

    fingerprint: str
    ddl: str | None
    info: dict[str, Any]
    comment: str


Snapshot = dict[tuple[str, str], Obj]


@dataclass(frozen=True)
class Drift(Serialised):
    """An object an applied file expects that is missing or differs."""

    kind: str
    name: str
    version: str
    problem: Problem

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.version}) is {self.problem}"


def snapshot(conn: psycopg.Connection) -> Snapshot:
    """Every object of the current schema that a file can create, with its fingerprint (the indexes a bulk load
    deferred as their recorded definitions)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_SNAPSHOT.encode()).fetchall()
        if relation_exists(conn, DEFERRED_TABLE):
            rows += cur.execute(_DEFERRED.encode()).fetchall()
    return {(r["kind"], r["name"]): Obj(r["fingerprint"], r["ddl"], r["info"], r["comment"]) for r in rows}


def record(conn: psycopg.Connection, version: str, before: Snapshot | None, after: Snapshot, *,
           file_text: str = "") -> int:
    """Record in the file's ledger row what file ``version`` created or changed.

    ``before`` None: the file's objects are known by their comment (a file applied outside the runner, or 016
    adopted), and an object an earlier file recorded that is gone now counts as removed by this one when
    ``file_text`` names it (a rename: 025). The ledger row must exist.
    """
    if before is None:
        prefix = f"unified-memory {version}"
        rows = {k: o for k, o in after.items() if o.comment.startswith(prefix)}
        removed = [k for k in _expected(conn) if k not in after and _names(file_text, k[1])]
    else:
        rows = {k: o for k, o in after.items() if k not in before or before[k].fingerprint != o.fingerprint}
        removed = [k for k in before if k not in after]
    objects: dict[str, Any] = {f"{kind}\t{name}": {"fingerprint": o.fingerprint, "ddl": o.ddl, "info": o.info}
                               for (kind, name), o in rows.items()}
    objects.update({f"{kind}\t{name}": None for kind, name in removed})
    conn.execute(_COLUMNS)
    conn.execute(sql.SQL("UPDATE {} SET objects = %s WHERE version = %s").format(sql.Identifier(LEDGER)),
                 [Jsonb(objects), version])
    return len(rows)


def _names(text: str, name: str) -> bool:
    """Whether SQL ``text`` names the object keyed ``name`` (``table.trigger``, ``function(args)``, ``index``)."""
    bare = name.split("(", 1)[0].rsplit(".", 1)[-1]
    return bool(bare) and re.search(rf"(?<![\w$]){re.escape(bare)}(?![\w$])", text) is not None


def _recorded(conn: psycopg.Connection) -> list[tuple[str, dict[str, Any]]]:
    """(version, objects) of every applied file with fingerprints, oldest first."""
    if not relation_exists(conn, LEDGER) or conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'objects' "
            "AND NOT attisdropped", [LEDGER]).fetchone() is None:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        return [(r["version"], r["objects"]) for r in cur.execute(sql.SQL(
            "SELECT version, objects FROM {} WHERE objects IS NOT NULL ORDER BY version").format(
            sql.Identifier(LEDGER)))]


def _expected(conn: psycopg.Connection) -> dict[tuple[str, str], dict[str, Any]]:
    """Per object, what the newest applied file that touched it recorded (a file that removed it: not expected)."""
    merged: dict[tuple[str, str], dict[str, Any] | None] = {}
    for version, objects in _recorded(conn):
        for key, value in objects.items():
            kind, name = key.split("\t", 1)
            merged[(kind, name)] = None if value is None else {**value, "version": version, "name": name}
    return {k: v for k, v in merged.items() if v is not None}


def tracked_versions(conn: psycopg.Connection) -> set[str]:
    """Applied files whose objects were fingerprinted."""
    return {version for version, _ in _recorded(conn)}


def check(conn: psycopg.Connection) -> list[Drift]:
    """Objects of applied files that are missing or altered (indexes a running load deferred are not drift)."""
    expected = _expected(conn)
    if not expected:
        return []
    live = snapshot(conn)
    deferred = _deferred_names(conn)
    found = []
    for (kind, name), want in sorted(expected.items()):
        have = live.get((kind, name))
        if kind == "index" and name in deferred:
            continue
        if have is None:
            found.append(Drift(kind, name, want["version"], "missing"))
        elif have.fingerprint != want["fingerprint"]:
            found.append(Drift(kind, name, want["version"], "altered"))
    return found


def _deferred_names(conn: psycopg.Connection) -> set[str]:
    if not relation_exists(conn, DEFERRED_TABLE):
        return set()
    with conn.cursor(row_factory=scalar_row) as cur:
        return set(cur.execute(sql.SQL("SELECT index_name FROM {}").format(sql.Identifier(DEFERRED_TABLE))))


# ------------------------------------------------------------------------------------------- repair
_ORDER = ("table", "column", "function", "constraint", "index", "trigger", "view", "policy", "rls")


def repair(conn: psycopg.Connection) -> list[Drift]:
    """Recreate every missing or altered object from its recorded definition, in the caller's transaction.

    Raises:
        SchemaError: an object cannot be recreated (a dropped table: its rows are gone; restore a backup),
            or drift remains after the repair.
    """
    drifted = check(conn)
    expected = _expected(conn)
    for item in sorted(drifted, key=lambda d: _ORDER.index(d.kind)):
        want = expected[(item.kind, item.name)]
        _REPAIRS[item.kind](conn, want, item.problem)
    left = check(conn)
    if left:
        raise SchemaError("repair left drift behind: " + "; ".join(str(d) for d in left[:8]))
    for version in sorted({d.version for d in drifted}):
        done = [d.to_dict() for d in drifted if d.version == version]
        conn.execute(sql.SQL("UPDATE {} SET repairs = coalesce(repairs, '[]'::jsonb) "
                             "|| jsonb_build_array(jsonb_build_object('repaired_at', now(), 'objects', %s::jsonb)) "
                             "WHERE version = %s").format(sql.Identifier(LEDGER)), [Jsonb(done), version])
    return drifted


def _table(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    raise SchemaError(f"table {want['name']} is {problem}: its rows cannot be recreated; restore it from a backup")


def _column(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    info = want["info"]
    table, column = sql.Identifier(info["table"]), sql.Identifier(info["column"])
    typ, default = sql.SQL(info["type"]), info["default"]
    with conn.cursor(row_factory=dict_row) as cur:
        now = cur.execute(
            "SELECT format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS notnull, "
            "pg_get_expr(d.adbin, d.adrelid) AS default "
            "FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            "WHERE a.attrelid = to_regclass(quote_ident(%s)) AND a.attname = %s AND NOT a.attisdropped",
            [info["table"], info["column"]]).fetchone()
    if now is None:
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(table, column, typ))
    elif now["type"] != info["type"]:
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {c} TYPE {t} USING {c}::{t}").format(table, c=column, t=typ))
    if now is None or now["default"] != default:
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(table, column, sql.SQL(default))
                     if default else sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(table, column))
    if now is None or now["notnull"] != info["notnull"]:
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} {} NOT NULL").format(
            table, column, sql.SQL("SET" if info["notnull"] else "DROP")))


def _function(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    try:
        with conn.transaction():
            conn.execute(want["ddl"].encode())
    except psycopg.errors.InvalidFunctionDefinition:  # parameter names changed: drop, then create
        conn.execute(b"DROP FUNCTION " + want["name"].encode())
        conn.execute(want["ddl"].encode())


def _constraint(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    table, name = sql.Identifier(want["info"]["table"]), sql.Identifier(want["info"]["name"])
    conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(table, name))
    conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(table, name) + sql.SQL(want["ddl"]))


def _index(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(want["info"]["name"])))
    conn.execute(want["ddl"].encode())


def _trigger(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
        sql.Identifier(want["info"]["name"]), sql.Identifier(want["info"]["table"])))
    conn.execute(want["ddl"].encode())


def _view(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    name, options = sql.Identifier(want["info"]["name"]), want["info"]["options"]
    with_options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(sql.SQL(o) for o in options)) if options \
        else sql.SQL("")
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE OR REPLACE VIEW {}{} AS ").format(name, with_options) + sql.SQL(want["ddl"]))
    except psycopg.errors.InvalidTableDefinition:  # its columns changed: drop, then create
        conn.execute(sql.SQL("DROP VIEW {}").format(name))
        conn.execute(sql.SQL("CREATE VIEW {}{} AS ").format(name, with_options) + sql.SQL(want["ddl"]))
    for role in ("unified_memory_app", "unified_memory_maintenance"):
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(name, sql.Identifier(role)))


def _policy(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    info = want["info"]
    table, name = sql.Identifier(info["table"]), sql.Identifier(info["name"])
    roles = sql.SQL(", ").join(sql.SQL("PUBLIC") if r == "public" else sql.Identifier(r) for r in info["roles"])
    conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(name, table))
    statement = sql.SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}").format(
        name, table, sql.SQL(info["permissive"]), sql.SQL(info["cmd"]), roles)
    if info["qual"] is not None:
        statement += sql.SQL(" USING (") + sql.SQL(info["qual"]) + sql.SQL(")")
    if info["with_check"] is not None:
        statement += sql.SQL(" WITH CHECK (") + sql.SQL(info["with_check"]) + sql.SQL(")")
    conn.execute(statement)


def _rls(conn: psycopg.Connection, want: dict[str, Any], problem: Problem) -> None:
    info = want["info"]
    conn.execute(sql.SQL("ALTER TABLE {} {} ROW LEVEL SECURITY, {} ROW LEVEL SECURITY").format(
        sql.Identifier(info["table"]), sql.SQL("ENABLE" if info["enabled"] else "DISABLE"),
        sql.SQL("FORCE" if info["forced"] else "NO FORCE")))


_REPAIRS = {"table": _table, "column": _column, "function": _function, "constraint": _constraint, "index": _index,
            "trigger": _trigger, "view": _view, "policy": _policy, "rls": _rls}
