"""A table's migration pass as key ranges, each with its own checkpoint (``memory_migration_ranges``, 019).

A pass cuts the table into ranges (one per parallel connection, one when the table is small or its ids do
not follow its keys); each batch commits its outcomes with its range's ``last_key``, so after a crash every
range resumes where it stopped. When the pass began on a table with no outcome at all, a row past its range's
``last_key`` cannot have one, and batches skip the anti-join against ``memories`` and the quarantine
(``anti_join`` false); a catch-up pass over a finished table keeps it. When every range is done, the table's
row in ``memory_migration_checkpoints`` (017) is completed and the ranges are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row

from .db import scalar

if TYPE_CHECKING:
    from .mapping import TableMapping


@dataclass
class Range:
    """Rows with ``lower < key <= upper`` (NULL: open), done up to ``last_key``."""

    source_table: str
    range_no: int
    shape: str
    lower_key: str | None
    upper_key: str | None
    last_key: str | None
    anti_join: bool
    completed: bool

    @property
    def no(self) -> int:
        return self.range_no

    @property
    def upper(self) -> str | None:
        return self.upper_key

    @property
    def resume_after(self) -> str | None:
        return self.last_key if self.last_key is not None else self.lower_key


_COLUMNS = ("source_table, range_no, shape, lower_key, upper_key, last_key, anti_join, "
            "completed_at IS NOT NULL AS completed")


def _checkpoint(conn: psycopg.Connection, m: TableMapping) -> dict[str, object] | None:
    return conn.cursor(row_factory=dict_row).execute(
        "SELECT last_key, completed_at IS NOT NULL AS completed, shape FROM memory_migration_checkpoints "
        "WHERE source_table = %s", [m.table]).fetchone()


def existing(conn: psycopg.Connection, m: TableMapping) -> list[Range]:
    """The ranges of the table's unfinished pass (empty when there is none)."""
    return conn.cursor(row_factory=class_row(Range)).execute(
        sql.SQL("SELECT {} FROM memory_migration_ranges WHERE source_table = %s ORDER BY range_no").format(
            sql.SQL(_COLUMNS)), [m.table]).fetchall()


def plan(conn: psycopg.Connection, m: TableMapping, *, jobs: int, pending_rows: int, batch_size: int,
         run_id: int | None) -> list[Range]:
    """The ranges of this pass: the unfinished pass's when there is one, else new ones (saved)."""
    ck = _checkpoint(conn, m)
    if ck is not None and ck["shape"] == m.shape and not ck["completed"]:
        found = existing(conn, m)
        if found and all(r.shape == m.shape for r in found):
            return found
        last = str(ck["last_key"]) if ck["last_key"] is not None else None  # a pass of a version before 019
        return _save(conn, m, [Range(m.table, 0, m.shape, last, None, None, m.source.anti_join, False)], run_id)
    if ck is not None and ck["shape"] == m.shape and ck["completed"]:  # catch-up of rows added since
        last = str(ck["last_key"]) if ck["last_key"] is not None else None
        lower = m.source.resume_after(last)
        return _save(conn, m, [Range(m.table, 0, m.shape, lower, None, None, m.source.anti_join, False)], run_id)
    anti_join = m.source.anti_join and _has_outcomes(conn, m)
    n = max(1, min(jobs, pending_rows // max(batch_size, 1)))
    cuts: list[str | None] = [None, *(bounds(conn, m, n) if n > 1 and not anti_join else []), None]
    made = [Range(m.table, i, m.shape, cuts[i], cuts[i + 1], None, anti_join, False) for i in range(len(cuts) - 1)]
    return _save(conn, m, made, run_id)


def _has_outcomes(conn: psycopg.Connection, m: TableMapping) -> bool:
    return bool(scalar(conn, "SELECT EXISTS (SELECT 1 FROM memories WHERE source_table = %(t)s) OR EXISTS "
                             "(SELECT 1 FROM memory_migration_quarantine WHERE source_table = %(t)s)", {"t": m.table}))


def bounds(conn: psycopg.Connection, m: TableMapping, n: int) -> list[str | None]:
    """``n - 1`` keys cutting the table into ``n`` ranges of about equal rows (pages for ctid tables)."""
    return m.source.bounds(conn, m, n)


def _save(conn: psycopg.Connection, m: TableMapping, made: list[Range], run_id: int | None) -> list[Range]:
    """Replace the table's ranges with ``made`` and open its checkpoint, in one transaction."""
    with conn.transaction():
        conn.execute("DELETE FROM memory_migration_ranges WHERE source_table = %s", [m.table])
        conn.cursor().executemany(
            "INSERT INTO memory_migration_ranges (source_table, range_no, shape, lower_key, upper_key, last_key, "
            "anti_join, run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [(r.source_table, r.range_no, r.shape, r.lower_key, r.upper_key, r.last_key, r.anti_join, run_id)
             for r in made])
        conn.execute(
            "INSERT INTO memory_migration_checkpoints AS c (source_table, shape, last_key, batches, run_id) "
            "VALUES (%(t)s, %(s)s, NULL, 0, %(run)s) ON CONFLICT (source_table) DO UPDATE SET shape = EXCLUDED.shape, "
            "completed_at = NULL, updated_at = now(), run_id = EXCLUDED.run_id, "
            "last_key = CASE WHEN c.shape = EXCLUDED.shape THEN c.last_key END",
            {"t": m.table, "s": m.shape, "run": run_id})
        conn.execute("DELETE FROM memory_migration_quarantine_rows r WHERE r.source_table = %(t)s AND NOT EXISTS "
                     "(SELECT 1 FROM memory_migration_quarantine q WHERE q.source_table = r.source_table "
                     "AND q.raw_key = r.source_key)", {"t": m.table})  # raw rows left by a rollback
    return made


def advance(conn: psycopg.Connection, m: TableMapping, rg: Range, last_key: str, run_id: int | None) -> None:
    """The range's checkpoint, inside the batch's transaction."""
    conn.execute("UPDATE memory_migration_ranges SET last_key = %s, run_id = %s, updated_at = now() "
                 "WHERE source_table = %s AND range_no = %s", [last_key, run_id, m.table, rg.range_no])
    conn.execute("UPDATE memory_migration_checkpoints SET batches = batches + 1, updated_at = now(), run_id = %s "
                 "WHERE source_table = %s", [run_id, m.table])
    rg.last_key = last_key


def complete(conn: psycopg.Connection, m: TableMapping, rg: Range, last_key: str | None) -> None:
    conn.execute("UPDATE memory_migration_ranges SET completed_at = now(), last_key = coalesce(%s, last_key) "
                 "WHERE source_table = %s AND range_no = %s", [last_key, m.table, rg.range_no])
    rg.completed = True


def finish(conn: psycopg.Connection, m: TableMapping, run_id: int | None) -> None:
    """Every range is done: the table's checkpoint completed at the highest key reached; the ranges removed."""
    found = existing(conn, m)
    if any(not r.completed for r in found):
        return
    reached = [k for r in found for k in (r.last_key, r.lower_key) if k is not None]
    last: str | None = None
    if reached:
        last = m.source.latest(reached)
    conn.execute("UPDATE memory_migration_checkpoints SET completed_at = now(), updated_at = now(), run_id = %s, "
                 "last_key = coalesce(%s, last_key) WHERE source_table = %s", [run_id, last, m.table])
    conn.execute("DELETE FROM memory_migration_ranges WHERE source_table = %s", [m.table])


def pending_rows(conn: psycopg.Connection, m: TableMapping) -> int:
    """Rows of a ctid table past its checkpoints: past each unfinished range's last key, or past the table's."""
    table = sql.Identifier(m.table)
    found = existing(conn, m)
    ck = _checkpoint(conn, m)
    if not found or ck is None or ck["shape"] != m.shape:
        after = ck["last_key"] if ck is not None and ck["shape"] == m.shape else None
        return int(scalar(conn, sql.SQL("SELECT count(*) FROM {} s WHERE %(after)s::tid IS NULL "
                                        "OR s.ctid > %(after)s::tid").format(table), {"after": after}))
    total = 0
    for r in found:
        if not r.completed:
            total += int(scalar(conn, sql.SQL("SELECT count(*) FROM {} s WHERE (%(a)s::tid IS NULL OR s.ctid > "
                                              "%(a)s::tid) AND (%(u)s::tid IS NULL OR s.ctid <= %(u)s::tid)").format(
                table), {"a": r.resume_after, "u": r.upper_key}))
    return total
