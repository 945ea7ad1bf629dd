"""Proof of tenant isolation, for the validator: what the application role can reach, and hostile probes.

``reachable`` enumerates from the catalog every relation and function the application role can use and says
what is wrong with each (a table without forced row-level security or without a policy, a view that runs as
its owner, a privilege that bypasses row-level security, a SECURITY DEFINER function). ``probes`` then acts
as the real application role (``SET LOCAL ROLE``) for two sampled tenants and two probe tenants, inside a
transaction that is always rolled back, and tries what a hostile tenant would: read, change, delete and link
another tenant's rows, tell a foreign id from a missing one, write provenance or choose an id, and read with
a blank tenant. Every finding names the probe and the relation; never memory text.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import scalar_row

from . import contract
from .db import all_rows, first_column, scalar

APP_ROLE = "unified_memory_app"
MAINTENANCE_ROLE = "unified_memory_maintenance"
# Columns only the migration (or the database) writes.
RESERVED_COLUMNS = {"memories": ("id", "source_table", "source_key", "migrated_at"),
                    "memory_relationships": ("id",), "memory_access_log": ("id", "accessed_at")}
_BYPASSING = ("TRUNCATE", "REFERENCES", "TRIGGER")
_MISSING = uuid.UUID("00000000-0000-4000-8000-00000000dead")


@dataclass
class Finding:
    """One isolation check: its name, the problems found (none: it passed) and the evidence."""

    name: str
    ok: str
    problems: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)


_REACHABLE = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind, c.relrowsecurity AS rls,
       c.relforcerowsecurity AS forced, coalesce(c.reloptions, '{}') @> '{security_invoker=true}' AS invoker,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies,
       array(SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                                        'TRIGGER']) AS p
             WHERE has_table_privilege(%(role)s, c.oid, p)) AS privileges
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
  AND n.nspname NOT LIKE 'pg_temp%%'
  AND (has_table_privilege(%(role)s, c.oid, 'SELECT') OR has_table_privilege(%(role)s, c.oid, 'INSERT')
       OR has_table_privilege(%(role)s, c.oid, 'UPDATE') OR has_table_privilege(%(role)s, c.oid, 'DELETE')
       OR has_table_privilege(%(role)s, c.oid, 'TRUNCATE') OR has_table_privilege(%(role)s, c.oid, 'REFERENCES')
       OR has_table_privilege(%(role)s, c.oid, 'TRIGGER'))
ORDER BY 1, 2"""

_FUNCTIONS = """
SELECT p.oid::regprocedure::text AS signature, p.prosecdef AS definer
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
  AND has_function_privilege(%(role)s, p.oid, 'EXECUTE')
ORDER BY 1"""


def reachable(conn: psycopg.Connection) -> Finding:
    """Every relation and function the application role can use, and what is wrong with each."""
    found = Finding("isolation.reachable", "every relation the application role can use is a table with forced "
                    "row-level security and a policy, or a security_invoker view; no SECURITY DEFINER function")
    relations = all_rows(conn, _REACHABLE, {"role": APP_ROLE})
    here = str(scalar(conn, "SELECT current_schema()"))
    for r in relations:
        label, rls = f"{r['schema']}.{r['name']}", r["rls"]
        if r["kind"] in ("r", "p", "f"):
            if not (rls and r["forced"]) and not (r["schema"] == here and r["name"] in contract.RLS_TABLES):
                found.problems.append(f"{label}: row-level security is {'not forced' if rls else 'disabled'}")
            elif rls and not r["policies"]:  # (the RLS of our own tables is isolation.rls's to report)
                found.problems.append(f"{label}: row-level security has no policy")
        elif not r["invoker"]:
            found.problems.append(f"{label}: a view the application can read runs as its owner (no security_invoker)")
        found.problems += [f"{label}: {APP_ROLE} holds {p}, which bypasses row-level security"
                           for p in r["privileges"] if p in _BYPASSING]
    creatable = first_column(conn, "SELECT nspname FROM pg_namespace WHERE nspname = ANY(current_schemas(false)) "
                             "AND has_schema_privilege(%s, oid, 'CREATE')", [APP_ROLE])
    found.problems += [f"schema {schema}: {APP_ROLE} can CREATE objects there that could shadow ours "
                       f"(REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC)" for schema in creatable]
    functions = all_rows(conn, _FUNCTIONS, {"role": APP_ROLE})
    found.problems += [f"function {f['signature']} runs as its owner (SECURITY DEFINER) and the application can "
                       "call it" for f in functions if f["definer"]]
    found.evidence = {"relations": {f"{r['schema']}.{r['name']}": list(r["privileges"]) for r in relations},
                      "functions": len(functions)}
    return found


def reserved_columns(conn: psycopg.Connection) -> Finding:
    """Ids, provenance and the audit time are not the application's to write."""
    found = Finding("isolation.reserved_columns", "the application can write neither ids, provenance "
                    "(source_table, source_key, migrated_at) nor the audit time")
    for table, columns in RESERVED_COLUMNS.items():
        for column in columns:
            for privilege in ("INSERT", "UPDATE"):
                if conn.execute("SELECT has_column_privilege(%s, %s, %s, %s)",
                                [APP_ROLE, table, column, privilege]).fetchone() == (True,):
                    found.problems.append(f"{APP_ROLE} can {privilege} {table}.{column}")
    return found


def audit_append_only(conn: psycopg.Connection) -> Finding:
    """Neither the application nor the maintenance role can rewrite the audit log; a blank user is refused."""
    found = Finding("isolation.audit_append_only", "the audit log is append-only for the application and the "
                    "maintenance role, and refuses a blank user")
    for role in (APP_ROLE, MAINTENANCE_ROLE, "public"):
        for privilege in ("UPDATE", "DELETE", "TRUNCATE", "TRIGGER"):
            if conn.execute("SELECT has_table_privilege(%s, 'memory_access_log', %s)",
                            [role, privilege]).fetchone() == (True,):
                found.problems.append(f"{role} can {privilege} memory_access_log")
    check = conn.execute("SELECT convalidated FROM pg_constraint WHERE conrelid = 'memory_access_log'::regclass "
                         "AND conname = 'memory_access_log_user_id_not_blank'").fetchone()
    if check is None:
        found.problems.append("memory_access_log accepts a blank user_id (no check constraint)")
    return found


Probe = Callable[[psycopg.Connection, "_Tenants"], list[str]]


@dataclass
class _Tenants:
    """Who probes whom: ``me`` acts, ``other`` is the victim; ids of each side's memories."""

    me: tuple[str, str | None]
    other: tuple[str, str | None]
    mine: list[uuid.UUID]
    theirs: list[uuid.UUID]


def probes(conn: psycopg.Connection) -> Finding:
    """Hostile probes as the application role, for two sampled tenants and two probe tenants (rolled back)."""
    found = Finding("isolation.probes", "as the application role, reads, writes, links, provenance writes and "
                    "existence tests across tenants were all refused")
    with conn.transaction(force_rollback=True):
        pairs = _pairs(conn)
        for pair in pairs:
            for name, probe in PROBES.items():
                found.problems += [f"{name} ({pair.me[0]} against {pair.other[0]}): {p}" for p in _run(conn, pair,
                                                                                                      probe)]
    found.evidence = {"pairs": len(pairs), "probes": list(PROBES)}
    return found


def _pairs(conn: psycopg.Connection) -> list[_Tenants]:
    """The probe tenants (with a relationship and an audit row each) and the two largest real tenants."""
    made: dict[str, list[uuid.UUID]] = {}
    for user in ("um-validate:probe-a", "um-validate:probe-b"):
        made[user] = first_column(
            conn, "INSERT INTO memories (user_id, text) VALUES (%s, 'probe'), (%s, 'probe') RETURNING id", [user, user])
        conn.execute("INSERT INTO memory_relationships (source_memory_id, derived_memory_id, relationship_type) "
                     "VALUES (%s, %s, 'reflection')", made[user])
        conn.execute("INSERT INTO memory_access_log (memory_id, user_id, access_type) VALUES (%s, %s, 'read')",
                     [made[user][0], user])
    a, b = ("um-validate:probe-a", None), ("um-validate:probe-b", None)
    pairs = [_Tenants(a, b, made[a[0]], made[b[0]])]
    sampled = conn.execute("SELECT user_id, org_id, (array_agg(id ORDER BY id))[1:2] FROM memories "
                           "WHERE user_id NOT LIKE 'um-validate:%%' AND deleted_at IS NULL GROUP BY 1, 2 "
                           "ORDER BY count(*) DESC, 1 LIMIT 2").fetchall()
    if len(sampled) == 2:
        first, second = sampled
        pairs.append(_Tenants((first[0], first[1]), (second[0], second[1]), list(first[2]), list(second[2])))
    return pairs


def _run(conn: psycopg.Connection, pair: _Tenants, probe: Probe) -> list[str]:
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(APP_ROLE)))
            conn.execute("SET LOCAL row_security = on")
            _declare(conn, pair.me)
            return probe(conn, pair)
    except psycopg.Error as exc:
        return [f"the probe itself failed: [{exc.sqlstate}] {exc.diag.message_primary}"]


def _declare(conn: psycopg.Connection, tenant: tuple[str, str | None]) -> None:
    conn.execute("SELECT set_config('app.user_id', %s, true), set_config('app.org_id', %s, true)",
                 [tenant[0], tenant[1] or ""])


def _error(conn: psycopg.Connection, statement: str, params: list[Any]) -> tuple[str | None, str] | None:
    """(SQLSTATE, message with the ids blanked) of ``statement``, or None when it succeeded."""
    try:
        with conn.transaction():
            conn.execute(statement.encode(), params)
    except psycopg.Error as exc:
        message = exc.diag.message_primary or ""
        for value in params:
            message = message.replace(str(value), "<id>")
        return exc.sqlstate, message
    return None


def _count(conn: psycopg.Connection, statement: str, params: list[Any]) -> int:
    with conn.transaction(force_rollback=True), conn.cursor(row_factory=scalar_row) as cur:
        cur.execute(statement.encode(), params)
        return cur.rowcount if cur.description is None else int(cur.fetchone() or 0)


def _reads(conn: psycopg.Connection, t: _Tenants) -> list[str]:
    problems = []
    for table, column in (("memories", "id"), ("memory_relationships", "source_memory_id"),
                          ("memory_relationships", "derived_memory_id")):
        seen = _count(conn, f"SELECT count(*) FROM {table} WHERE {column} = ANY(%s)", [t.theirs])  # noqa: S608
        if seen:
            problems.append(f"{table} shows {seen} rows of the other tenant")
    logged = _count(conn, "SELECT count(*) FROM memory_access_log "
                          "WHERE (user_id, org_id) IS NOT DISTINCT FROM (%s::varchar, %s::varchar)", list(t.other))
    if logged:
        problems.append(f"memory_access_log shows {logged} rows of the other tenant")
    return problems


def _writes(conn: psycopg.Connection, t: _Tenants) -> list[str]:
    problems = []
    for statement in ("UPDATE memories SET importance = 1 WHERE id = ANY(%s)",
                      "DELETE FROM memories WHERE id = ANY(%s)",
                      "UPDATE memory_relationships SET confidence_score = 0 WHERE source_memory_id = ANY(%s)",
                      "DELETE FROM memory_relationships WHERE derived_memory_id = ANY(%s)"):
        if _count(conn, statement, [t.theirs]):
            problems.append(f"changed the other tenant's rows: {statement.split(' WHERE')[0]}")
    forged = _error(conn, "INSERT INTO memories (user_id, org_id, text) VALUES (%s, %s, 'forged')", list(t.other))
    if forged is None:
        problems.append("wrote a memory owned by the other tenant")
    return problems


def _links(conn: psycopg.Connection, t: _Tenants) -> list[str]:
    """Linking to a foreign memory must fail exactly like linking to a missing one."""
    problems = []
    insert = ("INSERT INTO memory_relationships (source_memory_id, derived_memory_id, relationship_type) "
              "VALUES (%s, %s, 'semantic_link')")
    for statement in (insert, "SELECT create_memory_relationship(%s, %s, 'semantic_link')"):
        foreign = _error(conn, statement, [t.mine[0], t.theirs[0]])
        missing = _error(conn, statement, [t.mine[0], _MISSING])
        if foreign is None or foreign != missing:
            problems.append(f"a link to a foreign memory answered {foreign}, to a missing one {missing}")
    for statement in ("SELECT update_memory_access(%s, %s)",):
        foreign = _error(conn, statement, [t.theirs[0], t.me[0]])
        missing = _error(conn, statement, [_MISSING, t.me[0]])
        if foreign is None or foreign != missing:
            problems.append(f"update_memory_access answered {foreign} for a foreign id, {missing} for a missing one")
    if _count(conn, "SELECT count(*) FROM (SELECT soft_delete_memory(%s, NULL) AS d) x WHERE d", [t.theirs[0]]):
        problems.append("soft_delete_memory deleted the other tenant's memory")
    return problems


def _provenance(conn: psycopg.Connection, t: _Tenants) -> list[str]:
    problems = []
    for statement, params in (
            ("UPDATE memories SET source_table = 'memory_items', source_key = 'x' WHERE id = %s", [t.mine[0]]),
            ("UPDATE memories SET migrated_at = now() WHERE id = %s", [t.mine[0]]),
            ("INSERT INTO memories (id, user_id, org_id, text) VALUES (%s, %s, %s, 'squat')", [_MISSING, *t.me]),
            ("INSERT INTO memories (user_id, org_id, text, source_table, source_key) "
             "VALUES (%s, %s, 'squat', 'memory_items', 'k')", list(t.me))):
        if _error(conn, statement, params) is None:
            problems.append(f"allowed: {statement.split(' (')[0].split(' WHERE')[0]}")
    return problems


def _blank_tenant(conn: psycopg.Connection, t: _Tenants) -> list[str]:
    problems = []
    for blank in ("", " "):
        conn.execute("SELECT set_config('app.user_id', %s, true), set_config('app.org_id', '', true)", [blank])
        for table in ("memories", "memory_relationships", "memory_access_log"):
            seen = _count(conn, f"SELECT count(*) FROM {table}", [])  # noqa: S608 (fixed names)
            if seen:
                problems.append(f"a session with app.user_id {blank!r} sees {seen} rows of {table}")
    return problems


PROBES: dict[str, Probe] = {"reads": _reads, "writes": _writes, "links": _links, "provenance": _provenance,
                            "blank_tenant": _blank_tenant}
