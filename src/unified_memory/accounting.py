"""Every source row's outcome, counted from the database itself (memories and the quarantine).

Per table: source rows = migrated + duplicates + quarantined + still pending. For long_term_memory the same
holds per item: items of the expanded rows = migrated + item quarantine; rows = expanded + row quarantine.
The migration's summary, its dry-run plan and the validator all read these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import psycopg
from psycopg import sql

from .checks import Serialised, by_key, json_field
from .db import relation_exists, scalar
from .mapping import LONG_TERM_ROW_QUARANTINE, mapping_for


def _row_level(account: TableAccount) -> bool:
    return account.items is None


@dataclass
class TableAccount(Serialised):
    """Outcome counts of one legacy table."""

    json_derived: ClassVar[dict[str, str]] = {"quarantined": "quarantined_total", "unaccounted": "unaccounted"}
    json_order: ClassVar[tuple[str, ...]] = ("shape", "source_rows", "migrated", "duplicates", "quarantined",
                                             "quarantined_by_reason", "unaccounted", "waiting", "retired")

    table: str = field(metadata=json_field(omit=True))
    shape: str
    source_rows: int = 0
    migrated: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict,
                                        metadata=json_field(key="quarantined_by_reason", convert=by_key))
    # long_term_memory: items in the rows that expanded (reported only there)
    items: int | None = field(default=None, metadata=json_field(omit_if=_row_level))
    expanded_rows: int | None = field(default=None, metadata=json_field(omit_if=_row_level))
    waiting: int = 0  # rows captured after the last catch-up, not migrated yet
    retired: int = 0  # memories whose legacy row the application deleted or edited away (soft-deleted)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def unaccounted(self) -> int:
        """Rows (or items) with no outcome: 0 once the table is fully migrated."""
        if self.items is None:
            return self.source_rows - self.migrated - self.duplicates - self.quarantined_total - self.waiting
        row_level = sum(n for r, n in self.quarantined.items() if r in _ROW_REASONS)
        item_level = self.quarantined_total - row_level + self.duplicates
        rows_left = self.source_rows - (self.expanded_rows or 0) - row_level - self.waiting
        items_left = self.items - self.migrated - item_level
        return rows_left + items_left


_ROW_REASONS = {r for r, _ in LONG_TERM_ROW_QUARANTINE} | {"rejected_by_database"}

# Outcomes are counted for the current legacy rows only (joined on their keys), so rows the application deleted
# (their memories soft-deleted by catch-up: ``retired``) never make a count negative; a row captured after the
# last catch-up and not migrated yet is ``waiting``. One outcome per row: quarantine, then memory, then waiting.
_WAITING = ("(SELECT DISTINCT new_key AS k FROM memory_migration_changes "
            "WHERE applied_at IS NULL AND source_table = %(t)s)")
_NO_CAPTURE = "(SELECT NULL::text AS k WHERE false)"
_OUTCOMES = sql.SQL(
    "SELECT CASE WHEN q.reason IS NOT NULL THEN q.reason WHEN m.source_key IS NOT NULL THEN 'migrated' "
    "WHEN w.k IS NOT NULL THEN 'waiting' END AS outcome, count(*) FROM {table} s "
    "LEFT JOIN memory_migration_quarantine q ON q.source_table = %(t)s AND q.source_key = {key} "
    "LEFT JOIN (SELECT source_key FROM memories WHERE source_table = %(t)s) m ON m.source_key = {key} "
    "LEFT JOIN {waiting} w ON w.k = {key} GROUP BY 1"
)
_MEMORIES = "SELECT count(*) FROM memories WHERE source_table = %(t)s"

# long_term_memory: per current row (ctid), its row-level outcome, or its items' outcomes (<ctid>#<n>, n below
# the row's item count; memories retired by catch-up carry a '~' and belong to no current row).
_LONG_TERM = sql.SQL("""WITH r AS (
    SELECT s.ctid::text AS rk, memory_migration_json_doc(s.memory_json) AS doc FROM {table} s OFFSET 0
),
rq AS (SELECT source_key AS rk, reason FROM memory_migration_quarantine
       WHERE source_table = %(t)s AND strpos(source_key, '#') = 0),
io AS (
    SELECT rk, idx, CASE WHEN bool_or(outcome IS NULL) THEN 'migrated' ELSE min(outcome) END AS outcome FROM (
        SELECT split_part(source_key, '#', 1) AS rk, split_part(source_key, '#', 2)::int AS idx, NULL AS outcome
        FROM memories WHERE source_table = %(t)s AND strpos(source_key, '~') = 0
        UNION ALL
        SELECT split_part(source_key, '#', 1), split_part(source_key, '#', 2)::int, reason
        FROM memory_migration_quarantine WHERE source_table = %(t)s AND strpos(source_key, '#') > 0) u
    GROUP BY rk, idx
),
per_row AS (
    SELECT r.rk, CASE jsonb_typeof(r.doc) WHEN 'array' THEN jsonb_array_length(r.doc) ELSE 1 END AS n,
           CASE WHEN rq.reason IS NOT NULL THEN rq.reason WHEN e.rk IS NOT NULL THEN 'expanded'
                WHEN w.k IS NOT NULL THEN 'waiting' END AS outcome
    FROM r LEFT JOIN rq USING (rk) LEFT JOIN (SELECT DISTINCT rk FROM io) e USING (rk)
    LEFT JOIN {waiting} w ON w.k = r.rk
)
SELECT 'row' AS level, outcome, count(*) AS n, coalesce(sum(n), 0) AS items FROM per_row GROUP BY outcome
UNION ALL
SELECT 'item', io.outcome, count(*), 0 FROM io JOIN per_row p ON p.rk = io.rk AND p.outcome = 'expanded'
WHERE io.idx < p.n GROUP BY io.outcome""")


def account(conn: psycopg.Connection, table: str, shape: str) -> TableAccount:
    """Outcome counts of ``table``'s current rows from memories, the quarantine and the waiting changes."""
    mapping = mapping_for(table, shape)
    if mapping.expands:
        return _long_term(conn, table, shape)
    result = TableAccount(table, shape, items=None)
    query = _OUTCOMES.format(table=sql.Identifier(table), key=sql.SQL(mapping.key), waiting=_waiting(conn))
    for outcome, n in conn.execute(query, {"t": table}):
        result.source_rows += int(n)
        _count(result, outcome, int(n))
    result.retired = int(scalar(conn, _MEMORIES, {"t": table})) - result.migrated
    return result


def _waiting(conn: psycopg.Connection) -> sql.SQL:
    return sql.SQL(_WAITING if relation_exists(conn, "memory_migration_changes") else _NO_CAPTURE)


def _count(result: TableAccount, outcome: str | None, n: int) -> None:
    if outcome == "migrated":
        result.migrated += n
    elif outcome == "duplicate_id":
        result.duplicates += n
    elif outcome == "waiting":
        result.waiting += n
    elif outcome is not None:
        result.quarantined[outcome] = result.quarantined.get(outcome, 0) + n


def _long_term(conn: psycopg.Connection, table: str, shape: str) -> TableAccount:
    result = TableAccount(table, shape, items=0, expanded_rows=0)
    query = _LONG_TERM.format(table=sql.Identifier(table), waiting=_waiting(conn))
    for level, outcome, n, items in conn.execute(query, {"t": table}):
        if level == "row":
            result.source_rows += int(n)
            if outcome == "expanded":
                result.expanded_rows, result.items = int(n), int(items)
                continue
        _count(result, outcome, int(n))
    result.retired = int(scalar(conn, _MEMORIES, {"t": table})) - result.migrated
    return result
