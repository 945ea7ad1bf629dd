"""The legacy tables' shapes as they exist in the field, and their detection from the catalog.

A shape matches a table when the table has all of the shape's required columns and nothing outside its
required and optional columns. A table that matches no shape stops the run, naming what it did not expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from .db import scalar
from .errors import ShapeError
from .mapping import PRECEDENCE, mapping_for

LEGACY_TABLES = PRECEDENCE  # the legacy tables, in the order they are migrated


@dataclass(frozen=True)
class Shape:
    """A known layout of one legacy table."""

    table: str
    name: str
    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    def matches(self, columns: set[str]) -> bool:
        return self.required <= columns and columns <= self.required | self.optional


_WEB_UI = frozenset({"id", "tenant_id", "content", "user_id", "ui_source", "session_id", "memory_type", "tags",
                     "metadata", "ai_generated", "created_at"})
_I1 = frozenset({"id", "scope", "kind", "content", "embedding", "metadata", "created_at"})

SHAPES: tuple[Shape, ...] = (
    Shape("memory_items", "I1", _I1),
    Shape("memory_items", "I2", _I1 | {"neuro_type", "importance_score", "access_count", "last_accessed", "user_id",
                                        "tenant_id", "session_id", "memory_type", "ui_source", "conversation_id",
                                        "ai_generated", "user_confirmed", "tags"},
          frozenset({"decay_lambda", "decay_score", "decay_tier", "importance_decay", "reflection_count",
                     "last_reflection", "expires_at", "updated_at", "source_memories", "derived_memories"})),
    Shape("memory_items", "I3", frozenset({"memory_id", "tenant_id", "user_id", "source", "scope", "kind", "content",
                                           "embeddings", "metadata", "created_at", "updated_at", "expires_at"})),
    Shape("memory_entries", "E1", frozenset({
        "id", "vector_id", "user_id", "session_id", "content", "query", "result", "embedding_id", "memory_metadata",
        "ttl", "timestamp", "created_at", "updated_at", "ui_source", "conversation_id", "memory_type", "tags",
        "importance_score", "access_count", "last_accessed", "ai_generated", "user_confirmed"})),
    Shape("memory_entries", "E2", _WEB_UI),
    Shape("web_ui_memory_entries", "W1", _WEB_UI),
    Shape("long_term_memory", "L1", frozenset({"user_id", "memory_json"})),
)


@dataclass(frozen=True)
class Detected:
    """A legacy table found in the database, with its shape and its columns' types."""

    table: str
    shape: str
    columns: dict[str, str]


def table_columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    """Column name -> type (``format_type``) of ``table`` in the current schema; empty when it is missing."""
    rows = conn.cursor(row_factory=dict_row).execute(
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        [table],
    ).fetchall()
    return {r["name"]: r["type"] for r in rows}


def detect(conn: psycopg.Connection, table: str) -> Detected | None:
    """The shape of ``table``, or ``None`` when the table does not exist.

    Raises:
        ShapeError: the table exists but matches no known shape.
    """
    columns = table_columns(conn, table)
    if not columns:
        return None
    names = set(columns)
    for shape in SHAPES:
        if shape.table == table and shape.matches(names):
            return Detected(table, shape.name, columns)
    closest = min((s for s in SHAPES if s.table == table),
                  key=lambda s: len(names ^ (s.required | (s.optional & names))))
    unexpected = sorted(names - closest.required - closest.optional)
    missing = sorted(closest.required - names)
    raise ShapeError(
        f"{table} matches no known shape; nearest is {closest.name}: "
        f"unexpected columns {unexpected or 'none'}, missing columns {missing or 'none'}"
    )


def detect_all(conn: psycopg.Connection, tables: tuple[str, ...] = LEGACY_TABLES) -> dict[str, Detected | None]:
    """Shape of every legacy table (``None`` for a missing one)."""
    return {table: detect(conn, table) for table in tables}


_KINDS = {"p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}


def check_relation(conn: psycopg.Connection, found: Detected) -> None:
    """A legacy relation that is not a plain table is migrated like one when its rows have a key that is
    never NULL and never repeated (a view, a partitioned or foreign table); otherwise it is refused by name.

    Raises:
        ShapeError: the relation has no ctid (long_term_memory is keyed by it), or NULL or repeated keys.
    """
    kind = scalar(
        conn, "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relname = %s", [found.table])
    if kind is None or kind == "r":
        return
    what = _KINDS.get(kind, f"relation of kind {kind!r}")
    m = mapping_for(found.table, found.shape)
    problem = m.source.relation_problem(conn, m, what)
    if problem is not None:
        raise ShapeError(problem)
