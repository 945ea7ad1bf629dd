"""Every source row's outcome, counted from the database itself (memories and the quarantine).

Per table: source rows = migrated + duplicates + quarantined + still pending. For long_term_memory the same
holds per item: items of the expanded rows = migrated + item quarantine; rows = expanded + row quarantine.
The migration's summary, its dry-run plan and the validator all read these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .mapping import LONG_TERM_ROW_QUARANTINE, mapping_for


@dataclass
class TableAccount:
    """Outcome counts of one legacy table."""

    table: str
    shape: str
    source_rows: int = 0
    migrated: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    items: int | None = None  # long_term_memory: items in the rows that expanded
    expanded_rows: int | None = None

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def unaccounted(self) -> int:
        """Rows (or items) with no outcome: 0 once the table is fully migrated."""
        if self.items is None:
            return self.source_rows - self.migrated - self.duplicates - self.quarantined_total
        row_level = sum(n for r, n in self.quarantined.items() if r in _ROW_REASONS)
        item_level = self.quarantined_total - row_level + self.duplicates
        rows_left = self.source_rows - (self.expanded_rows or 0) - row_level
        items_left = self.items - self.migrated - item_level
        return rows_left + items_left

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "shape": self.shape, "source_rows": self.source_rows, "migrated": self.migrated,
            "duplicates": self.duplicates, "quarantined": self.quarantined_total,
            "quarantined_by_reason": dict(sorted(self.quarantined.items())), "unaccounted": self.unaccounted,
        }
        if self.items is not None:
            data["items"], data["expanded_rows"] = self.items, self.expanded_rows
        return data


_ROW_REASONS = {r for r, _ in LONG_TERM_ROW_QUARANTINE} | {"rejected_by_database"}

_OUTCOMES = sql.SQL(
    "SELECT (SELECT count(*) FROM {table}) AS source_rows, "
    "(SELECT count(*) FROM memories WHERE source_table = %(t)s) AS migrated, "
    "(SELECT coalesce(jsonb_object_agg(reason, n), '{{}}') FROM (SELECT reason, count(*) AS n "
    " FROM memory_migration_quarantine WHERE source_table = %(t)s GROUP BY reason) q) AS reasons"
)

_LONG_TERM_ITEMS = sql.SQL(
    "SELECT count(*) AS expanded_rows, "
    "coalesce(sum(CASE jsonb_typeof(doc) WHEN 'array' THEN jsonb_array_length(doc) ELSE 1 END), 0) AS items "
    "FROM (SELECT s.ctid::text AS row_key, memory_migration_json_doc(s.memory_json) AS doc FROM {table} s "
    "OFFSET 0) d "  # OFFSET 0: one parse per row, not one per reference to doc
    "WHERE doc IS NOT NULL AND NOT EXISTS (SELECT 1 FROM memory_migration_quarantine q "
    "WHERE q.source_table = %(t)s AND q.source_key = d.row_key) "
    "AND (jsonb_typeof(doc) IN ('array', 'object', 'string')) "
    "AND (EXISTS (SELECT 1 FROM memories m WHERE m.source_table = %(t)s "
    "             AND m.source_key = d.row_key || '#0') "
    "     OR EXISTS (SELECT 1 FROM memory_migration_quarantine q WHERE q.source_table = %(t)s "
    "             AND q.source_key = d.row_key || '#0'))"
)


def account(conn: psycopg.Connection, table: str, shape: str) -> TableAccount:
    """Outcome counts of ``table`` from memories and the quarantine."""
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(_OUTCOMES.format(table=sql.Identifier(table)), {"t": table}).fetchone()
    assert row is not None
    reasons: dict[str, int] = {k: int(v) for k, v in row["reasons"].items()}
    result = TableAccount(table, shape, int(row["source_rows"]), int(row["migrated"]), reasons.pop("duplicate_id", 0),
                          reasons)
    if mapping_for(table, shape).expands:
        expanded = cur.execute(_LONG_TERM_ITEMS.format(table=sql.Identifier(table)), {"t": table}).fetchone()
        assert expanded is not None
        result.expanded_rows, result.items = int(expanded["expanded_rows"]), int(expanded["items"])
    return result
