"""SQL of the catch-up, composed from a ``TableMapping``: what a batch of captured changes does to memories.

Catch-up is state-based: a change only names a key (a row's key, or a ctid for long_term_memory); the
statements read that key's current legacy row and make its memories match, so applying a change twice, out
of order, or after the bulk pass already saw the row, ends in the same state. Keys come in as arrays
(``%(keys)s``); table names go through ``sql.Identifier``; expressions are the mapping module's constants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql

from .batchsql import expires_at
from .sources import ITEM_KEYS, row_reason_sql

if TYPE_CHECKING:
    from .mapping import TableMapping

_TYPES = {"uuid": sql.SQL("uuid"), "text": sql.SQL("text"), "tid": sql.SQL("tid")}
_AUDIT = sql.SQL(
    "audit AS (INSERT INTO memory_access_log (memory_id, user_id, org_id, access_type, correlation_id) "
    "SELECT id, user_id, org_id, 'delete', %(correlation)s FROM del RETURNING 1)")


def _exprs(m: TableMapping) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.SQL(e), sql.Identifier(n)) for n, e in m.column_sql())


def _targets(m: TableMapping) -> list[str]:
    return [name for name, _ in m.column_sql()]


def current(m: TableMapping) -> sql.Composed:
    """CTE ``cur``: the mapped current rows of the keys ``%(keys)s`` (keyed tables)."""
    return sql.SQL(
        "cur AS (SELECT {key} AS source_key, {reason} AS reason, s AS raw_row, {embedding} AS embedding, "
        "{created} AS created_raw, {exprs} FROM {table} s{lets} WHERE {order} = ANY(%(keys)s::{type}[]))"
    ).format(key=sql.SQL(m.key), reason=sql.SQL(m.reason_sql()), embedding=sql.SQL(m.embedding or "NULL::real[]"),
             created=sql.SQL(m.columns["created_at"].expr), exprs=_exprs(m), table=sql.Identifier(m.table),
             order=sql.SQL(m.order), type=_TYPES[m.order_type], lets=sql.SQL(m.lets_join()))


def lock_memories() -> sql.SQL:
    """The memories at ``%(keys)s``, locked, with the version the migration last wrote (1 when never)."""
    return sql.SQL(
        "SELECT m.id, m.source_key, m.version, coalesce(s.version, 1) AS synced, m.deleted_at IS NULL AS live "
        "FROM memories m LEFT JOIN LATERAL (SELECT version FROM memory_migration_synced WHERE memory_id = m.id "
        "OFFSET 0) s ON true "  # a probe per memory, not a hash of every version the migration recorded
        "WHERE m.source_table = %(t)s AND m.source_key = ANY(%(keys)s::text[]) ORDER BY m.id FOR UPDATE OF m")


RECORD_CONFLICTS = sql.SQL(
    "INSERT INTO memory_migration_conflicts (change_id, source_table, source_key, op, memory_id, memory_version, "
    "synced_version) SELECT c.change_id, %(t)s, c.key, c.op, c.memory_id, c.version, c.synced "
    "FROM unnest(%(cids)s::bigint[], %(ckeys)s::text[], %(ops)s::text[], %(mids)s::uuid[], %(versions)s::int[], "
    "%(synced)s::int[]) AS c(change_id, key, op, memory_id, version, synced)")


def gone(m: TableMapping) -> sql.Composed:
    """Keys whose row is gone: their live memories are soft-deleted (audited), their quarantine rows cleared."""
    return sql.SQL("""WITH gone AS (
    SELECT k FROM unnest(%(keys)s::text[]) k WHERE NOT EXISTS (SELECT 1 FROM {table} s WHERE {order} = k::{type})
),
dq AS (DELETE FROM memory_migration_quarantine q USING gone WHERE q.source_table = %(t)s AND q.source_key = gone.k),
del AS (UPDATE memories m SET deleted_at = now() FROM gone
        WHERE m.source_table = %(t)s AND m.source_key = gone.k AND m.deleted_at IS NULL
        RETURNING m.id, m.user_id, m.org_id),
{audit}
SELECT (SELECT count(*) FROM del)""").format(table=sql.Identifier(m.table), order=sql.SQL(m.order),
                                              type=_TYPES[m.order_type], audit=_AUDIT)


def rejected(m: TableMapping) -> sql.Composed:
    """Current rows that map to a quarantine reason: quarantined (replacing an older reason), memory soft-deleted."""
    return sql.SQL("""WITH {cur},
bad AS (SELECT source_key, reason, raw_row FROM cur WHERE reason IS NOT NULL),
q AS (INSERT INTO memory_migration_quarantine (source_table, source_key, reason, raw_row, run_id)
      SELECT %(t)s, source_key, reason, to_jsonb(raw_row), %(run_id)s FROM bad
      ON CONFLICT (source_table, source_key) DO UPDATE SET reason = EXCLUDED.reason, raw_row = EXCLUDED.raw_row,
          sqlstate = NULL, duplicate_of = NULL, run_id = EXCLUDED.run_id, quarantined_at = now()
      RETURNING 1),
del AS (UPDATE memories m SET deleted_at = now() FROM bad
        WHERE m.source_table = %(t)s AND m.source_key = bad.source_key AND m.deleted_at IS NULL
        RETURNING m.id, m.user_id, m.org_id),
{audit}
SELECT (SELECT count(*) FROM q)""").format(cur=current(m), audit=_AUDIT)


def update(m: TableMapping) -> sql.Composed:
    """Existing memories of current rows take the rows' mapped values (and come back if soft-deleted)."""
    names = [n for n in _targets(m) if n != "id"]
    new = [sql.SQL("coalesce(c.created_raw, m.created_at)") if n == "created_at" else
           sql.SQL("c.{}").format(sql.Identifier(n)) for n in names]
    cols = sql.SQL(", ").join(map(sql.Identifier, [*names, "deleted_at"]))
    values = sql.SQL(", ").join([*new, sql.SQL("NULL::timestamptz")])
    olds = sql.SQL(", ").join(sql.SQL("m.{}").format(sql.Identifier(n)) for n in [*names, "deleted_at"])
    return sql.SQL("""WITH {cur}
UPDATE memories m SET ({cols}) = ROW({values}) FROM cur c
WHERE c.reason IS NULL AND m.source_table = %(t)s AND m.source_key = c.source_key
  AND ROW({olds}) IS DISTINCT FROM ROW({values})
RETURNING m.id""").format(cur=current(m), cols=cols, values=values, olds=olds)


def insert(m: TableMapping) -> sql.Composed:
    """Current rows without a memory become memories (an id taken by another table: ``duplicate_id``)."""
    targets = sql.SQL(", ").join(map(sql.Identifier, _targets(m)))
    vectors = sql.SQL(
        ", vec AS (INSERT INTO memory_legacy_embeddings (memory_id, source, dimension, embedding) "
        "SELECT ins.id, %(t)s, cardinality(n.embedding), n.embedding FROM ins JOIN new n USING (source_key) "
        "WHERE n.embedding IS NOT NULL RETURNING 1)") if m.embedding else sql.SQL("")
    return sql.SQL("""WITH {cur},
new AS (SELECT * FROM cur c WHERE c.reason IS NULL
        AND NOT EXISTS (SELECT 1 FROM memories x WHERE x.source_table = %(t)s AND x.source_key = c.source_key)),
ins AS (INSERT INTO memories ({targets}, expires_at, source_table, source_key, migrated_at)
        SELECT {targets}, {expires}, %(t)s, source_key, now() FROM new ON CONFLICT DO NOTHING
        RETURNING id, source_key),
dup AS (INSERT INTO memory_migration_quarantine (source_table, source_key, reason, duplicate_of, raw_row, run_id)
        SELECT %(t)s, n.source_key, 'duplicate_id', n.id, to_jsonb(n.raw_row), %(run_id)s FROM new n
        WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.source_key = n.source_key)
        ON CONFLICT (source_table, source_key) DO UPDATE SET reason = 'duplicate_id',
            duplicate_of = EXCLUDED.duplicate_of, raw_row = EXCLUDED.raw_row, quarantined_at = now()
        RETURNING 1){vectors}
SELECT (SELECT count(*) FROM ins) AS inserted, (SELECT count(*) FROM dup) AS quarantined""").format(
        cur=current(m), targets=targets, expires=expires_at(), vectors=vectors)


def embeddings(m: TableMapping) -> sql.Composed:
    """Kept legacy vectors follow an edited row."""
    return sql.SQL("""WITH {cur}
INSERT INTO memory_legacy_embeddings (memory_id, source, dimension, embedding)
SELECT m.id, %(t)s, cardinality(c.embedding), c.embedding FROM cur c
JOIN memories m ON m.source_table = %(t)s AND m.source_key = c.source_key WHERE c.embedding IS NOT NULL
ON CONFLICT (memory_id) DO UPDATE SET embedding = EXCLUDED.embedding, dimension = EXCLUDED.dimension
WHERE memory_legacy_embeddings.embedding IS DISTINCT FROM EXCLUDED.embedding""").format(cur=current(m))


CLEAR_RESOLVED = sql.SQL(
    "DELETE FROM memory_migration_quarantine q WHERE q.source_table = %(t)s AND q.source_key = ANY(%(keys)s::text[]) "
    "AND EXISTS (SELECT 1 FROM memories m WHERE m.source_table = %(t)s AND m.source_key = q.source_key "
    "AND m.deleted_at IS NULL)")

SYNC = sql.SQL(
    "INSERT INTO memory_migration_synced (memory_id, version) SELECT id, version FROM memories "
    "WHERE source_table = %(t)s AND source_key = ANY(%(keys)s::text[]) "
    "ON CONFLICT (memory_id) DO UPDATE SET version = EXCLUDED.version")

# ------------------------------------------------------------------------------------------ long_term_memory
# Items of a row are keyed <ctid>#<n> (``sources.ITEM_KEYS``) with n = 0, 1, ... each with one outcome (memory
# or quarantine), so the item keys of a ctid are found by walking n up until neither exists.
_K = ITEM_KEYS


def item_keys(m: TableMapping) -> sql.Composed:
    """The item keys with an outcome of the row keys (ctids) ``%(keys)s`` (one column)."""
    return sql.SQL("""WITH RECURSIVE it(c, i) AS (
    SELECT c, 0 FROM unnest(%(keys)s::text[]) c
    UNION ALL
    SELECT it.c, it.i + 1 FROM it WHERE  -- OFFSET 0: index probes, not a hash of all the table's outcomes
        EXISTS (SELECT 1 FROM memories x
                WHERE x.source_table = {t} AND x.source_key = {item} OFFSET 0)
        OR EXISTS (SELECT 1 FROM memory_migration_quarantine q
                   WHERE q.source_table = {t} AND q.source_key = {item} OFFSET 0)
)
SELECT {key} FROM it""").format(t=sql.Literal(m.table), item=sql.SQL(_K.sql("it.c", "it.i")),
                                 key=sql.SQL(_K.sql("c", "i")))


def retire(m: TableMapping) -> sql.Composed:
    """The memories at the item keys ``%(keys)s`` give their key up (a row version gone), soft-deleted and
    audited where ``%(soft)s``; the migration's version of each is recorded."""
    return sql.SQL("""WITH r AS (
    SELECT * FROM unnest(%(keys)s::text[], %(cids)s::bigint[], %(soft)s::bool[]) AS r(k, cid, soft)
),
del AS (UPDATE memories m SET source_key = {retired},
               deleted_at = CASE WHEN r.soft THEN coalesce(m.deleted_at, now()) ELSE m.deleted_at END
        FROM r WHERE m.source_table = {t} AND m.source_key = r.k
        RETURNING m.id, m.user_id, m.org_id, m.version, r.soft AS soft),
sync AS (INSERT INTO memory_migration_synced (memory_id, version)
         SELECT id, version FROM del WHERE soft
         ON CONFLICT (memory_id) DO UPDATE SET version = EXCLUDED.version)
INSERT INTO memory_access_log (memory_id, user_id, org_id, access_type, correlation_id)
SELECT id, user_id, org_id, 'delete', %(correlation)s FROM del WHERE soft AND id = ANY(%(audited)s::uuid[])"""
    ).format(t=sql.Literal(m.table), retired=sql.SQL(_K.sql_retired("m.source_key", "r.cid")))


def clear_item_quarantine(m: TableMapping) -> sql.Composed:
    """Quarantine rows of the row keys (ctids) ``%(ctids)s`` and of their items are removed."""
    return sql.SQL("DELETE FROM memory_migration_quarantine WHERE source_table = {t} "
                   "AND {row} = ANY(%(ctids)s::text[])").format(t=sql.Literal(m.table),
                                                               row=sql.SQL(_K.sql_row("source_key")))


def _rows_in(m: TableMapping) -> sql.Composed:
    """CTEs ``rows_in``, ``row_outcome``, ``rq`` (row-level quarantine) and ``s`` (the items) of the current rows
    at ``%(ctids)s``, each with the change id ``cid`` that named it."""
    return sql.SQL("""WITH rows_in AS (  -- the row-level columns of batchsql's long_term prelude (NUL-safe document)
    SELECT s.ctid::text AS row_key, s AS row_value, s.user_id, s.memory_json, w.cid,
           s.memory_json IS NULL AS json_missing, d.doc,
           d.doc IS NOT NULL AND strpos(s.memory_json, E'\\\\u0000') > 0
               AND memory_migration_try_jsonb(s.memory_json) IS NULL AS nul_replaced
    FROM {table} s JOIN unnest(%(ctids)s::text[], %(cids)s::bigint[]) AS w(c, cid) ON s.ctid = w.c::tid
    CROSS JOIN LATERAL (SELECT memory_migration_json_doc(s.memory_json) AS doc OFFSET 0) d
    WHERE s.ctid = ANY(%(ctids)s::tid[])
),
row_outcome AS (SELECT r.*, {reasons} AS reason FROM rows_in r),
rq AS (INSERT INTO memory_migration_quarantine (source_table, source_key, reason, raw_row, run_id)
       SELECT {t}, row_key, reason, to_jsonb(row_value), %(run_id)s FROM row_outcome
       WHERE reason IS NOT NULL ON CONFLICT DO NOTHING RETURNING 1),
s AS (
    SELECT o.row_key, e.idx - 1 AS item_index, e.item, o.user_id, o.cid, o.nul_replaced
    FROM row_outcome o
    CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(o.doc) WHEN 'array' THEN o.doc
                                                 ELSE jsonb_build_array(o.doc) END) WITH ORDINALITY AS e(item, idx)
    WHERE o.reason IS NULL
),""").format(table=sql.Identifier(m.table), t=sql.Literal(m.table), reasons=sql.SQL(row_reason_sql()))


def long_term_insert(m: TableMapping) -> sql.Composed:
    """The items of the current rows at ``%(ctids)s`` become memories or quarantine rows; an id still held by
    a retired memory of an earlier row at the same ctid gets the change id as a suffix."""
    names = _targets(m)
    retired_id = sql.SQL("memory_migration_uuid({} || {})").format(
        sql.Literal(f"{m.table}:"), sql.SQL(_K.sql_retired("mp.source_key", "mp.cid")))
    picked = sql.SQL(", ").join(
        sql.SQL("CASE WHEN EXISTS (SELECT 1 FROM memories x WHERE x.id = mp.id) THEN {} ELSE mp.id END").format(
            retired_id) if n == "id" else sql.SQL("mp.{}").format(sql.Identifier(n)) for n in names)
    return sql.SQL("""{rows_in}
mp AS (SELECT {key} AS source_key, s.cid, s AS raw_row, {reason} AS reason, {exprs} FROM s{lets}),
ins AS (INSERT INTO memories ({targets}, expires_at, source_table, source_key, migrated_at)
        SELECT {picked}, {expires}, {t}, mp.source_key, now() FROM mp
        WHERE mp.reason IS NULL AND NOT EXISTS (SELECT 1 FROM memories x
              WHERE x.source_table = {t} AND x.source_key = mp.source_key)
        ON CONFLICT DO NOTHING RETURNING 1),
iq AS (INSERT INTO memory_migration_quarantine (source_table, source_key, reason, raw_row, run_id)
       SELECT {t}, source_key, reason, to_jsonb(raw_row), %(run_id)s FROM mp
       WHERE reason IS NOT NULL ON CONFLICT DO NOTHING RETURNING 1)
SELECT (SELECT count(*) FROM ins) AS inserted,
       (SELECT count(*) FROM rq) + (SELECT count(*) FROM iq) AS quarantined""").format(
        rows_in=_rows_in(m), key=sql.SQL(m.key), reason=sql.SQL(m.reason_sql()), exprs=_exprs(m),
        targets=sql.SQL(", ").join(map(sql.Identifier, names)), picked=picked, t=sql.Literal(m.table),
        expires=expires_at(sql.SQL("mp")), lets=sql.SQL(m.lets_join()))
