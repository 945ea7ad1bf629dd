"""The data migration: every legacy row into ``memories``, in keyset batches that are transactions.

Fast path: one set-based statement per batch (``batchsql.batch``). A batch the database rejects is split in
halves under savepoints until the offending row is isolated and quarantined with its SQLSTATE; the rest
commits. Each batch commits its memories, quarantine rows and checkpoint together, so a crash at any point
leaves a state that a re-run completes. A dry run is this same path inside a transaction that is rolled back.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import batchsql, privileges
from .accounting import TableAccount, account
from .db import analyze, custom_plans, maintenance, relation_exists, scalar
from .errors import ConfigError, LockBusy, MigrationError, SchemaError, translate
from .mapping import PRECEDENCE, TableMapping, mapping_for
from .shapes import Detected, detect

log = logging.getLogger("unified_memory.migrate")

MIGRATE_LOCK = (0x756D, 3)
_SPLITTABLE = ("22", "23", "P0", "42", "2B", "54")  # data, integrity, raised, undefined, dependency, limits


@dataclass(frozen=True)
class MigrationOptions:
    """How to run: batch bounds, tables, time zone, expiry policy, throttle, dry run."""

    batch_size: int = 5000
    max_batch_bytes: int = 32 * 1024 * 1024
    tables: tuple[str, ...] = PRECEDENCE
    source_timezone: str = "UTC"
    expiry: str = "arrival"  # arrival: now + tier; created: legacy created_at + tier (may arrive expired)
    pause_ms: int = 0
    dry_run: bool = False
    defer_indexes: bool = True

    def to_dict(self) -> dict[str, object]:
        return {"batch_size": self.batch_size, "max_batch_bytes": self.max_batch_bytes, "tables": list(self.tables),
                "source_timezone": self.source_timezone, "expiry": self.expiry, "pause_ms": self.pause_ms,
                "dry_run": self.dry_run}


@dataclass
class TableRun:
    """What one table's pass did in this run (the account holds the totals)."""

    shape: str
    pending_before: int = 0
    batches: int = 0
    rows: int = 0
    migrated: int = 0
    vectors: int = 0
    isolated: int = 0  # rows found by splitting a failed batch
    seconds: float = 0.0


@dataclass
class MigrationRun:
    """The result of ``migrate``: per-table run figures and outcome accounts."""

    status: str
    dry_run: bool
    run_id: int | None = None
    shapes: dict[str, str | None] = field(default_factory=dict)
    tables: dict[str, TableRun] = field(default_factory=dict)
    accounts: dict[str, TableAccount] = field(default_factory=dict)
    rebuilt_indexes: int = 0
    seconds: float = 0.0
    options: dict[str, object] = field(default_factory=dict)

    @property
    def unaccounted(self) -> int:
        return sum(a.unaccounted for a in self.accounts.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "status": self.status, "dry_run": self.dry_run, "run_id": self.run_id, "shapes": self.shapes,
            "seconds": round(self.seconds, 3), "options": self.options, "rebuilt_indexes": self.rebuilt_indexes,
            "tables": {t: {**self.accounts[t].to_dict(), "this_run": _run_dict(r)} if t in self.accounts
                       else {"this_run": _run_dict(r)} for t, r in self.tables.items()},
            "unaccounted": self.unaccounted,
        }


def _run_dict(r: TableRun) -> dict[str, object]:
    rate = r.rows / r.seconds if r.seconds else 0.0
    return {"pending_before": r.pending_before, "batches": r.batches, "rows": r.rows, "migrated": r.migrated,
            "vectors": r.vectors, "isolated_by_split": r.isolated, "seconds": round(r.seconds, 3),
            "rows_per_second": round(rate, 1)}


Progress = Callable[[str, int, int], None]  # (table, rows done, rows total)


def migrate(conn: psycopg.Connection, options: MigrationOptions | None = None, *,
            progress: Progress | None = None,
            before_first_write: Callable[[psycopg.Connection], object] | None = None) -> MigrationRun:
    """Migrate the legacy tables into ``memories`` (or plan it, with ``dry_run``).

    ``conn`` must be in autocommit mode: this function owns its transactions (one per batch).

    Raises:
        LockBusy: another migration is running.
        SchemaError: the unified schema is not applied.
        ShapeError: a legacy table has an unknown shape.
        MigrationError: a row could not be given an outcome.
    """
    opts = options or MigrationOptions()
    _check_options(conn, opts)
    started = time.monotonic()
    with _lock(conn), maintenance(conn), custom_plans(conn):
        detected = {t: detect(conn, t) for t in PRECEDENCE if t in opts.tables}
        run = MigrationRun("running", opts.dry_run, shapes={t: d.shape if d else None for t, d in detected.items()},
                           options=opts.to_dict())
        present = {t: d for t, d in detected.items() if d is not None}
        privileges.require(conn, "migrate", legacy=list(present))
        for table, found in detected.items():
            log.info("detected table=%s shape=%s", table, found.shape if found else "missing (skipped)")
        pending = {t: _pending(conn, mapping_for(t, d.shape)) for t, d in present.items()}
        deferred_left = _deferred_count(conn)
        if not opts.dry_run and not any(pending.values()) and not deferred_left:
            run.status = "nothing_to_do"
            run.accounts = {t: account(conn, t, d.shape) for t, d in present.items()}
            run.seconds = time.monotonic() - started
            log.info("nothing to do: every legacy row already has an outcome")
            return run
        if opts.dry_run:
            with conn.transaction(force_rollback=True):
                _migrate_tables(conn, run, present, pending, opts, progress)
                run.accounts = {t: account(conn, t, d.shape) for t, d in present.items()}
            run.status = "planned"
        else:
            if before_first_write is not None and any(pending.values()):
                before_first_write(conn)
            _real_run(conn, run, present, pending, opts, progress)
    run.seconds = time.monotonic() - started
    return run


def _real_run(conn: psycopg.Connection, run: MigrationRun, present: dict[str, Detected], pending: dict[str, int],
              opts: MigrationOptions, progress: Progress | None) -> None:
    run.run_id = _open_ledger(conn, run, opts)
    try:
        if opts.defer_indexes and any(pending.values()):
            _defer_indexes(conn)
        _migrate_tables(conn, run, present, pending, opts, progress)
        run.rebuilt_indexes = rebuild_deferred_indexes(conn)
        analyze(conn)
        run.accounts = {t: account(conn, t, d.shape) for t, d in present.items()}
        run.status = "succeeded" if run.unaccounted == 0 else "failed"
    except BaseException as exc:
        _close_ledger(conn, run, "failed" if isinstance(exc, Exception) else "interrupted", repr(exc)[:500])
        raise
    _close_ledger(conn, run, run.status, None)
    if run.status != "succeeded":
        raise MigrationError(f"{run.unaccounted} source rows have no outcome after the run")


def _migrate_tables(conn: psycopg.Connection, run: MigrationRun, present: dict[str, Detected],
                    pending: dict[str, int], opts: MigrationOptions, progress: Progress | None) -> None:
    for table, found in present.items():
        m = mapping_for(table, found.shape)
        table_run = run.tables.setdefault(table, TableRun(found.shape, pending_before=pending[table]))
        if pending[table]:
            _migrate_table(conn, m, table_run, run.run_id, opts, progress)


def _migrate_table(conn: psycopg.Connection, m: TableMapping, tr: TableRun, run_id: int | None,
                   opts: MigrationOptions, progress: Progress | None) -> None:
    started = time.monotonic()
    _refresh_statistics(conn)
    after = _resume_point(conn, m)
    params: dict[str, object] = {"tz": opts.source_timezone, "expiry": opts.expiry, "run_id": run_id,
                                 "limit": opts.batch_size, "max_bytes": opts.max_batch_bytes}
    log.info("table=%s shape=%s pending=%d resume_after=%s", m.table, m.shape, tr.pending_before,
             "start" if after is None else "checkpoint")
    while True:
        upper, count = _next_upper(conn, m, after, params)
        if upper is None:
            break
        with conn.transaction():
            if count:
                rows, migrated, vectors = _attempt(conn, m, {**params, "after": after, "upper": upper}, tr)
                tr.rows, tr.migrated, tr.vectors = tr.rows + rows, tr.migrated + migrated, tr.vectors + vectors
                tr.batches += 1
            _checkpoint(conn, m, upper, run_id, done=False, dry_run=opts.dry_run)
        after = upper
        if tr.batches & (tr.batches - 1) == 0:  # batches 1, 2, 4, 8, ...: keep the planner's estimates current
            _refresh_statistics(conn)
        tr.seconds = time.monotonic() - started
        if progress is not None:
            progress(m.table, tr.rows, tr.pending_before)
        log.info("batch table=%s batches=%d rows=%d migrated=%d", m.table, tr.batches, tr.rows, tr.migrated)
        if opts.pause_ms:
            time.sleep(opts.pause_ms / 1000)
    _checkpoint(conn, m, after, run_id, done=True, dry_run=opts.dry_run)
    tr.seconds = time.monotonic() - started


def _refresh_statistics(conn: psycopg.Connection) -> None:
    """ANALYZE the outcome tables: the anti-joins that find pending rows go quadratic on stale estimates."""
    analyze(conn)


def _attempt(conn: psycopg.Connection, m: TableMapping, params: dict[str, object],
             tr: TableRun) -> tuple[int, int, int]:
    """Run one range; when the database rejects it, split until the bad rows are isolated."""
    try:
        with conn.transaction():
            row = conn.execute(batchsql.batch(m), params).fetchone()
        assert row is not None
        return int(row[0]), int(row[2]), int(row[3])
    except psycopg.Error as exc:
        if (exc.sqlstate or "")[:2] not in _SPLITTABLE:
            raise translate(exc, f"migrating {m.table}") from exc
        keys = [r[0] for r in conn.execute(batchsql.keys_in_range(m), params)]
        if len(keys) <= 1:
            with conn.transaction():
                conn.execute(batchsql.quarantine_one(m), {**params, "upper": keys[0] if keys else params["upper"],
                                                          "sqlstate": exc.sqlstate})
            tr.isolated += 1
            log.warning("quarantined table=%s reason=rejected_by_database sqlstate=%s", m.table, exc.sqlstate)
            return 1, 0, 0
        middle = keys[len(keys) // 2 - 1]
        first = _attempt(conn, m, {**params, "upper": middle}, tr)
        second = _attempt(conn, m, {**params, "after": middle}, tr)
        return first[0] + second[0], first[1] + second[1], first[2] + second[2]


def _next_upper(conn: psycopg.Connection, m: TableMapping, after: str | None,
                params: dict[str, object]) -> tuple[str | None, int]:
    """The next batch's upper key and row count; for ctid tables an empty window just moves on."""
    if not m.expands:
        row = conn.execute(batchsql.next_upper(m), {**params, "after": after}).fetchone()
        return (row[0], int(row[1])) if row else (None, 0)
    start_page = _page(after) if after else 0
    pages = conn.execute(sql.SQL(
        "SELECT pg_relation_size({t}) / current_setting('block_size')::int, "
        "CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 40 END "
        "FROM pg_class c WHERE c.oid = {t}::regclass").format(t=sql.Literal(m.table))).fetchone()
    assert pages is not None
    total_pages, per_page = int(pages[0]), float(pages[1])
    if start_page >= total_pages:
        return None, 0
    window = max(1, int(int(params["limit"]) / max(per_page, 1.0)) + 1)  # type: ignore[call-overload]
    window_end = f"({start_page + window},0)"
    row = conn.execute(batchsql.next_upper(m), {**params, "after": after or "(0,0)", "window_end": window_end}
                       ).fetchone()
    if row:
        return row[0], int(row[1])
    return window_end, 0


def _page(tid: str) -> int:
    match = re.match(r"\((\d+),(\d+)\)", tid)
    return int(match.group(1)) if match else 0


def _resume_point(conn: psycopg.Connection, m: TableMapping) -> str | None:
    row = conn.execute("SELECT last_key, completed_at IS NOT NULL, shape FROM memory_migration_checkpoints "
                       "WHERE source_table = %s", [m.table]).fetchone()
    if row is None or row[2] != m.shape:
        return None
    last_key, completed = row[0], row[1]
    if completed and not m.expands:
        return None  # catch-up pass over a finished table: the anti-join skips rows with outcomes
    return str(last_key) if last_key is not None else None


def _pending(conn: psycopg.Connection, m: TableMapping) -> int:
    """Source rows that have no outcome yet (for ctid tables: rows past the checkpoint)."""
    if m.expands:
        after = _resume_point(conn, m)
        return int(scalar(conn, sql.SQL("SELECT count(*) FROM {} s WHERE %(after)s::tid IS NULL "
                                        "OR s.ctid > %(after)s::tid").format(sql.Identifier(m.table)),
                          {"after": after}))
    return int(scalar(conn, sql.SQL("SELECT count(*) FROM {} s WHERE {}").format(
        sql.Identifier(m.table), batchsql.not_accounted(m))))


def _checkpoint(conn: psycopg.Connection, m: TableMapping, last_key: str | None, run_id: int | None, *,
                done: bool, dry_run: bool) -> None:
    if dry_run:
        return
    conn.execute(
        "INSERT INTO memory_migration_checkpoints AS c (source_table, shape, last_key, batches, completed_at, run_id) "
        "VALUES (%(t)s, %(s)s, %(k)s, 1, CASE WHEN %(done)s THEN now() END, %(run)s) "
        "ON CONFLICT (source_table) DO UPDATE SET shape = EXCLUDED.shape, "
        "last_key = coalesce(EXCLUDED.last_key, c.last_key), batches = c.batches + 1, "
        "completed_at = EXCLUDED.completed_at, updated_at = now(), run_id = EXCLUDED.run_id",
        {"t": m.table, "s": m.shape, "k": last_key, "done": done, "run": run_id},
    )


def _defer_indexes(conn: psycopg.Connection) -> None:
    """When memories is empty, drop its secondary indexes for the load; their definitions are kept first."""
    with conn.transaction():
        empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM memories) AND pg_has_role(current_user, "
                             "(SELECT relowner FROM pg_class WHERE oid = 'memories'::regclass), 'USAGE')"
                             ).fetchone()  # only the owner may drop indexes: others load with them
        if not empty or not empty[0]:
            return
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'memories' AND left(indexname, 13) = 'idx_memories_'").fetchall()
        for name, definition in indexes:
            conn.execute("INSERT INTO memory_migration_deferred_indexes (index_name, definition) VALUES (%s, %s) "
                         "ON CONFLICT DO NOTHING", [name, definition])
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    log.info("deferred %d secondary indexes of memories until after the load", len(indexes))


def _deferred_count(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SELECT count(*) FROM memory_migration_deferred_indexes"))


def rebuild_deferred_indexes(conn: psycopg.Connection) -> int:
    """Recreate the indexes dropped for a bulk load, one transaction each (resumable)."""
    rows = conn.execute("SELECT index_name, definition FROM memory_migration_deferred_indexes ORDER BY index_name"
                        ).fetchall()
    conn.execute("SET maintenance_work_mem = '256MB'")
    for name, definition in rows:
        with conn.transaction():
            # definition is pg_get_indexdef() output saved by _defer_indexes, not user input
            conn.execute(str(definition).replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1).encode())
            conn.execute("DELETE FROM memory_migration_deferred_indexes WHERE index_name = %s", [name])
    conn.execute("RESET maintenance_work_mem")
    return len(rows)


def _open_ledger(conn: psycopg.Connection, run: MigrationRun, opts: MigrationOptions) -> int:
    with conn.transaction():
        conn.execute("UPDATE memory_migration_runs SET status = 'interrupted', finished_at = now() "
                     "WHERE status = 'running'")  # we hold the lock: a 'running' row is a dead run
        row = conn.execute("INSERT INTO memory_migration_runs (options, shapes) VALUES (%s, %s) RETURNING run_id",
                           [json.dumps(opts.to_dict()), json.dumps(run.shapes)]).fetchone()
    assert row is not None
    return int(row[0])


def _close_ledger(conn: psycopg.Connection, run: MigrationRun, status: str, error: str | None) -> None:
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return
    counts = {t: a.to_dict() for t, a in run.accounts.items()}
    conn.execute("UPDATE memory_migration_runs SET status = %s, finished_at = now(), counts = %s, error = %s "
                 "WHERE run_id = %s", [status, json.dumps(counts), error, run.run_id])


class _lock:
    """The migration's advisory lock: a concurrent run is refused at once."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s, %s)", MIGRATE_LOCK).fetchone()
        if not row or not row[0]:
            raise LockBusy("another migration is running on this database (advisory lock held); try again later")

    def __exit__(self, *exc: object) -> None:
        if not self.conn.closed and self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", MIGRATE_LOCK)


def _check_options(conn: psycopg.Connection, opts: MigrationOptions) -> None:
    if not conn.autocommit:
        raise ConfigError("migrate needs an autocommit connection: it commits one transaction per batch")
    if opts.batch_size < 1 or opts.max_batch_bytes < 1:
        raise ConfigError("--batch-size and --max-batch-bytes must be positive")
    if opts.expiry not in ("arrival", "created"):
        raise ConfigError("--expiry takes 'arrival' or 'created'")
    unknown = set(opts.tables) - set(PRECEDENCE)
    if unknown:
        raise ConfigError(f"unknown tables {sorted(unknown)}; known: {', '.join(PRECEDENCE)}")
    if not relation_exists(conn, "memory_migration_checkpoints"):
        raise SchemaError("the unified schema is not applied: run `unified-memory schema up` first")
    try:
        conn.execute("SELECT now() AT TIME ZONE %s", [opts.source_timezone])
    except psycopg.errors.InvalidParameterValue as exc:
        raise ConfigError(f"unknown time zone {opts.source_timezone!r}") from exc
