"""SQL composed from a ``TableMapping``: the batch statement, its range finder, and the key lists for bisection.

A batch covers the source rows with ``after < key <= upper``. One statement inserts the batch's memories
straight from the source (the mapping's expressions evaluated once, nothing but ``(id, source_key)``
materialised), its legacy vectors and its quarantine rows (duplicates included), and returns the counts by
name. The source range is read again for the vectors and the quarantine: an index range scan over pages the
insert has just read. ``pending`` adds the anti-join that skips rows with an outcome; a pass over a table
that had no outcome when it began does not need it (see ``migrate``). What differs between a keyed table and
long_term_memory's items (the batch window, the anti-join, the statement's outcome CTEs) is the mapping's
source's (``sources``); this module holds what they share. Table names go through ``sql.Identifier``;
expressions are the mapping module's constants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql

if TYPE_CHECKING:
    from .mapping import TableMapping

_TYPES = {"uuid": sql.SQL("uuid"), "text": sql.SQL("text"), "tid": sql.SQL("tid")}


def _order(m: TableMapping) -> sql.Composable:
    return sql.SQL(m.order)


def range_predicate(m: TableMapping) -> sql.Composed:
    """``after < key <= upper`` (``after`` NULL: from the start; ``upper`` NULL: to the end)."""
    return m.source.range_predicate()


def next_upper(m: TableMapping, *, pending: bool = True) -> sql.Composed:
    """The upper key of the next batch (``upper``, ``rows``): at most ``%(limit)s`` rows and ``%(max_bytes)s``
    bytes (one row at least), within the source's batch window (``%(range_end)s`` or ``%(window_end)s``)."""
    return sql.SQL(
        "SELECT k::text AS upper, rn AS rows FROM (SELECT k, row_number() OVER w AS rn, sum(bytes) OVER w AS cum "
        "FROM (SELECT {o} AS k, coalesce({size}, 0) AS bytes FROM {table} s WHERE {window} ORDER BY {o} "
        "LIMIT %(limit)s) b WINDOW w AS (ORDER BY k)) c WHERE rn = 1 OR cum <= %(max_bytes)s ORDER BY rn DESC LIMIT 1"
    ).format(o=_order(m), size=sql.SQL(m.size), table=sql.Identifier(m.table),
             window=m.source.batch_window(m, pending))


def key_boundaries(m: TableMapping) -> sql.Composed:
    """Every ``%(step)s``-th key of the table in key order (``key``): where to cut it into ranges."""
    return sql.SQL("SELECT k::text AS key FROM (SELECT {o} AS k, row_number() OVER (ORDER BY {o}) AS rn "
                   "FROM {table} s) n WHERE rn %% %(step)s = 0 ORDER BY k").format(
        o=_order(m), table=sql.Identifier(m.table))


def keys_in_range(m: TableMapping, *, pending: bool = True) -> sql.Composed:
    """The keys of a batch's rows (``key``), in order, to split it when it fails."""
    return sql.SQL("SELECT {o}::text AS key FROM {table} s WHERE {range}{pending} ORDER BY {o}").format(
        o=_order(m), table=sql.Identifier(m.table), range=range_predicate(m),
        pending=m.source.pending_filter(m, pending))


def quarantine_one(m: TableMapping) -> sql.Composed:
    """Quarantine the single row with key ``%(upper)s`` that the database rejected."""
    return sql.SQL(
        "INSERT INTO memory_migration_quarantine (source_table, source_key, reason, sqlstate, raw_row, run_id) "
        "SELECT {t}, {key}, 'rejected_by_database', %(sqlstate)s, to_jsonb(s), %(run_id)s FROM {table} s "
        "WHERE {o} = %(upper)s::{type} ON CONFLICT DO NOTHING"
    ).format(t=sql.Literal(m.table), key=sql.SQL(m.source.row_key), table=sql.Identifier(m.table), o=_order(m),
             type=_TYPES[m.order_type])


def expires_at(row: sql.Composable | None = None) -> sql.Composed:
    """SQL: a memory's ``expires_at`` from the ``decay_tier`` and ``created_at`` of the mapped row ``row`` (a
    constant alias; None: unqualified), by the ``%(expiry)s`` policy: from arrival, or from creation."""
    prefix = sql.SQL("{}.").format(row) if row is not None else sql.SQL("")
    return sql.SQL("calculate_expires_at({r}decay_tier, CASE WHEN %(expiry)s = 'created' THEN {r}created_at "
                   "ELSE now() END)").format(r=prefix)


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


def insert_memories(m: TableMapping, source: sql.Composable, *, conflict: bool = True) -> sql.Composed:
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
    ).format(targets=targets, inserted=inserted, expires=expires_at(sql.SQL("mapped")), table=sql.Literal(m.table),
             exprs=exprs, key=sql.SQL(m.key), source=source, reason=sql.SQL(m.reason_sql()), squat=_squatter(m),
             conflict=sql.SQL("ON CONFLICT DO NOTHING") if conflict else sql.SQL(""))


def insert_vectors(m: TableMapping, source: sql.Composable) -> sql.Composable:
    if m.embedding is None:
        return sql.SQL("SELECT 1 WHERE false")
    return sql.SQL(
        "INSERT INTO memory_legacy_embeddings (memory_id, source, dimension, embedding) "
        "SELECT ins.id, {table}, cardinality(v.e), v.e FROM (SELECT {key} AS k, {embedding} AS e {source} "
        "AND ({embedding}) IS NOT NULL) v JOIN ins ON ins.source_key = v.k RETURNING 1"
    ).format(table=sql.Literal(m.table), key=sql.SQL(m.key), embedding=sql.SQL(m.embedding), source=source)


def batch(m: TableMapping, *, pending: bool = True) -> sql.Composed:
    """The statement that migrates one batch; returns ``rows``, ``items``, ``migrated``, ``vectors``."""
    return m.source.batch(m, pending)


def whole_table_load(m: TableMapping) -> sql.Composed:
    """Load-then-index's statement (the benchmark's baseline): the mapping over the whole table in one
    ``INSERT ... SELECT``, kept vectors included; good rows only, no quarantine, no checkpoint."""
    return m.source.whole_table_load(m)


def mapped_source(m: TableMapping, where: sql.Composable | None = None) -> tuple[sql.Composable, sql.Composable]:
    """(CTE prelude, FROM clause) over the source table, rows or items as ``s``: for reconciliation. ``where``
    limits a ctid table's rows (others filter ``s`` themselves)."""
    return m.source.mapped(m, where)
