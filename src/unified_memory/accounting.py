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
from psycopg.rows import dict_row

from .checks import Serialised, by_key, json_field
from .db import relation_exists, scalar
from .mapping import mapping_for
from .sources import ROW_QUARANTINE


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


_ROW_REASONS = {r for r, _ in ROW_QUARANTINE} | {"rejected_by_database"}

# Rows captured after the last catch-up and not migrated yet (``waiting``); the source's query counts outcomes.
_WAITING = ("(SELECT DISTINCT new_key AS k FROM memory_migration_changes "
            "WHERE applied_at IS NULL AND source_table = %(t)s)")
_NO_CAPTURE = "(SELECT NULL::text AS k WHERE false)"
_MEMORIES = "SELECT count(*) FROM memories WHERE source_table = %(t)s"


def account(conn: psycopg.Connection, table: str, shape: str) -> TableAccount:
    """Outcome counts of ``table``'s current rows from memories, the quarantine and the waiting changes."""
    mapping = mapping_for(table, shape)
    items, expanded_rows = mapping.source.item_counters()
    result = TableAccount(table, shape, items=items, expanded_rows=expanded_rows)
    query = mapping.source.outcomes(mapping, _waiting(conn))
    for row in conn.cursor(row_factory=dict_row).execute(query, {"t": table}):
        n = int(row["n"])
        if row.get("level", "row") == "row":  # a keyed table has rows only
            result.source_rows += n
            if row["outcome"] == "expanded":
                result.expanded_rows, result.items = n, int(row["items"])
                continue
        _count(result, row["outcome"], n)
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
