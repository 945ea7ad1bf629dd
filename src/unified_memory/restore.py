"""Rebuilding a backed-up table's definition without trusting it: the rollback's restore step.

A backup's definitions are data: whoever could write the file could have forged them. So a restore never runs
more than table creation with the privileges of the data it restores:

- column names are quoted (``sql.Identifier``) and types are resolved by the server (``::regtype`` and
  ``format_type``), never pasted;
- every statement that carries an expression from the file (defaults, CHECKs, indexes) and the COPY of the rows
  run as ``unified_memory_restore``: a NOLOGIN role that is a member of nothing, so it cannot read server files
  or call any function revoked from PUBLIC (``pg_read_file``, ``lo_import``, ...): a forged CHECK fails there;
- before the transaction commits, each restored table is proven to be exactly its definition (columns and
  types, constraint and index names), and no default, constraint or index calls a function that role may not
  execute (a forged expression on an empty table would not have run yet: it is refused, and never stays);
- only then is the table handed to the role running the rollback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .db import scalar
from .errors import RollbackError

RESTORE_ROLE = "unified_memory_restore"

_OLD_TYPE = re.compile(r"^[a-z][a-z0-9_ ]*(\(\d+(,\s*\d+)?\))?( with(out)? time zone)?(\[\])*$")
_INDEX = re.compile(r"^CREATE (?P<unique>UNIQUE )?INDEX (?:[a-z0-9_]+|\"(?:[^\"]|\"\")+\") ON (?:ONLY )?"
                    r"[a-z0-9_\".]+ USING (?P<rest>.+)$", re.DOTALL)
_NAME = r"(?:[a-z_][a-z0-9_$]*|\"(?:[^\"]|\"\")+\")"
_NAMES = rf"\({_NAME}(?:, {_NAME})*\)"
_ACTION = r"(?:NO ACTION|RESTRICT|CASCADE|SET NULL|SET DEFAULT)"
_FOREIGN_KEY = re.compile(
    rf"^FOREIGN KEY {_NAMES} REFERENCES (?:{_NAME}\.)?{_NAME}{_NAMES}( MATCH (FULL|SIMPLE))?"
    rf"( ON UPDATE {_ACTION})?( ON DELETE {_ACTION}( {_NAMES})?)?( DEFERRABLE( INITIALLY DEFERRED)?)?"
    r"( NOT VALID)?$")

_ROLE_STATE = """
SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls OR r.rolreplication OR r.rolcanlogin
           AS privileged,
       EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid) AS member_of_something
FROM pg_roles r WHERE r.rolname = %s"""
_CAN_CREATE_ROLE = "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
_FUNCTIONS = r"""
WITH trees AS (
    SELECT conbin::text AS tree FROM pg_constraint WHERE conrelid = %(t)s::regclass AND conbin IS NOT NULL
    UNION ALL SELECT adbin::text FROM pg_attrdef WHERE adrelid = %(t)s::regclass
    UNION ALL SELECT coalesce(indexprs::text, '') || coalesce(indpred::text, '') FROM pg_index
    WHERE indrelid = %(t)s::regclass),
found AS (
    SELECT m[2]::oid AS fn FROM trees, regexp_matches(tree, ':(funcid|opfuncid|aggfnoid|winfnoid) (\d+)', 'g') m
    UNION SELECT o.oprcode::oid FROM trees, regexp_matches(tree, ':opno (\d+)', 'g') m
    JOIN pg_operator o ON o.oid = m[1]::oid)
SELECT DISTINCT p.oid::regprocedure::text AS function FROM found JOIN pg_proc p ON p.oid = found.fn
WHERE NOT has_function_privilege(%(role)s, p.oid, 'EXECUTE') ORDER BY 1"""
_ACTUAL_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type FROM pg_attribute a
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""
_ACTUAL_NAMES = """
SELECT (SELECT coalesce(array_agg(conname::text ORDER BY conname), '{}') FROM pg_constraint
        WHERE conrelid = %(t)s::regclass AND contype IN ('p', 'u', 'c', 'f', 'x')) AS constraints,
       (SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}') FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %(t)s::regclass
        AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid
                        AND k.conrelid = i.indrelid)) AS indexes"""


def prepare(conn: psycopg.Connection, schema: str) -> None:
    """Make sure the restore role exists, holds nothing, and may create tables in ``schema`` (the staging one).

    Raises:
        RollbackError: the role is missing and cannot be created here, or it was given privileges.
    """
    if scalar(conn, "SELECT 1 FROM pg_roles WHERE rolname = %s", [RESTORE_ROLE]) is None:
        if scalar(conn, _CAN_CREATE_ROLE) is not True:
            raise RollbackError(f"role {RESTORE_ROLE} is missing: run `unified-memory schema up` as an "
                                "administrator first")
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(sql.Identifier(RESTORE_ROLE)))
    with conn.cursor(row_factory=dict_row) as cur:
        state = cur.execute(_ROLE_STATE, [RESTORE_ROLE]).fetchone()
    if state is None or state["privileged"] or state["member_of_something"]:
        raise RollbackError(f"role {RESTORE_ROLE} must be a NOLOGIN role with no attribute and no membership; "
                            "someone granted it privileges: refusing to restore with it")
    conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(sql.Identifier(schema),
                                                                          sql.Identifier(RESTORE_ROLE)))


@contextmanager
def restricted(conn: psycopg.Connection) -> Iterator[None]:
    """Run the statements inside as the restore role (inside the caller's transaction).

    On an error the caller's transaction aborts, which also ends the role change.
    """
    outer = str(scalar(conn, "SELECT current_user"))
    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(RESTORE_ROLE)))
    yield
    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(outer)))


def column_type(conn: psycopg.Connection, column: dict[str, Any]) -> str:
    """The column's type as the server spells it, resolved from the backup's structured fields."""
    try:
        if column.get("type_name") is not None:
            return str(scalar(conn, "SELECT format_type(%s::regtype, %s)", [column["type_name"],
                                                                               int(column["typmod"])]))
        if not _OLD_TYPE.match(column["type"]):  # a backup written before the structured fields
            raise RollbackError(f"column {column['name']!r}: unexpected type {column['type']!r} in the backup")
        scalar(conn, "SELECT %s::regtype", [column["type"]])
        return str(column["type"])
    except psycopg.Error as exc:  # a syntax error, an unknown type: either way, not a type of this server
        raise RollbackError(f"column {column['name']!r}: type {column['type']!r} is not known here") from exc


def create_table(conn: psycopg.Connection, table: sql.Identifier, columns: list[dict[str, Any]]) -> None:
    """``CREATE TABLE`` with quoted names, server-resolved types and the defaults, as the restore role."""
    parts = []
    for column in columns:
        piece = sql.SQL("{} {}").format(sql.Identifier(column["name"]), sql.SQL(column_type(conn, column)))
        if column["default"] is not None:
            piece = sql.SQL("{} DEFAULT {}").format(piece, sql.SQL(_fragment(column["default"])))
        if column["not_null"]:
            piece = sql.SQL("{} NOT NULL").format(piece)
        parts.append(piece)
    with restricted(conn):
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(", ").join(parts)))


def _fragment(text: str) -> str:
    """A default, constraint or index definition from the backup: one statement at most."""
    if ";" in text.replace("';'", ""):
        raise RollbackError("the backup holds a definition with a statement separator; refusing it")
    return text


def add_constraints_and_indexes(conn: psycopg.Connection, table: sql.Identifier, definition: dict[str, Any]) -> None:
    """Every constraint but foreign keys, and every index, on ``table`` (a staged one), as the restore role."""
    with restricted(conn):
        for constraint in definition["constraints"]:
            if constraint["type"] != "f":
                conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    table, sql.Identifier(constraint["name"]), sql.SQL(_fragment(constraint["definition"]))))
        for index in definition["indexes"]:
            found = _INDEX.match(index["definition"])
            if not found:
                raise RollbackError(f"{index['name']}: unexpected index definition in the backup")
            conn.execute(sql.SQL("CREATE {}INDEX {} ON {} USING {}").format(
                sql.SQL("UNIQUE " if found.group("unique") else ""), sql.Identifier(index["name"]), table,
                sql.SQL(_fragment(found.group("rest")))))


def add_foreign_keys(conn: psycopg.Connection, table: sql.Identifier, definition: dict[str, Any]) -> None:
    """Foreign keys (no expression; each checked whole) as the caller: they need REFERENCES on their target."""
    for constraint in definition["constraints"]:
        if constraint["type"] == "f":
            if not _FOREIGN_KEY.match(constraint["definition"]):
                raise RollbackError(f"{constraint['name']}: unexpected foreign key definition in the backup")
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table, sql.Identifier(constraint["name"]), sql.SQL(_fragment(constraint["definition"]))))


def refuse_privileged_calls(conn: psycopg.Connection, table: sql.Identifier) -> None:
    """Refuse ``table`` when a default, constraint or index calls a function the restore role may not execute.

    Such an expression may not have run yet (an empty table, a NOT VALID check, a default): it would run later
    with the privileges of whoever writes the table.
    """
    name = table.as_string(conn)
    with conn.cursor(row_factory=dict_row) as cur:
        called = [r["function"] for r in cur.execute(_FUNCTIONS, {"t": name, "role": RESTORE_ROLE})]
    if called:
        raise RollbackError(f"{name}: a default, constraint or index of the backup calls {', '.join(called)}, "
                            "which a restore may not run; refusing the backup (nothing was changed)")


def prove_and_hand_over(conn: psycopg.Connection, table: sql.Identifier, columns: list[dict[str, Any]],
                        definition: dict[str, Any], *, owner: str) -> None:
    """Refuse a restored table that is not exactly its definition or whose expressions call a function the
    restore role may not execute; then give it to ``owner``."""
    name = table.as_string(conn)
    with conn.cursor(row_factory=dict_row) as cur:
        actual = [(r["name"], r["type"]) for r in cur.execute(_ACTUAL_COLUMNS, [name])]
        names = cur.execute(_ACTUAL_NAMES, {"t": name}).fetchone()
    expected = [(c["name"], column_type(conn, c)) for c in columns]
    if actual != expected:
        raise RollbackError(f"{name}: the restored columns differ from the backup's definition (forged?)")
    assert names is not None
    if (sorted(names["constraints"]) != sorted(c["name"] for c in definition["constraints"])
            or sorted(names["indexes"]) != sorted(i["name"] for i in definition["indexes"])):
        raise RollbackError(f"{name}: the restored constraints or indexes differ from the backup's definition")
    refuse_privileged_calls(conn, table)
    conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(table, sql.Identifier(owner)))
