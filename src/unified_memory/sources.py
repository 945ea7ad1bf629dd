"""Where a mapping's memories come from: the rows of a keyed table, or the items of long_term_memory's rows.

alembic gives each dialect an implementation class instead of flags; each ``TableMapping`` carries its source
the same way. The source owns what differs between a keyed table (one row, one memory, keyed by a column) and
long_term_memory (keyed by ctid, one row a JSON document of several items keyed ``<ctid>#<n>``): the key
expression and format, the range and batch-window predicates, whether a pass needs the anti-join, the batch
statement, the accounting query, the reconciled columns and the change-capture key. Callers ask the source
instead of branching. Expressions are constants of this module and of the mapping, never built from input.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import batchsql, ranges
from .db import scalar

if TYPE_CHECKING:
    from .mapping import TableMapping

T = TypeVar("T")
_TYPES = {"uuid": sql.SQL("uuid"), "text": sql.SQL("text"), "tid": sql.SQL("tid")}
_QUARANTINE_ROWS = "memory_migration_quarantine_rows"
_TID = re.compile(r"\((\d+),(\d+)\)")


@dataclass(frozen=True)
class ItemKeys:
    """The outcome key of one item: ``<row key>#<n>`` (the row's ctid, the item's index from 0). Catch-up
    retires a memory whose row moved by appending ``~<change id>``, so its key belongs to no current row."""

    sep: str = "#"
    retired: str = "~"

    def of(self, row: str, index: int) -> str:
        """The key of item ``index`` of row ``row``."""
        return f"{row}{self.sep}{index}"

    def parse(self, key: str) -> tuple[str, int]:
        """(row key, item index) of an item key (a retired key's suffix ignored)."""
        row, _, index = key.partition(self.sep)
        return row, int(index.partition(self.retired)[0])

    def row_of(self, key: str) -> str:
        """The row key of an item key, or the key itself for a row-level outcome."""
        return key.partition(self.sep)[0]

    # SQL over text expressions (constants, never input)
    def sql(self, row: str, index: str) -> str:
        return f"{row} || '{self.sep}' || {index}"

    def sql_row(self, key: str) -> str:
        return f"split_part({key}, '{self.sep}', 1)"

    def sql_index(self, key: str) -> str:
        return f"split_part({key}, '{self.sep}', 2)::int"

    def sql_is_item(self, key: str) -> str:
        return f"strpos({key}, '{self.sep}') > 0"

    def sql_is_row(self, key: str) -> str:
        return f"strpos({key}, '{self.sep}') = 0"

    def sql_current(self, key: str) -> str:
        """The key is not a retired one."""
        return f"strpos({key}, '{self.retired}') = 0"

    def sql_retired(self, key: str, change: str) -> str:
        return f"{key} || '{self.retired}' || {change}"


ITEM_KEYS = ItemKeys()

# Row-level outcomes of long_term_memory, before its items are expanded (first match wins).
ROW_QUARANTINE: tuple[tuple[str, str], ...] = (
    ("null_value", "r.json_missing"),
    ("invalid_json", "r.doc IS NULL"),
    ("json_null", "jsonb_typeof(r.doc) = 'null'"),
    ("scalar_json", "jsonb_typeof(r.doc) IN ('number', 'boolean')"),
    ("empty_array", "jsonb_typeof(r.doc) = 'array' AND jsonb_array_length(r.doc) = 0"),
    ("missing_owner", "btrim(coalesce(r.user_id, '')) = ''"),
)


def row_reason_sql() -> str:
    """SQL: the row-level quarantine reason of a long_term_memory row ``r`` (NULL when its items expand)."""
    return "CASE " + " ".join(f"WHEN {c} THEN '{r}'" for r, c in ROW_QUARANTINE) + " END"


def ctid_order(tid: str) -> tuple[int, int]:
    """A ``(page,offset)`` ctid text as numbers, to order ctids."""
    match = _TID.match(tid)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def ctid_page(tid: str) -> int:
    """The page number of a ``(page,offset)`` ctid text."""
    return ctid_order(tid)[0]


class Source(ABC):
    """What one mapping reads as its source rows ``s``, and how its outcomes are keyed."""

    key: str  # SQL: the outcome key of ``s``, text, unique per memory
    order: str  # the keyset column (``s.id``) or ``s.ctid``
    order_type: str  # uuid | text | tid
    anti_join: bool  # a pass over a table with outcomes must skip the rows that have one
    expands: bool  # one row gives several memories
    uncompared: frozenset[str]  # mapped columns reconciliation cannot compare

    def range_predicate(self) -> sql.Composed:
        """``after < key <= upper`` (``after`` NULL: from the start; ``upper`` NULL: to the end)."""
        t = _TYPES[self.order_type]
        return sql.SQL("(%(after)s::{t} IS NULL OR {o} > %(after)s::{t}) "
                       "AND (%(upper)s::{t} IS NULL OR {o} <= %(upper)s::{t})").format(t=t, o=sql.SQL(self.order))

    def not_accounted(self, m: TableMapping, *, per_row: bool = True) -> sql.Composed:
        """The source row has no outcome yet (neither a memory nor a quarantine row).

        ``per_row``: each test is a probe of the (source_table, source_key) index, for a batch's rows; ``OFFSET 0``
        keeps the planner from making it an anti-join that hashes every outcome of the table, once per batch
        (quadratic over a run). Without it (a count over the whole table), the planner chooses."""
        fence = sql.SQL(" OFFSET 0" if per_row else "")
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {t} AND x.source_key = {k}{fence}) "
            "AND NOT EXISTS (SELECT 1 FROM memory_migration_quarantine x WHERE x.source_table = {t} "
            "AND x.source_key = {k}{fence})"
        ).format(t=sql.Literal(m.table), k=sql.SQL(self.key), fence=fence)

    @abstractmethod
    def choose(self, rows: T, items: T) -> T:
        """This source's variant of a stage's own algorithm (catch-up keeps one for rows, one for items)."""

    @property
    @abstractmethod
    def row_key(self) -> str:
        """SQL: the key of a whole source row ``s`` (for row-level outcomes)."""

    @property
    @abstractmethod
    def capture_key(self) -> str | None:
        """The column a table's changes are captured by (None: the ctid)."""

    @abstractmethod
    def pending_filter(self, m: TableMapping, pending: bool) -> sql.Composable:
        """`` AND`` the anti-join against outcomes, when the pass needs it."""

    @abstractmethod
    def batch_window(self, m: TableMapping, pending: bool) -> sql.Composable:
        """The rows ``next_upper`` chooses the next batch from."""

    @abstractmethod
    def mapped(self, m: TableMapping, where: sql.Composable | None) -> tuple[sql.Composable, sql.Composable]:
        """(CTE prelude, FROM clause) of the rows or items as ``s``; ``where`` limits the rows of a source whose
        prelude reads them (see ``filter_rows``)."""

    @abstractmethod
    def filter_rows(self, where: sql.Composable | None) -> sql.Composable:
        """`` AND where`` on the mapped ``s`` when ``mapped`` did not apply it."""

    @abstractmethod
    def batch(self, m: TableMapping, pending: bool) -> sql.Composed:
        """The statement that migrates one batch; returns ``rows``, ``items``, ``migrated``, ``vectors``."""

    @abstractmethod
    def whole_table_load(self, m: TableMapping) -> sql.Composed:
        """The mapping over the whole table in one ``INSERT ... SELECT`` (the benchmark's baseline)."""

    @abstractmethod
    def ids_follow_keys(self, m: TableMapping) -> bool:
        """Distinct keys always give distinct memory ids (key ranges may then run in parallel)."""

    @abstractmethod
    def resume_after(self, last_key: str | None) -> str | None:
        """Where a catch-up pass over a completed table starts (None: the start, with the anti-join)."""

    @abstractmethod
    def latest(self, keys: list[str]) -> str:
        """The highest of ``keys`` in key order."""

    @abstractmethod
    def bounds(self, conn: psycopg.Connection, m: TableMapping, n: int) -> list[str | None]:
        """``n - 1`` keys cutting the table into ``n`` ranges of about equal rows."""

    @abstractmethod
    def pending(self, conn: psycopg.Connection, m: TableMapping) -> int:
        """Source rows that have no outcome yet."""

    @abstractmethod
    def next_batch(self, conn: psycopg.Connection, m: TableMapping, rg: ranges.Range, after: str | None,
                   params: dict[str, object]) -> tuple[str | None, int]:
        """The next batch's upper key and row count within ``rg`` (None: the range is done)."""

    @abstractmethod
    def outcomes(self, m: TableMapping, waiting: sql.Composable) -> sql.Composed:
        """Accounting: per level (``row``; ``item``), outcome: ``n`` rows (and the ``items`` of expanded rows)."""

    @abstractmethod
    def item_counters(self) -> tuple[int | None, int | None]:
        """An account's ``items`` and ``expanded_rows`` before counting (None: the source has no items)."""

    @abstractmethod
    def resync(self, m: TableMapping) -> sql.Composed:
        """Queue a change per key of a table that has outcomes already (migrated before capture existed)."""

    @abstractmethod
    def relation_problem(self, conn: psycopg.Connection, m: TableMapping, what: str) -> str | None:
        """Why a relation that is not a plain table cannot be migrated (None: it can)."""


@dataclass(frozen=True)
class RowSource(Source):
    """A keyed table: each row is one memory, keyed by ``key``."""

    key: str
    order: str
    order_type: str
    anti_join: bool = True
    expands: bool = False
    uncompared: frozenset[str] = frozenset()

    def choose(self, rows: T, items: T) -> T:
        return rows

    @property
    def row_key(self) -> str:
        return self.key

    @property
    def capture_key(self) -> str | None:
        return self.order.removeprefix("s.")

    def pending_filter(self, m: TableMapping, pending: bool) -> sql.Composable:
        return sql.SQL(" AND {}").format(self.not_accounted(m)) if pending else sql.SQL("")

    def batch_window(self, m: TableMapping, pending: bool) -> sql.Composable:
        return sql.SQL("(%(after)s::{t} IS NULL OR {o} > %(after)s::{t}) "
                       "AND (%(range_end)s::{t} IS NULL OR {o} <= %(range_end)s::{t}){pending}").format(
            t=_TYPES[self.order_type], o=sql.SQL(self.order), pending=self.pending_filter(m, pending))

    def mapped(self, m: TableMapping, where: sql.Composable | None) -> tuple[sql.Composable, sql.Composable]:
        return sql.SQL(""), self._from(m)

    @staticmethod
    def _from(m: TableMapping) -> sql.Composed:
        """The table's rows as ``s``, with the mapping's ``lets`` beside each."""
        return sql.SQL("FROM {} s{}").format(sql.Identifier(m.table), sql.SQL(m.lets_join()))

    def filter_rows(self, where: sql.Composable | None) -> sql.Composable:
        return sql.SQL(" AND {}").format(where) if where is not None else sql.SQL("")

    def batch(self, m: TableMapping, pending: bool) -> sql.Composed:
        source = sql.SQL("{} WHERE {}{}").format(self._from(m), self.range_predicate(), self.pending_filter(m, pending))
        return sql.SQL(_ROW_BATCH).format(
            insert=batchsql.insert_memories(m, source), vectors=batchsql.insert_vectors(m, source),
            table=sql.Literal(m.table), key=sql.SQL(self.key), reason=sql.SQL(m.reason_sql()),
            id=sql.SQL(m.columns["id"].sql()), source=source)

    def whole_table_load(self, m: TableMapping) -> sql.Composed:
        source = sql.SQL("{} WHERE TRUE").format(self._from(m))
        return sql.SQL("WITH ins AS ({}), vectors AS ({}) SELECT count(*) FROM ins").format(
            batchsql.insert_memories(m, source), batchsql.insert_vectors(m, source))

    def ids_follow_keys(self, m: TableMapping) -> bool:
        return m.columns["id"].expr == self.order

    def resume_after(self, last_key: str | None) -> str | None:
        return None

    def latest(self, keys: list[str]) -> str:
        return max(keys)

    def bounds(self, conn: psycopg.Connection, m: TableMapping, n: int) -> list[str | None]:
        rows = int(scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(m.table))) or 0)
        step = max(1, -(-rows // n))
        keys = conn.cursor(row_factory=dict_row).execute(batchsql.key_boundaries(m), {"step": step})
        return [r["key"] for r in keys][: n - 1]

    def pending(self, conn: psycopg.Connection, m: TableMapping) -> int:
        return int(scalar(conn, sql.SQL("SELECT count(*) FROM {} s WHERE {}").format(
            sql.Identifier(m.table), self.not_accounted(m, per_row=False))))

    def next_batch(self, conn: psycopg.Connection, m: TableMapping, rg: ranges.Range, after: str | None,
                   params: dict[str, object]) -> tuple[str | None, int]:
        row = conn.cursor(row_factory=dict_row).execute(batchsql.next_upper(m, pending=rg.anti_join),
                                                        {**params, "after": after, "range_end": rg.upper}).fetchone()
        return (row["upper"], int(row["rows"])) if row else (None, 0)

    def outcomes(self, m: TableMapping, waiting: sql.Composable) -> sql.Composed:
        return sql.SQL(_ROW_OUTCOMES).format(table=sql.Identifier(m.table), key=sql.SQL(self.key), waiting=waiting)

    def item_counters(self) -> tuple[int | None, int | None]:
        return None, None

    def resync(self, m: TableMapping) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO memory_migration_changes (source_table, op, old_key, new_key) SELECT %(t)s, 'U', k, k FROM "
            "(SELECT {key} AS k FROM {table} s UNION SELECT source_key FROM memories WHERE source_table = %(t)s "
            " UNION SELECT source_key FROM memory_migration_quarantine WHERE source_table = %(t)s) keys").format(
            key=sql.SQL(self.key), table=sql.Identifier(m.table))

    def relation_problem(self, conn: psycopg.Connection, m: TableMapping, what: str) -> str | None:
        bad = scalar(conn, sql.SQL("SELECT count(*) FROM (SELECT {k} FROM {t} s GROUP BY {k} "
                                   "HAVING {k} IS NULL OR count(*) > 1) d").format(
            k=sql.SQL(self.order), t=sql.Identifier(m.table)))
        if not bad:
            return None
        return (f"{m.table} is a {what} with {bad} NULL or repeated keys ({self.order[2:]}): "
                "its rows cannot each be given one outcome; fix the keys or copy it into a table")


_ROW_BATCH = """WITH ins AS ({insert}),
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
       (SELECT count(*) FROM ins) AS migrated, (SELECT count(*) FROM vectors) AS vectors"""

# Outcomes are counted for the current legacy rows only (joined on their keys), so rows the application deleted
# (their memories soft-deleted by catch-up: ``retired``) never make a count negative; a row captured after the
# last catch-up and not migrated yet is ``waiting``. One outcome per row: quarantine, then memory, then waiting.
_ROW_OUTCOMES = (
    "SELECT CASE WHEN q.reason IS NOT NULL THEN q.reason WHEN m.source_key IS NOT NULL THEN 'migrated' "
    "WHEN w.k IS NOT NULL THEN 'waiting' END AS outcome, count(*) AS n FROM {table} s "
    "LEFT JOIN memory_migration_quarantine q ON q.source_table = %(t)s AND q.source_key = {key} "
    "LEFT JOIN (SELECT source_key FROM memories WHERE source_table = %(t)s) m ON m.source_key = {key} "
    "LEFT JOIN {waiting} w ON w.k = {key} GROUP BY 1"
)


@dataclass(frozen=True)
class ItemSource(Source):
    """long_term_memory: a row (keyed by its ctid) holds a JSON document whose items each become a memory,
    keyed ``<ctid>#<n>`` (``ITEM_KEYS``). The source rows ``s`` of the mapping are the items, with ``s.row_key``
    (the row's ctid), ``s.item_index``, ``s.item`` (jsonb), ``s.user_id`` and ``s.nul_replaced``."""

    key: str = ITEM_KEYS.sql("s.row_key", "s.item_index")
    order: str = "s.ctid"
    order_type: str = "tid"
    anti_join: bool = False  # a ctid table resumes past its checkpoint: rows past it have no outcome
    expands: bool = True
    uncompared: frozenset[str] = frozenset({"id"})  # an id reused by a later row gets a suffix (live.py)

    def choose(self, rows: T, items: T) -> T:
        return items

    @property
    def row_key(self) -> str:
        return "s.ctid::text"

    @property
    def capture_key(self) -> str | None:
        return None

    def pending_filter(self, m: TableMapping, pending: bool) -> sql.Composable:
        return sql.SQL("")

    def batch_window(self, m: TableMapping, pending: bool) -> sql.Composable:
        return sql.SQL("s.ctid > %(after)s::tid AND s.ctid < %(window_end)s::tid")

    def mapped(self, m: TableMapping, where: sql.Composable | None) -> tuple[sql.Composable, sql.Composable]:
        prelude, source, *_ = self.prelude(m, where or sql.SQL("TRUE"))
        return prelude, source

    def filter_rows(self, where: sql.Composable | None) -> sql.Composable:
        return sql.SQL("")

    def prelude(self, m: TableMapping, where: sql.Composable) -> tuple[sql.Composable, ...]:
        """CTEs ``row_outcome`` (each source row, its parsed document and row-level reason) and ``s`` (the items
        of the rows without one); the FROM clause over the items; the row and item counts."""
        prelude = sql.SQL(_ITEM_PRELUDE).format(table=sql.Identifier(m.table), where=where,
                                                reasons=sql.SQL(row_reason_sql()))
        return (prelude, sql.SQL("FROM s" + m.lets_join()), sql.SQL("(SELECT count(*) FROM row_outcome)"),
                sql.SQL("(SELECT count(*) FROM s)"))

    def batch(self, m: TableMapping, pending: bool) -> sql.Composed:
        prelude, items_from, rows, items = self.prelude(m, self.range_predicate())
        source = sql.SQL("{} WHERE TRUE").format(items_from)
        return sql.SQL(_ITEM_BATCH).format(
            prelude=prelude, insert=batchsql.insert_memories(m, source), table=sql.Literal(m.table),
            source_table=sql.Identifier(m.table), key=sql.SQL(self.key), reason=sql.SQL(m.reason_sql()),
            id=sql.SQL(m.columns["id"].sql()), source=source, raw_table=sql.Identifier(_QUARANTINE_ROWS),
            rows=rows, items=items)

    def whole_table_load(self, m: TableMapping) -> sql.Composed:
        prelude, items_from, _, _ = self.prelude(m, sql.SQL("TRUE"))
        return sql.SQL("WITH {} ins AS ({}) SELECT count(*) FROM ins").format(
            prelude, batchsql.insert_memories(m, sql.SQL("{} WHERE TRUE").format(items_from)))

    def ids_follow_keys(self, m: TableMapping) -> bool:
        return True

    def resume_after(self, last_key: str | None) -> str | None:
        return last_key  # rows added since are appended past the last ctid reached

    def latest(self, keys: list[str]) -> str:
        return max(keys, key=ctid_order)

    def bounds(self, conn: psycopg.Connection, m: TableMapping, n: int) -> list[str | None]:
        pages = int(scalar(conn, "SELECT pg_relation_size(to_regclass(%s)) / current_setting('block_size')::int",
                           [m.table]) or 0)
        cuts = sorted({pages * i // n for i in range(1, n)} - {0})
        return [f"({p},0)" for p in cuts]

    def pending(self, conn: psycopg.Connection, m: TableMapping) -> int:
        return ranges.pending_rows(conn, m)  # rows past the checkpoints

    def next_batch(self, conn: psycopg.Connection, m: TableMapping, rg: ranges.Range, after: str | None,
                   params: dict[str, object]) -> tuple[str | None, int]:
        """A window of pages past ``after`` (about ``limit`` rows by the table's statistics): an empty window
        just moves on."""
        cur = conn.cursor(row_factory=dict_row)
        start_page = ctid_page(after) if after else 0
        pages = cur.execute(
            "SELECT pg_relation_size(c.oid) / current_setting('block_size')::int AS total, "
            "CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 40 END AS per_page "
            "FROM pg_class c WHERE c.oid = to_regclass(%s)", [m.table]).fetchone()
        assert pages is not None
        end_page = ctid_page(rg.upper) if rg.upper else int(pages["total"])
        if start_page >= end_page:
            return None, 0
        limit = int(str(params["limit"]))
        window = max(1, int(limit / max(float(pages["per_page"]), 1.0)) + 1)
        window_end = f"({min(start_page + window, end_page)},0)"
        row = cur.execute(batchsql.next_upper(m), {**params, "after": after or "(0,0)", "window_end": window_end}
                          ).fetchone()
        if row:
            return row["upper"], int(row["rows"])
        return window_end, 0

    def outcomes(self, m: TableMapping, waiting: sql.Composable) -> sql.Composed:
        k, key = ITEM_KEYS, "source_key"
        return sql.SQL(_ITEM_OUTCOMES).format(
            table=sql.Identifier(m.table), waiting=waiting, row=sql.SQL(k.sql_row(key)),
            index=sql.SQL(k.sql_index(key)), current=sql.SQL(k.sql_current(key)), is_row=sql.SQL(k.sql_is_row(key)),
            is_item=sql.SQL(k.sql_is_item(key)))

    def item_counters(self) -> tuple[int | None, int | None]:
        return 0, 0

    def resync(self, m: TableMapping) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO memory_migration_changes (source_table, op, old_key) SELECT DISTINCT %(t)s, 'D', k FROM "
            "(SELECT {row} AS k FROM memories WHERE source_table = %(t)s UNION "
            " SELECT {row} FROM memory_migration_quarantine WHERE source_table = %(t)s) o "
            "WHERE {current} AND NOT EXISTS (SELECT 1 FROM {table} s WHERE s.ctid = o.k::tid)").format(
            row=sql.SQL(ITEM_KEYS.sql_row("source_key")), current=sql.SQL(ITEM_KEYS.sql_current("k")),
            table=sql.Identifier(m.table))

    def relation_problem(self, conn: psycopg.Connection, m: TableMapping, what: str) -> str | None:
        return (f"{m.table} is a {what}: its rows are keyed by their ctid, which a {what} does not "
                "give uniquely; copy it into a plain table (CREATE TABLE ... AS SELECT) and run again")


_ITEM_PRELUDE = """
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
),"""

_ITEM_BATCH = """WITH {prelude}
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
        AND NOT EXISTS (SELECT 1 FROM memories x WHERE x.source_table = {table} AND x.source_key = q.k OFFSET 0)
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
       (SELECT count(*) FROM raw) AS raw_rows, (SELECT count(*) FROM row_q) AS quarantined_rows"""

# Per current row (ctid), its row-level outcome, or its items' outcomes (<ctid>#<n>, n below the row's item
# count; memories retired by catch-up belong to no current row).
_ITEM_OUTCOMES = """WITH r AS (
    SELECT s.ctid::text AS rk, memory_migration_json_doc(s.memory_json) AS doc FROM {table} s OFFSET 0
),
rq AS (SELECT source_key AS rk, reason FROM memory_migration_quarantine
       WHERE source_table = %(t)s AND {is_row}),
io AS (
    SELECT rk, idx, CASE WHEN bool_or(outcome IS NULL) THEN 'migrated' ELSE min(outcome) END AS outcome FROM (
        SELECT {row} AS rk, {index} AS idx, NULL AS outcome
        FROM memories WHERE source_table = %(t)s AND {current}
        UNION ALL
        SELECT {row}, {index}, reason
        FROM memory_migration_quarantine WHERE source_table = %(t)s AND {is_item}) u
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
WHERE io.idx < p.n GROUP BY io.outcome"""
