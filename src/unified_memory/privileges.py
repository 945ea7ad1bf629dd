"""Preflight: the privileges a command needs, checked before it writes anything.

A non-superuser member of ``unified_memory_maintenance`` runs migrate, backup, validate, rollback and vectors
sync once ``schema up`` (run by the tables' owner or a superuser) has granted what this module lists. When a
grant is missing, the command stops with exit code 2 and names the exact ``GRANT`` statements to run, instead
of failing halfway with a permission error. Checks ask the catalog (``has_table_privilege`` and friends) for
the role the work runs as, so inherited privileges count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from .db import first_column, scalar
from .errors import MissingPrivilege

Command = Literal["migrate", "backup", "validate", "rollback", "vectors"]
MAINTENANCE_ROLE = "unified_memory_maintenance"
APP_ROLE = "unified_memory_app"
LEGACY_TABLES = ("memory_items", "memory_entries", "web_ui_memory_entries", "long_term_memory")

_BOOKKEEPING = ("memory_migration_runs", "memory_migration_checkpoints", "memory_migration_quarantine",
                "memory_migration_deferred_indexes", "memory_legacy_embeddings")
_SEQUENCES = ("memory_migration_runs_run_id_seq", "memory_migration_quarantine_id_seq")
_WRITE = "SELECT, INSERT, UPDATE, DELETE"


@dataclass(frozen=True)
class Need:
    """One privilege on one object: ``kind`` is table, sequence, database, schema or role."""

    kind: Literal["table", "sequence", "database", "schema", "role"]
    name: str
    privilege: str

    def grant(self, grantee: str) -> sql.Composed:
        """The statement that grants it to ``grantee``."""
        who = sql.Identifier(grantee)
        if self.kind == "role":
            return sql.SQL("GRANT {} TO {};").format(sql.Identifier(self.name), who)
        on = {"table": "TABLE", "sequence": "SEQUENCE", "database": "DATABASE", "schema": "SCHEMA"}[self.kind]
        return sql.SQL("GRANT {} ON {} {} TO {};").format(sql.SQL(self.privilege), sql.SQL(on),
                                                         sql.Identifier(self.name), who)


def needs(command: Command, *, legacy: Iterable[str] = ()) -> list[Need]:
    """What ``command`` needs; ``legacy`` are the legacy tables present (read by every command but vectors)."""
    reads = [Need("table", t, "SELECT") for t in legacy]
    bookkeeping = [Need("table", t, _WRITE) for t in _BOOKKEEPING]
    sequences = [Need("sequence", s, "USAGE, SELECT, UPDATE") for s in _SEQUENCES]
    if command == "backup":
        return reads
    if command == "vectors":
        return [Need("table", "memories", "SELECT, UPDATE"), Need("table", "memory_legacy_embeddings", "SELECT")]
    unified = [Need("table", "memories", _WRITE), Need("table", "memory_relationships", _WRITE),
               Need("table", "memory_access_log", "SELECT, INSERT")]
    if command == "migrate":
        return reads + unified[:1] + bookkeeping + sequences
    if command == "rollback":
        return reads + unified[:1] + bookkeeping + [Need("database", "", "CREATE")]
    return reads + unified + bookkeeping + [Need("role", APP_ROLE, "MEMBER")]


def missing(conn: psycopg.Connection, command: Command, *, legacy: Iterable[str] = ()) -> list[Need]:
    """The needs of ``command`` that the current role lacks (none for a superuser)."""
    if _is_superuser(conn):
        return []
    return [n for n in needs(command, legacy=legacy) if not _has(conn, n)]


def require(conn: psycopg.Connection, command: Command, *, legacy: Iterable[str] | None = None) -> None:
    """Stop before ``command`` writes anything when a privilege is missing, naming the GRANTs.

    ``legacy`` defaults to the legacy tables present in the current schema.

    Raises:
        MissingPrivilege: (exit code 2) with the GRANT statements an owner or superuser must run.
    """
    present = list(legacy) if legacy is not None else present_legacy_tables(conn)
    lacking = missing(conn, command, legacy=present)
    if not lacking:
        return
    grantee = _grantee(conn)
    database = str(scalar(conn, "SELECT current_database()"))
    statements = [_resolved(n, database).grant(grantee).as_string(conn) for n in lacking]
    raise MissingPrivilege(
        f"{command} needs privileges that {grantee} does not have; as the tables' owner or a superuser run "
        f"`unified-memory schema up` (it grants them) or: {' '.join(statements)}", grants=statements)


def present_legacy_tables(conn: psycopg.Connection) -> list[str]:
    """The legacy tables that exist in the current schema."""
    return [str(t) for t in first_column(conn, "SELECT t FROM unnest(%s::text[]) AS t "
                                              "WHERE to_regclass(quote_ident(t)) IS NOT NULL", [list(LEGACY_TABLES)])]


def _resolved(need: Need, database: str) -> Need:
    return Need(need.kind, database, need.privilege) if need.kind == "database" else need


def _has(conn: psycopg.Connection, need: Need) -> bool:
    """Every privilege of ``need`` (the catalog functions answer "any of" for a list, so one at a time)."""
    if need.kind == "role":
        return bool(scalar(conn, "SELECT pg_has_role(current_user, %s, 'MEMBER')", [need.name]))
    if need.kind == "database":
        return bool(scalar(conn, "SELECT has_database_privilege(current_database(), %s)", [need.privilege]))
    check = "has_sequence_privilege" if need.kind == "sequence" else "has_table_privilege"
    query = sql.SQL("SELECT to_regclass(quote_ident(%(name)s)) IS NULL OR bool_and({}(quote_ident(%(name)s), p)) "
                    "FROM unnest(string_to_array(%(privileges)s, ', ')) AS p").format(sql.Identifier(check))
    return bool(scalar(conn, query, {"name": need.name, "privileges": need.privilege}))


def _grantee(conn: psycopg.Connection) -> str:
    """unified_memory_maintenance when the session belongs to it (the recommended set-up), else the session role."""
    member = scalar(conn, "SELECT pg_has_role(session_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s",
                     [MAINTENANCE_ROLE])
    return MAINTENANCE_ROLE if member else str(scalar(conn, "SELECT current_user"))


def _is_superuser(conn: psycopg.Connection) -> bool:
    return bool(scalar(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
