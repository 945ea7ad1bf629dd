"""Reconciliation with the source: counts per outcome, and content compared through the mapping itself.

For each legacy table, the mapping's own SQL expressions (the ones the migration ran) are evaluated again on
the source rows that became memories, and an order-independent checksum of those mapped columns is compared,
per tenant, with the same columns read from ``memories``. When a tenant's checksums differ, a join on the
provenance key narrows the difference down to the offending keys. Everything runs inside PostgreSQL.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import ranges
from .accounting import account
from .batchsql import mapped_source, range_predicate
from .checks import Serialised, json_field
from .db import relation_exists, scalar
from .mapping import RECONCILED, TableMapping, mapping_for
from .parallel import Workers
from .sources import ITEM_KEYS

_SLICE = "('x' || left(h, 16))::bit(64)::bigint::numeric"
# Memories compared with their source: live ones without a recorded conflict (020). A soft-deleted memory of a
# row the application deleted has no source row; a conflict is the application's own edit in the unified store,
# kept on purpose and reported by migrate and health.
_IN_SYNC = ("{m}.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM memory_migration_conflicts c "
            "WHERE c.memory_id = {m}.id)")
_CREATED_AT_DST = "CASE WHEN m.meta -> 'legacy' ? 'created_at_missing' THEN NULL ELSE m.created_at END"
# A memory whose mapped id another tenant's application row held got a new id; the mapped one is in meta.legacy.
_ID_DST = "coalesce((m.meta #>> '{legacy,id_in_use}')::uuid, m.id)"
_META_DST = ("CASE WHEN NOT coalesce(m.meta -> 'legacy' ? 'id_in_use', false) THEN m.meta "
             "WHEN (m.meta -> 'legacy') - 'id_in_use' = '{}'::jsonb THEN m.meta - 'legacy' "
             "ELSE jsonb_set(m.meta, '{legacy}', (m.meta -> 'legacy') - 'id_in_use') END")


def _first_20(items: list[str]) -> list[str]:
    return items[:20]


@dataclass
class ContentDiff(Serialised):
    """The result of comparing one table's mapped source rows with their memories."""

    table: str
    compared_rows: int = 0
    tenants: int = 0
    differing_tenants: list[str] = field(default_factory=list, metadata=json_field(convert=_first_20))
    differing_keys: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differing_tenants


def counts(conn: psycopg.Connection, table: str, shape: str) -> dict[str, Any]:
    """The table's outcome account (``unaccounted`` is 0 when every source row has one outcome)."""
    return account(conn, table, shape).to_dict()


def _compared_columns(m: TableMapping) -> list[str]:
    return [c for c in RECONCILED if (c in m.columns or c == "meta") and c not in m.source.uncompared]


def _source_hash(m: TableMapping) -> sql.Composable:
    exprs = []
    for name in _compared_columns(m):
        if name == "meta":
            exprs.append(m.meta_sql())
        elif name == "created_at":
            exprs.append(f"({m.columns[name].expr})")  # without the now() default: compared only when known
        else:
            exprs.append(m.columns[name].sql())
    return sql.SQL("md5(row({})::text)").format(sql.SQL(", ").join(sql.SQL(e) for e in exprs))


def _memory_hash(m: TableMapping) -> sql.Composable:
    special = {"created_at": _CREATED_AT_DST, "id": _ID_DST, "meta": _META_DST}
    cols = [sql.SQL(special[c]) if c in special else sql.SQL("m.{}").format(sql.Identifier(c))
            for c in _compared_columns(m)]
    return sql.SQL("md5(row({})::text)").format(sql.SQL(", ").join(cols))


def _in_sync(alias: str) -> sql.Composed:
    return sql.SQL(_IN_SYNC).format(m=sql.Identifier(alias))


def _pairs(m: TableMapping, sliced: bool = False) -> sql.Composed:
    """CTEs ``src`` and ``dst``: (source_key, tenant, h) for every migrated row, on each side; with ``sliced``,
    the source rows in key range ``(%(after)s, %(upper)s]`` and the memories whose key hashes to ``%(slice)s``
    of ``%(slices)s``."""
    where = range_predicate(m) if sliced else None
    prelude, source = mapped_source(m, where)
    own_range = m.source.filter_rows(where)
    dst_slice = sql.SQL(" AND (hashtext(m.source_key) & 2147483647) %% %(slices)s = %(slice)s") if sliced \
        else sql.SQL("")
    return sql.SQL("""WITH {prelude}
src AS (
    SELECT {key} AS source_key, ({owner})::text AS tenant, {src_hash} AS h {source}
    WHERE {reason} IS NULL{own_range}
      AND EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {table} AND x.source_key = {key} AND {x_in_sync})
),
dst AS (
    SELECT m.source_key, m.user_id::text AS tenant, {dst_hash} AS h FROM memories m
    WHERE m.source_table = {table} AND {m_in_sync}{dst_slice}
)""").format(x_in_sync=_in_sync("x"), m_in_sync=_in_sync("m"),
             prelude=prelude, key=sql.SQL(m.key), owner=sql.SQL(m.columns["user_id"].sql()),
             src_hash=_source_hash(m), source=source, reason=sql.SQL(m.reason_sql()), own_range=own_range,
             table=sql.Literal(m.table), dst_hash=_memory_hash(m), dst_slice=dst_slice)


_SUMS = """{pairs}
SELECT 'src' AS side, tenant, count(*) AS n, sum({slice}) AS total FROM src GROUP BY tenant
UNION ALL SELECT 'dst', tenant, count(*), sum({slice}) FROM dst GROUP BY tenant"""


def _slice_sums(conn: psycopg.Connection, m: TableMapping, params: dict[str, Any]) -> list[dict[str, Any]]:
    query = sql.SQL(_SUMS).format(pairs=_pairs(m, sliced=True), slice=sql.SQL(_SLICE))
    return conn.cursor(row_factory=dict_row).execute(query, params).fetchall()


def content(conn: psycopg.Connection, table: str, shape: str, *, source_timezone: str = "UTC",
            key_limit: int = 20, workers: Workers | None = None) -> ContentDiff:
    """Compare the mapped columns of ``table``'s migrated rows with their memories, per tenant.

    The per-tenant counts and checksums are sums, so the table is cut into slices (key ranges of the source,
    key hashes of the memories) computed on ``workers``' parallel connections and added up here."""
    m = mapping_for(table, shape)
    n = workers.n if workers is not None else 1
    cuts: list[str | None] = [None, *(ranges.bounds(conn, m, n) if n > 1 else []), None]
    slices = [{"tz": source_timezone, "after": cuts[i], "upper": cuts[i + 1], "slice": i, "slices": len(cuts) - 1}
              for i in range(len(cuts) - 1)]
    parts = workers.map(lambda c, p: _slice_sums(c, m, p), slices) if workers is not None else \
        [_slice_sums(conn, m, p) for p in slices]
    counts: Counter[tuple[str, str]] = Counter()  # (side, tenant) -> rows
    sums: Counter[tuple[str, str]] = Counter()  # (side, tenant) -> checksum
    for row in (r for part in parts for r in part):
        counts[(row["side"], row["tenant"])] += int(row["n"])
        sums[(row["side"], row["tenant"])] += row["total"] or 0
    diff = ContentDiff(table)
    for tenant in sorted({t for _, t in counts}, key=str):
        src, dst = ("src", tenant), ("dst", tenant)
        diff.tenants += 1
        diff.compared_rows += counts[dst]
        if (counts[src], sums[src]) != (counts[dst], sums[dst]):
            diff.differing_tenants.append(str(tenant))
    if diff.differing_tenants:
        keys = sql.SQL("{pairs} SELECT coalesce(s.source_key, d.source_key) AS key FROM src s FULL JOIN dst d "
                       "USING (source_key) WHERE s.h IS DISTINCT FROM d.h ORDER BY 1 LIMIT {n}").format(
            pairs=_pairs(m), n=sql.Literal(key_limit))
        rows = conn.cursor(row_factory=dict_row).execute(keys, {"tz": source_timezone})
        diff.differing_keys = [str(r["key"]) for r in rows]
    return diff


def outcomes_without_source(conn: psycopg.Connection, table: str) -> int:
    """Source rows with a recorded outcome, counted from memories and the quarantine alone (table gone)."""
    # memories catch-up soft-deleted: their row was gone from the table before it was dropped
    retired: sql.Composable = sql.SQL("")
    if relation_exists(conn, "memory_migration_synced"):
        retired = sql.SQL("AND {} AND NOT (m.deleted_at IS NOT NULL AND m.version <= "
                          "coalesce((SELECT s.version FROM memory_migration_synced s WHERE s.memory_id = m.id), 1))"
                          ).format(sql.SQL(ITEM_KEYS.sql_current("m.source_key")))
    return int(scalar(conn, sql.SQL(  # an item's outcome counts for its row (a row's key is the row of itself)
        "SELECT count(DISTINCT {row}) FROM (SELECT m.source_key AS k FROM memories m "
        "WHERE m.source_table = %(t)s {retired} UNION ALL SELECT source_key FROM memory_migration_quarantine "
        "WHERE source_table = %(t)s) o").format(row=sql.SQL(ITEM_KEYS.sql_row("k")), retired=retired),
        {"t": table}))
