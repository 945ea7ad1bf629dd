"""SQL composed from a ``TableMapping``: the batch statement, its range finder, and the key lists for bisection.

A batch covers the source rows with ``after < key <= upper``. One statement inserts the batch's memories
straight from the source (the mapping's expressions evaluated once, nothing but ``(id, source_key)``
materialised), its legacy vectors and its quarantine rows (duplicates included), and returns the counts by
name. The source range is read again for the vectors and the quarantine: an index range scan over pages the
insert has just read. ``pending`` adds the anti-join that skips rows with an outcome; a pass over a table
that had no outcome when it began does not need it (see ``migrate``). Table names go through
``sql.Identifier``; expressions are the mapping module's constants.
"""

from __future__ import annotations

from psycopg import sql

from .mapping import LONG_TERM_ROW_QUARANTINE, TableMapping

_TYPES = {"uuid": sql.SQL("uuid"), "text": sql.SQL("text"), "tid": sql.SQL("tid")}
_QUARANTINE_ROWS = "memory_migration_quarantine_rows"


def _order(m: TableMapping) -> sql.Composable:
    return sql.SQL(m.order)


def range_predicate(m: TableMapping) -> sql.Composed:
    """``after < key <= upper`` (``after`` NULL: from the start; ``upper`` NULL: to the end)."""
    t = _TYPES[m.order_type]
    return sql.SQL("(%(after)s::{t} IS NULL OR {o} > %(after)s::{t}) "
                   "AND (%(upper)s::{t} IS NULL OR {o} <= %(upper)s::{t})").format(t=t, o=_order(m))


def not_accounted(m: TableMapping) -> sql.Composed:
    """The source row has no outcome yet (neither a memory nor a quarantine row)."""
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {t} AND x.source_key = {k}) "
        "AND NOT EXISTS (SELECT 1 FROM memory_migration_quarantine x WHERE x.source_table = {t} AND x.source_key = {k})"
    ).format(t=sql.Literal(m.table), k=sql.SQL(m.key))


def _pending(m: TableMapping, pending: bool) -> sql.Composable:
    return sql.SQL(" AND {}").format(not_accounted(m)) if pending and not m.expands else sql.SQL("")


def next_upper(m: TableMapping, *, pending: bool = True) -> sql.Composed:
    """The upper key of the next batch (``upper``, ``rows``): at most ``%(limit)s`` rows and ``%(max_bytes)s``
    bytes (one row at least), below ``%(range_end)s`` (NULL: the end of the table)."""
    t = _TYPES[m.order_type]
    window: sql.Composable
    if m.expands:
        window = sql.SQL("s.ctid > %(after)s::tid AND s.ctid < %(window_end)s::tid")
    else:
        window = sql.SQL("(%(after)s::{t} IS NULL OR {o} > %(after)s::{t}) "
                         "AND (%(range_end)s::{t} IS NULL OR {o} <= %(range_end)s::{t}){pending}").format(
            t=t, o=_order(m), pending=_pending(m, pending))
    return sql.SQL(
        "SELECT k::text AS upper, rn AS rows FROM (SELECT k, row_number() OVER w AS rn, sum(bytes) OVER w AS cum "
        "FROM (SELECT {o} AS k, coalesce({size}, 0) AS bytes FROM {table} s WHERE {window} ORDER BY {o} "
        "LIMIT %(limit)s) b WINDOW w AS (ORDER BY k)) c WHERE rn = 1 OR cum <= %(max_bytes)s ORDER BY rn DESC LIMIT 1"
    ).format(o=_order(m), size=sql.SQL(m.size), table=sql.Identifier(m.table), window=window)


def key_boundaries(m: TableMapping) -> sql.Composed:
    """Every ``%(step)s``-th key of the table in key order (``key``): where to cut it into ranges."""
    return sql.SQL("SELECT k::text AS key FROM (SELECT {o} AS k, row_number() OVER (ORDER BY {o}) AS rn "
                   "FROM {table} s) n WHERE rn %% %(step)s = 0 ORDER BY k").format(
        o=_order(m), table=sql.Identifier(m.table))


def keys_in_range(m: TableMapping, *, pending: bool = True) -> sql.Composed:
    """The keys of a batch's rows (``key``), in order, to split it when it fails."""
    return sql.SQL("SELECT {o}::text AS key FROM {table} s WHERE {range}{pending} ORDER BY {o}").format(
        o=_order(m), table=sql.Identifier(m.table), range=range_predicate(m), pending=_pending(m, pending))


def quarantine_one(m: TableMapping) -> sql.Composed:
    """Quarantine the single row with key ``%(upper)s`` that the database rejected."""
    key = sql.SQL("s.ctid::text") if m.expands else sql.SQL(m.key)
    return sql.SQL(
        "INSERT INTO memory_migration_quarantine (source_table, source_key, reason, sqlstate, raw_row, run_id) "
        "SELECT {t}, {key}, 'rejected_by_database', %(sqlstate)s, to_jsonb(s), %(run_id)s FROM {table} s "
        "WHERE {o} = %(upper)s::{type} ON CONFLICT DO NOTHING"
    ).format(t=sql.Literal(m.table), key=key, table=sql.Identifier(m.table), o=_order(m),
             type=_TYPES[m.order_type])


def _expires(m: TableMapping) -> sql.Composable:
    return sql.SQL("calculate_expires_at(mapped.decay_tier, CASE WHEN %(expiry)s = 'created' THEN mapped.created_at "
                   "ELSE now() END)")


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


def _insert_memories(m: TableMapping, source: sql.Composable, *, conflict: bool = True) -> sql.Composed:
    """``INSERT INTO memories`` of the source's good rows (``source`` binds ``s``), returning (id, source_key).
    ``OFFSET 0`` keeps the mapped row a subquery: its columns are computed once, not again in ``expires_at``."""
    columns = m.column_sql()
    targets = sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns)
    inserted = _inserted([name for name, _ in columns])
    exprs = sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.SQL(e), sql.Identifier(n)) for n, e in columns)
    return sql.SQL(
        "INSERT INTO memories ({targets}, expires_at, source_table, source_key, migrated_at) "
        "SELECT {inserted}, {expires}, {table}, mapped.um_source_key, now() FROM "
        "(SELECT {exprs}, {key} AS um_source_key {source} AND ({reason}) IS NULL OFFSET 0) mapped {squat} "
        "{conflict} RETURNING id, source_key"
    ).format(targets=targets, inserted=inserted, expires=_expires(m), table=sql.Literal(m.table), exprs=exprs,
             key=sql.SQL(m.key), source=source, reason=sql.SQL(m.reason_sql()), squat=_squatter(m),
             conflict=sql.SQL("ON CONFLICT DO NOTHING") if conflict else sql.SQL(""))


def _insert_vectors(m: TableMapping, source: sql.Composable) -> sql.Composable:
    if m.embedding is None:
        return sql.SQL("SELECT 1 WHERE false")
    return sql.SQL(
        "INSERT INTO memory_legacy_embeddings (memory_id, source, dimension, embedding) "
        "SELECT ins.id, {table}, cardinality(v.e), v.e FROM (SELECT {key} AS k, {embedding} AS e {source} "
        "AND ({embedding}) IS NOT NULL) v JOIN ins ON ins.source_key = v.k RETURNING 1"
    ).format(table=sql.Literal(m.table), key=sql.SQL(m.key), embedding=sql.SQL(m.embedding), source=source)


def batch(m: TableMapping, *, pending: bool = True) -> sql.Composed:
    """The statement that migrates one batch; returns ``rows``, ``items``, ``migrated``, ``vectors``."""
    if m.expands:
        return _long_term_batch(m)
    source = sql.SQL("FROM {} s WHERE {}{}").format(sql.Identifier(m.table), range_predicate(m), _pending(m, pending))
    return sql.SQL("""WITH ins AS ({insert}),
vectors AS ({vectors}),
item_q AS (
    INSERT INTO memory_migration_quarantine (source_table, source_key, reason, duplicate_of, raw_row, run_id)
    SELECT {table}, q.k, coalesce(q.reason, 'duplicate_id'), CASE WHEN q.reason IS NULL THEN q.id END,
           to_jsonb(q.s), %(run_id)s
    FROM (SELECT {key} AS k, {reason} AS reason, {id} AS id, s {source}) q
    WHERE q.reason IS NOT NULL OR NOT EXISTS (SELECT 1 FROM ins WHERE ins.source_key = q.k)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) + (SELECT count(*) FROM item_q) AS rows, NULL::bigint AS items,
       (SELECT count(*) FROM ins) AS migrated, (SELECT count(*) FROM vectors) AS vectors""").format(
        insert=_insert_memories(m, source), vectors=_insert_vectors(m, source), table=sql.Literal(m.table),
        key=sql.SQL(m.key), reason=sql.SQL(m.reason_sql()), id=sql.SQL(m.columns["id"].sql()), source=source)


def _long_term_batch(m: TableMapping) -> sql.Composed:
    prelude, items_from, rows, items = _long_term_prelude(m, range_predicate(m))
    source = sql.SQL("{} WHERE TRUE").format(items_from)
    return sql.SQL("""WITH {prelude}
ins AS ({insert}),
row_q AS (
    INSERT INTO memory_migration_quarantine (source_table, source_key, reason, raw_row, run_id)
    SELECT {table}, o.row_key, o.reason, (SELECT to_jsonb(r) FROM {source_table} r WHERE r.ctid = o.row_tid),
           %(run_id)s
    FROM row_outcome o WHERE o.reason IS NOT NULL
    RETURNING 1
),
item_q AS (
    INSERT INTO memory_migration_quarantine (source_table, source_key, reason, duplicate_of, raw_row, raw_key, run_id)
    SELECT {table}, q.k, coalesce(q.reason, 'duplicate_id'), CASE WHEN q.reason IS NULL THEN q.id END,
           jsonb_build_object('item_index', q.item_index, 'item', q.item), q.row_key, %(run_id)s
    FROM (SELECT {key} AS k, {reason} AS reason, {id} AS id, s.item_index, s.item, s.row_key {source}) q
    WHERE q.reason IS NOT NULL OR NOT EXISTS (SELECT 1 FROM ins WHERE ins.source_key = q.k)
        AND NOT EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {table} AND x.source_key = q.k)
    RETURNING raw_key
),
raw AS (
    INSERT INTO {raw_table} (source_table, source_key, raw_row, run_id)
    SELECT {table}, r.raw_key, (SELECT to_jsonb(x) FROM {source_table} x WHERE x.ctid = r.raw_key::tid), %(run_id)s
    FROM (SELECT DISTINCT raw_key FROM item_q) r
    ON CONFLICT (source_table, source_key) DO UPDATE SET raw_row = EXCLUDED.raw_row, run_id = EXCLUDED.run_id
    RETURNING 1
)
SELECT {rows} AS rows, {items} AS items, (SELECT count(*) FROM ins) AS migrated, 0::bigint AS vectors,
       (SELECT count(*) FROM raw) AS raw_rows, (SELECT count(*) FROM row_q) AS quarantined_rows""").format(
        prelude=prelude, insert=_insert_memories(m, source), table=sql.Literal(m.table),
        source_table=sql.Identifier(m.table), key=sql.SQL(m.key), reason=sql.SQL(m.reason_sql()),
        id=sql.SQL(m.columns["id"].sql()), source=source, raw_table=sql.Identifier(_QUARANTINE_ROWS),
        rows=rows, items=items)


def whole_table_load(m: TableMapping) -> sql.Composed:
    """Load-then-index's statement (the benchmark's baseline): the mapping over the whole table in one
    ``INSERT ... SELECT``, kept vectors included; good rows only, no quarantine, no checkpoint."""
    if m.expands:
        prelude, items_from, _, _ = _long_term_prelude(m, sql.SQL("TRUE"))
        return sql.SQL("WITH {} ins AS ({}) SELECT count(*) FROM ins").format(
            prelude, _insert_memories(m, sql.SQL("{} WHERE TRUE").format(items_from)))
    source = sql.SQL("FROM {} s WHERE TRUE").format(sql.Identifier(m.table))
    return sql.SQL("WITH ins AS ({}), vectors AS ({}) SELECT count(*) FROM ins").format(
        _insert_memories(m, source), _insert_vectors(m, source))


def mapped_source(m: TableMapping, where: sql.Composable | None = None) -> tuple[sql.Composable, sql.Composable]:
    """(CTE prelude, FROM clause) over the source table, rows or items as ``s``: for reconciliation. ``where``
    limits a ctid table's rows (others filter ``s`` themselves)."""
    if m.expands:
        prelude, source, *_ = _long_term_prelude(m, where or sql.SQL("TRUE"))
        return prelude, source
    return sql.SQL(""), sql.SQL("FROM {} s").format(sql.Identifier(m.table))


def _long_term_prelude(m: TableMapping, where: sql.Composable) -> tuple[sql.Composable, ...]:
    """CTEs ``row_outcome`` (each source row, its parsed document and row-level reason) and ``s`` (the items of
    the rows without one); the FROM clause over the items; the row and item counts."""
    reasons = "CASE " + " ".join(f"WHEN {c} THEN '{r}'" for r, c in LONG_TERM_ROW_QUARANTINE) + " END"
    prelude = sql.SQL("""
row_outcome AS (
    SELECT r.*, {reasons} AS reason FROM (
        SELECT s.ctid AS row_tid, s.ctid::text AS row_key, s.user_id, s.memory_json IS NULL AS json_missing,
               d.doc, d.doc IS NOT NULL AND strpos(s.memory_json, E'\\\\u0000') > 0
                      AND memory_migration_try_jsonb(s.memory_json) IS NULL AS nul_replaced
        FROM {table} s CROSS JOIN LATERAL (SELECT memory_migration_json_doc(s.memory_json) AS doc OFFSET 0) d
        WHERE {where}
    ) r
),
s AS (
    SELECT o.row_key, e.idx - 1 AS item_index, e.item, o.user_id, o.nul_replaced, o.reason AS row_reason
    FROM row_outcome o
    CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(o.doc) WHEN 'array' THEN o.doc
                                                 ELSE jsonb_build_array(o.doc) END) WITH ORDINALITY AS e(item, idx)
    WHERE o.reason IS NULL
),""").format(table=sql.Identifier(m.table), where=where, reasons=sql.SQL(reasons))
    return (prelude, sql.SQL("FROM s"), sql.SQL("(SELECT count(*) FROM row_outcome)"),
            sql.SQL("(SELECT count(*) FROM s)"))
