"""SQL composed from a ``TableMapping``: the batch statement, its range finder, and the key lists for bisection.

A batch covers the source rows with ``after < key <= upper``. One statement inserts the batch's memories,
its legacy vectors and its quarantine rows (duplicates included) and returns the counts. Table names go
through ``sql.Identifier``; expressions are the mapping module's constants.
"""

from __future__ import annotations

from psycopg import sql

from .mapping import LONG_TERM_ROW_QUARANTINE, TableMapping

_TYPES = {"uuid": sql.SQL("uuid"), "text": sql.SQL("text"), "tid": sql.SQL("tid")}


def _order(m: TableMapping) -> sql.Composable:
    return sql.SQL(m.order)


def range_predicate(m: TableMapping) -> sql.Composed:
    """``after < key <= upper`` (``after`` NULL: from the start)."""
    t = _TYPES[m.order_type]
    return sql.SQL("(%(after)s::{t} IS NULL OR {o} > %(after)s::{t}) AND {o} <= %(upper)s::{t}").format(
        t=t, o=_order(m))


def not_accounted(m: TableMapping) -> sql.Composed:
    """The source row has no outcome yet (neither a memory nor a quarantine row)."""
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {t} AND x.source_key = {k}) "
        "AND NOT EXISTS (SELECT 1 FROM memory_migration_quarantine x WHERE x.source_table = {t} AND x.source_key = {k})"
    ).format(t=sql.Literal(m.table), k=sql.SQL(m.key))


def next_upper(m: TableMapping) -> sql.Composed:
    """The upper key of the next batch: at most ``%(limit)s`` rows and ``%(max_bytes)s`` bytes (one row at least)."""
    t = _TYPES[m.order_type]
    window: sql.Composable
    if m.expands:
        window = sql.SQL("s.ctid > %(after)s::tid AND s.ctid < %(window_end)s::tid")
    else:
        window = sql.SQL("(%(after)s::{t} IS NULL OR {o} > %(after)s::{t}) AND {pending}").format(
            t=t, o=_order(m), pending=not_accounted(m))
    return sql.SQL(
        "SELECT k::text, rn FROM (SELECT k, row_number() OVER w AS rn, sum(bytes) OVER w AS cum FROM "
        "(SELECT {o} AS k, coalesce({size}, 0) AS bytes FROM {table} s WHERE {window} ORDER BY {o} LIMIT %(limit)s) b "
        "WINDOW w AS (ORDER BY k)) c WHERE rn = 1 OR cum <= %(max_bytes)s ORDER BY rn DESC LIMIT 1"
    ).format(o=_order(m), size=sql.SQL(m.size), table=sql.Identifier(m.table), window=window)


def keys_in_range(m: TableMapping) -> sql.Composed:
    """The keys of a batch's rows, in order, to split it when it fails."""
    pending = sql.SQL("TRUE") if m.expands else not_accounted(m)
    return sql.SQL("SELECT {o}::text FROM {table} s WHERE {range} AND {pending} ORDER BY {o}").format(
        o=_order(m), table=sql.Identifier(m.table), range=range_predicate(m), pending=pending)


def quarantine_one(m: TableMapping) -> sql.Composed:
    """Quarantine the single row with key ``%(upper)s`` that the database rejected."""
    key = sql.SQL("s.ctid::text") if m.expands else sql.SQL(m.key)
    return sql.SQL(
        "INSERT INTO memory_migration_quarantine (source_table, source_key, reason, sqlstate, raw_row, run_id) "
        "SELECT {t}, {key}, 'rejected_by_database', %(sqlstate)s, to_jsonb(s), %(run_id)s FROM {table} s "
        "WHERE {o} = %(upper)s::{type}"
    ).format(t=sql.Literal(m.table), key=key, table=sql.Identifier(m.table), o=_order(m),
             type=_TYPES[m.order_type])


def _expires() -> str:
    return ("calculate_expires_at(decay_tier, CASE WHEN %(expiry)s = 'created' THEN created_at ELSE now() END)")


def _squatter(m: TableMapping) -> sql.Composed:
    """A lateral join finding a memory the migration did not write, of another tenant, at the mapped id."""
    org = sql.SQL("mapped.org_id" if "org_id" in m.columns else "NULL::varchar")
    return sql.SQL("LEFT JOIN LATERAL (SELECT true AS taken FROM memories x WHERE x.id = mapped.id "
                   "AND x.source_table IS NULL AND (x.user_id, x.org_id) IS DISTINCT FROM (mapped.user_id, {})) "
                   "squat ON true").format(org)


def _inserted(names: list[str]) -> sql.Composable:
    """The INSERT's select list: an id another tenant's row squats is replaced, the original kept in meta.legacy."""
    taken = sql.SQL("squat.taken IS NOT NULL")
    picks = {
        "id": sql.SQL("CASE WHEN {} THEN gen_random_uuid() ELSE mapped.id END").format(taken),
        "meta": sql.SQL("CASE WHEN {} THEN jsonb_set(mapped.meta, '{{legacy}}', coalesce(mapped.meta -> 'legacy', "
                        "'{{}}') || jsonb_build_object('id_in_use', mapped.id)) ELSE mapped.meta END").format(taken),
    }
    return sql.SQL(", ").join(picks[n] if n in picks else sql.SQL("mapped.{}").format(sql.Identifier(n))
                              for n in names)


def batch(m: TableMapping) -> sql.Composed:
    """The statement that migrates one batch and returns (rows, items, migrated, vectors, reasons jsonb)."""
    columns = m.column_sql()
    targets = sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns)
    inserted = _inserted([name for name, _ in columns])
    exprs = sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.SQL(e), sql.Identifier(n)) for n, e in columns)
    embedding = sql.SQL(m.embedding or "NULL::real[]")
    table = sql.Literal(m.table)
    if m.expands:
        prelude, source, rows, items, row_q = _long_term_prelude(m, range_predicate(m))
    else:
        prelude = sql.SQL("")
        source = sql.SQL("FROM {} s WHERE {} AND {}").format(sql.Identifier(m.table), range_predicate(m),
                                                              not_accounted(m))
        rows, items, row_q = sql.SQL("(SELECT count(*) FROM mapped)"), sql.SQL("NULL::bigint"), sql.SQL("")
    return sql.SQL("""WITH {prelude}
mapped AS (
    SELECT {key} AS source_key, s AS raw_row, {reason} AS reason, {embedding} AS embedding, {exprs} {source}
),
ins AS (
    INSERT INTO memories ({targets}, expires_at, source_table, source_key, migrated_at)
    SELECT {inserted}, {expires}, {table}, source_key, now() FROM mapped {squat} WHERE reason IS NULL
    ON CONFLICT DO NOTHING
    RETURNING id, source_key
),
vectors AS (
    INSERT INTO memory_legacy_embeddings (memory_id, source, dimension, embedding)
    SELECT ins.id, {table}, cardinality(mapped.embedding), mapped.embedding
    FROM ins JOIN mapped USING (source_key) WHERE mapped.embedding IS NOT NULL
    RETURNING 1
),
item_q AS (
    INSERT INTO memory_migration_quarantine (source_table, source_key, reason, duplicate_of, raw_row, run_id)
    SELECT {table}, m.source_key, coalesce(m.reason, 'duplicate_id'), CASE WHEN m.reason IS NULL THEN m.id END,
           to_jsonb(m.raw_row), %(run_id)s
    FROM mapped m WHERE m.reason IS NOT NULL OR NOT EXISTS (SELECT 1 FROM ins WHERE ins.source_key = m.source_key)
    RETURNING reason
){row_q}
SELECT {rows}, {items}, (SELECT count(*) FROM ins), (SELECT count(*) FROM vectors),
       (SELECT coalesce(jsonb_object_agg(reason, n), '{{}}'::jsonb) FROM
            (SELECT reason, count(*) AS n FROM (SELECT reason FROM item_q {row_q_union}) u GROUP BY reason) g)
""").format(
        prelude=prelude, key=sql.SQL(m.key), reason=sql.SQL(m.reason_sql()),
        embedding=embedding, exprs=exprs, source=source, targets=targets, inserted=inserted, squat=_squatter(m),
        expires=sql.SQL(_expires()),
        table=table, row_q=row_q, rows=rows, items=items,
        row_q_union=sql.SQL("UNION ALL SELECT reason FROM row_q") if m.expands else sql.SQL(""),
    )


def mapped_source(m: TableMapping) -> tuple[sql.Composable, sql.Composable]:
    """(CTE prelude, FROM clause) over the whole source table, rows or items as ``s``: for reconciliation."""
    if m.expands:
        prelude, source, *_ = _long_term_prelude(m, sql.SQL("TRUE"))
        return prelude, source
    return sql.SQL(""), sql.SQL("FROM {} s").format(sql.Identifier(m.table))


def _long_term_prelude(m: TableMapping, where: sql.Composable) -> tuple[sql.Composable, ...]:
    reasons = "CASE " + " ".join(f"WHEN {c} THEN '{r}'" for r, c in LONG_TERM_ROW_QUARANTINE) + " END"
    prelude = sql.SQL("""
rows_in AS (
    SELECT s.ctid::text AS row_key, s AS row_value, s.user_id, s.memory_json,
           memory_migration_try_jsonb(s.memory_json) AS doc
    FROM {table} s WHERE {where}
),
row_outcome AS (SELECT r.*, {reasons} AS reason FROM rows_in r),
s AS (
    SELECT o.row_key, e.idx - 1 AS item_index, e.item, o.user_id, o.row_value
    FROM row_outcome o
    CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(o.doc) WHEN 'array' THEN o.doc
                                                 ELSE jsonb_build_array(o.doc) END) WITH ORDINALITY AS e(item, idx)
    WHERE o.reason IS NULL
),""").format(table=sql.Identifier(m.table), where=where, reasons=sql.SQL(reasons))
    row_q = sql.SQL(""",
row_q AS (
    INSERT INTO memory_migration_quarantine (source_table, source_key, reason, raw_row, run_id)
    SELECT {table}, row_key, reason, to_jsonb(row_value), %(run_id)s FROM row_outcome WHERE reason IS NOT NULL
    RETURNING reason
)""").format(table=sql.Literal(m.table))
    return (prelude, sql.SQL("FROM s"), sql.SQL("(SELECT count(*) FROM rows_in)"),
            sql.SQL("(SELECT count(*) FROM s)"), row_q)
