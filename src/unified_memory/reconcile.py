"""Reconciliation with the source: counts per outcome, and content compared through the mapping itself.

For each legacy table, the mapping's own SQL expressions (the ones the migration ran) are evaluated again on
the source rows that became memories, and an order-independent checksum of those mapped columns is compared,
per tenant, with the same columns read from ``memories``. When a tenant's checksums differ, a join on the
provenance key narrows the difference down to the offending keys. Everything runs inside PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .accounting import account
from .batchsql import mapped_source
from .db import scalar
from .mapping import RECONCILED, TableMapping, mapping_for

_SLICE = "('x' || left(h, 16))::bit(64)::bigint::numeric"
_CREATED_AT_DST = "CASE WHEN m.meta -> 'legacy' ? 'created_at_missing' THEN NULL ELSE m.created_at END"
# A memory whose mapped id another tenant's application row held got a new id; the mapped one is in meta.legacy.
_ID_DST = "coalesce((m.meta #>> '{legacy,id_in_use}')::uuid, m.id)"
_META_DST = ("CASE WHEN NOT coalesce(m.meta -> 'legacy' ? 'id_in_use', false) THEN m.meta "
             "WHEN (m.meta -> 'legacy') - 'id_in_use' = '{}'::jsonb THEN m.meta - 'legacy' "
             "ELSE jsonb_set(m.meta, '{legacy}', (m.meta -> 'legacy') - 'id_in_use') END")


@dataclass
class ContentDiff:
    """The result of comparing one table's mapped source rows with their memories."""

    table: str
    compared_rows: int = 0
    tenants: int = 0
    differing_tenants: list[str] = field(default_factory=list)
    differing_keys: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differing_tenants

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "compared_rows": self.compared_rows, "tenants": self.tenants,
                "differing_tenants": self.differing_tenants[:20], "differing_keys": self.differing_keys}


def counts(conn: psycopg.Connection, table: str, shape: str) -> dict[str, Any]:
    """The table's outcome account (``unaccounted`` is 0 when every source row has one outcome)."""
    return account(conn, table, shape).to_dict()


def _compared_columns(m: TableMapping) -> list[str]:
    return [c for c in RECONCILED if c in m.columns or c == "meta"]


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


def _pairs(m: TableMapping) -> sql.Composed:
    """CTEs ``src`` and ``dst``: (source_key, tenant, h) for every migrated row, on each side."""
    prelude, source = mapped_source(m)
    return sql.SQL("""WITH {prelude}
src AS (
    SELECT {key} AS source_key, ({owner})::text AS tenant, {src_hash} AS h {source}
    WHERE {reason} IS NULL
      AND EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {table} AND x.source_key = {key})
),
dst AS (
    SELECT m.source_key, m.user_id::text AS tenant, {dst_hash} AS h FROM memories m WHERE m.source_table = {table}
)""").format(prelude=prelude, key=sql.SQL(m.key), owner=sql.SQL(m.columns["user_id"].sql()),
             src_hash=_source_hash(m), source=source, reason=sql.SQL(m.reason_sql()),
             table=sql.Literal(m.table), dst_hash=_memory_hash(m))


def content(conn: psycopg.Connection, table: str, shape: str, *, source_timezone: str = "UTC",
            key_limit: int = 20) -> ContentDiff:
    """Compare the mapped columns of ``table``'s migrated rows with their memories, per tenant."""
    m = mapping_for(table, shape)
    params = {"tz": source_timezone}
    per_tenant = sql.SQL("""{pairs}
SELECT coalesce(s.tenant, d.tenant), coalesce(s.n, 0), s.sum, coalesce(d.n, 0), d.sum FROM
    (SELECT tenant, count(*) AS n, sum({slice}) AS sum FROM src GROUP BY tenant) s
    FULL JOIN (SELECT tenant, count(*) AS n, sum({slice}) AS sum FROM dst GROUP BY tenant) d USING (tenant)
""").format(pairs=_pairs(m), slice=sql.SQL(_SLICE))
    diff = ContentDiff(table)
    for tenant, src_n, src_sum, dst_n, dst_sum in conn.execute(per_tenant, params):
        diff.tenants += 1
        diff.compared_rows += int(dst_n)
        if (src_n, src_sum) != (dst_n, dst_sum):
            diff.differing_tenants.append(str(tenant))
    if diff.differing_tenants:
        keys = sql.SQL("{pairs} SELECT coalesce(s.source_key, d.source_key) FROM src s FULL JOIN dst d "
                       "USING (source_key) WHERE s.h IS DISTINCT FROM d.h ORDER BY 1 LIMIT {n}").format(
            pairs=_pairs(m), n=sql.Literal(key_limit))
        diff.differing_keys = [str(r[0]) for r in conn.execute(keys, params)]
    return diff


def outcomes_without_source(conn: psycopg.Connection, table: str) -> int:
    """Source rows with a recorded outcome, counted from memories and the quarantine alone (table gone)."""
    return int(scalar(
        conn, "SELECT count(DISTINCT split_part(k, '#', 1)) FROM (SELECT source_key AS k FROM memories "
        "WHERE source_table = %(t)s UNION ALL SELECT source_key FROM memory_migration_quarantine "
        "WHERE source_table = %(t)s) o", {"t": table}))
