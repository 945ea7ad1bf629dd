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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import batchsql, live, locks, privileges, ranges
from .accounting import TableAccount, account
from .checks import SECONDS, RunStatus, Serialised, as_dict, json_field
from .db import analyze, check_timezone, custom_plans, maintenance, relation_exists, scalar
from .errors import ConfigError, MigrationError, SchemaError, describe, translate
from .mapping import PRECEDENCE, TableMapping, mapping_for
from .parallel import MAX_JOBS, WORK_MEM, Phases, Workers, default_jobs, server_cores
from .progress import Progress
from .shapes import Detected, check_relation, detect

log = logging.getLogger("unified_memory.migrate")

_SPLITTABLE = ("22", "23", "P0", "42", "2B", "54")  # data, integrity, raised, undefined, dependency, limits


@dataclass(frozen=True)
class MigrationOptions(Serialised):
    """How to run: batch bounds, tables, time zone, expiry policy, throttle, dry run, parallel connections."""

    batch_size: int = 20000
    max_batch_bytes: int = 32 * 1024 * 1024
    tables: tuple[str, ...] = PRECEDENCE
    source_timezone: str = "UTC"
    expiry: str = "arrival"  # arrival: now + tier; created: legacy created_at + tier (may arrive expired)
    pause_ms: int = 0
    dry_run: bool = False
    defer_indexes: bool = True
    jobs: int = 0  # parallel connections; 0: the server's core count as far as it can tell (capped)
    lock_timeout_ms: int = 2000  # starting change capture waits at most this long for the application's locks


@dataclass
class TableRun(Serialised):
    """What one table's pass did in this run (the account holds the totals)."""

    json_derived: ClassVar[dict[str, str]] = {"rows_per_second": "rows_per_second"}
    json_order: ClassVar[tuple[str, ...]] = ("pending_before", "batches", "rows", "migrated", "vectors",
                                             "isolated_by_split", "seconds", "rows_per_second")

    shape: str = field(metadata=json_field(omit=True))
    pending_before: int = 0
    batches: int = 0
    rows: int = 0
    migrated: int = 0
    vectors: int = 0
    isolated: int = field(default=0, metadata=json_field(key="isolated_by_split"))  # found by splitting a batch
    seconds: float = field(default=0.0, metadata=SECONDS)
    ranges: int = 0  # key ranges of this pass (one connection each at a time)

    @property
    def rows_per_second(self) -> float:
        return round(self.rows / self.seconds, 1) if self.seconds else 0.0

    def add(self, other: TableRun) -> None:
        self.batches, self.rows = self.batches + other.batches, self.rows + other.rows
        self.migrated, self.vectors = self.migrated + other.migrated, self.vectors + other.vectors
        self.isolated += other.isolated


@dataclass
class MigrationRun(Serialised):
    """The result of ``migrate``: per-table run figures, outcome accounts, and seconds per phase."""

    json_derived: ClassVar[dict[str, str]] = {"tables": "per_table", "unaccounted": "unaccounted"}
    json_order: ClassVar[tuple[str, ...]] = ("status", "dry_run", "run_id", "shapes", "seconds", "options",
                                             "rebuilt_indexes", "tables", "unaccounted", "phases", "catch_up")

    status: RunStatus
    dry_run: bool
    run_id: int | None = None
    shapes: dict[str, str | None] = field(default_factory=dict)
    tables: dict[str, TableRun] = field(default_factory=dict, metadata=json_field(omit=True))
    accounts: dict[str, TableAccount] = field(default_factory=dict, metadata=json_field(omit=True))
    rebuilt_indexes: int = 0
    seconds: float = field(default=0.0, metadata=SECONDS)
    options: dict[str, object] = field(default_factory=dict)
    phases: Phases = field(default_factory=Phases, metadata=json_field(convert=Phases.rounded))
    catch_up: live.CatchUp | None = None  # the application's changes applied at the end (live.py)

    @property
    def unaccounted(self) -> int:
        return sum(a.unaccounted for a in self.accounts.values())

    @property
    def per_table(self) -> dict[str, dict[str, Any]]:
        """Each table's account (when there is one) and what this run did to it."""
        return {t: {**(as_dict(self.accounts[t]) if t in self.accounts else {}), "this_run": as_dict(r)}
                for t, r in self.tables.items()}


def migrate(conn: psycopg.Connection, options: MigrationOptions | None = None, *,
            progress: Progress | None = None,
            before_first_write: Callable[[psycopg.Connection], object] | None = None,
            lock_wait: float = locks.DEFAULT_WAIT) -> MigrationRun:
    """Migrate the legacy tables into ``memories`` (or plan it, with ``dry_run``).

    ``conn`` must be in autocommit mode: this function owns its transactions (one per batch). With
    ``jobs`` > 1 it opens that many more connections like ``conn`` for key ranges and index builds.

    Raises:
        LockBusy: another migration, a rollback or a schema change still held the lock after ``lock_wait`` s.
        SchemaError: the unified schema is not applied.
        ShapeError: a legacy table has an unknown shape, or is a relation the migration cannot key.
        MigrationError: a row could not be given an outcome.
    """
    opts = options or MigrationOptions()
    _check_options(conn, opts)
    started = time.monotonic()
    with locks.hold(conn, "migrate", lock_wait), maintenance(conn), custom_plans(conn), _session(conn):
        jobs = 1 if opts.dry_run else (opts.jobs or default_jobs(conn))
        opts = replace(opts, jobs=jobs)
        run = MigrationRun("running", opts.dry_run, options=opts.to_dict())
        with run.phases.timed("detect"):
            present = _detect(conn, run, opts)
        if not opts.dry_run:
            with run.phases.timed("start_capture"):  # before anything is read: every later write is captured
                live.start_capture(conn, present, lock_timeout_ms=opts.lock_timeout_ms)
        with run.phases.timed("pending"):
            pending = {t: _pending(conn, mapping_for(t, d.shape)) for t, d in present.items()}
            deferred_left = _deferred_count(conn)
        with Workers(conn, jobs) as workers:
            if not opts.dry_run and not any(pending.values()) and not deferred_left \
                    and not live.lag(conn).waiting:
                run.status = "nothing_to_do"
                run.accounts = _accounts(workers, present, run.phases)
                run.seconds = time.monotonic() - started
                log.info("nothing to do: every legacy row already has an outcome")
                return run
            if opts.dry_run:
                with conn.transaction(force_rollback=True):
                    _migrate_tables(conn, workers, run, present, pending, opts, progress)
                    run.accounts = _accounts(workers, present, run.phases)
                run.status = "planned"
            else:
                if before_first_write is not None and any(pending.values()):
                    before_first_write(conn)
                _real_run(conn, run, present, pending, opts, progress, workers)
    run.seconds = time.monotonic() - started
    return run


def _detect(conn: psycopg.Connection, run: MigrationRun, opts: MigrationOptions) -> dict[str, Detected]:
    """The chosen legacy tables that exist, in PRECEDENCE order, checked and with their shapes in ``run``."""
    detected = {t: detect(conn, t) for t in PRECEDENCE if t in opts.tables}
    run.shapes = {t: d.shape if d else None for t, d in detected.items()}
    present = {t: d for t, d in detected.items() if d is not None}
    for relation in present.values():
        check_relation(conn, relation)
    privileges.require(conn, "migrate", legacy=list(present))
    for table, found in detected.items():
        log.info("detected table=%s shape=%s", table, found.shape if found else "missing (skipped)")
    return present


def _real_run(conn: psycopg.Connection, run: MigrationRun, present: dict[str, Detected], pending: dict[str, int],
              opts: MigrationOptions, progress: Progress | None, workers: Workers) -> None:
    run.run_id = _open_ledger(conn, run, opts)
    try:
        if opts.defer_indexes and any(pending.values()):
            with run.phases.timed("defer_indexes"):
                _defer_indexes(conn)
        _migrate_tables(conn, workers, run, present, pending, opts, progress)
        with run.phases.timed("rebuild_indexes"):
            run.rebuilt_indexes = rebuild_deferred_indexes(conn, workers)
        with run.phases.timed("analyze"):
            analyze(conn)
        with run.phases.timed("catch_up"):
            run.catch_up = live.catch_up(conn, live.Settings(opts.source_timezone, opts.expiry, opts.batch_size,
                                                             opts.pause_ms, run.run_id))
        run.accounts = _accounts(workers, present, run.phases)
        run.status = "succeeded" if run.unaccounted == 0 else "failed"
    except BaseException as exc:
        _close_ledger(conn, run, "failed" if isinstance(exc, Exception) else "interrupted", describe(exc)[:500])
        raise
    _close_ledger(conn, run, run.status, None)
    if run.status != "succeeded":
        raise MigrationError(f"{run.unaccounted} source rows have no outcome after the run")


def _accounts(workers: Workers, present: dict[str, Detected], phases: Phases) -> dict[str, TableAccount]:
    items = list(present.values())
    with phases.timed("accounting"):
        found = workers.map(lambda c, d: account(c, d.table, d.shape), items)
    return {d.table: a for d, a in zip(items, found, strict=True)}


@contextmanager
def _session(conn: psycopg.Connection) -> Iterator[None]:
    conn.execute("SELECT set_config('work_mem', %s, false)", [WORK_MEM])
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("RESET work_mem")


def _migrate_tables(conn: psycopg.Connection, workers: Workers, run: MigrationRun, present: dict[str, Detected],
                    pending: dict[str, int], opts: MigrationOptions, progress: Progress | None) -> None:
    """Tables one after the other in PRECEDENCE order (the first table keeps a shared id); each table's key
    ranges in parallel."""
    for table, found in present.items():
        m = mapping_for(table, found.shape)
        table_run = run.tables.setdefault(table, TableRun(found.shape, pending_before=pending[table]))
        if pending[table]:
            _migrate_table(conn, workers, m, table_run, run, opts, progress)


def _migrate_table(conn: psycopg.Connection, workers: Workers, m: TableMapping, tr: TableRun, run: MigrationRun,
                   opts: MigrationOptions, progress: Progress | None) -> None:
    started = time.monotonic()
    with run.phases.timed("plan_ranges"):
        plan = ranges.plan(conn, m, jobs=workers.n if ids_follow_keys(m) else 1, pending_rows=tr.pending_before,
                           batch_size=opts.batch_size, run_id=run.run_id)
    todo = [r for r in plan if not r.completed]
    tr.ranges = len(plan)
    log.info("table=%s shape=%s pending=%d ranges=%d anti_join=%s", m.table, m.shape, tr.pending_before,
             len(plan), any(r.anti_join for r in plan))
    done = _Done(m.table, tr, started, progress)
    results = workers.map(lambda c, r: _migrate_range(c, m, r, run, opts, done, workers.stop), todo)
    for result in results:
        tr.add(result)
    with run.phases.timed("checkpoint"), conn.transaction():
        ranges.finish(conn, m, run.run_id)
    tr.seconds = time.monotonic() - started


class _Done:
    """Progress of one table over every worker (thread-safe)."""

    def __init__(self, table: str, tr: TableRun, started: float, progress: Progress | None) -> None:
        self.table, self.tr, self.started, self.progress = table, tr, started, progress
        self.rows = 0
        self.lock = threading.Lock()

    def add(self, rows: int) -> None:
        with self.lock:
            self.rows += rows
            self.tr.seconds = time.monotonic() - self.started
            if self.progress is not None:
                self.progress(self.table, self.rows, self.tr.pending_before)


def _migrate_range(conn: psycopg.Connection, m: TableMapping, rg: ranges.Range, run: MigrationRun,
                   opts: MigrationOptions, done: _Done, stop: threading.Event) -> TableRun:
    """One key range, batch after batch; each batch commits its outcomes and the range's checkpoint. Stops
    between batches when another range failed (``stop``): its checkpoint says where to resume."""
    tr = TableRun(m.shape)
    params: dict[str, object] = {"tz": opts.source_timezone, "expiry": opts.expiry, "run_id": run.run_id,
                                 "limit": opts.batch_size, "max_bytes": opts.max_batch_bytes}
    after, phases = rg.resume_after, run.phases
    if rg.anti_join:
        with phases.timed("statistics"):
            _refresh_statistics(conn)
    while not stop.is_set():
        with phases.timed("find_batch"):
            upper, count = _next_upper(conn, m, rg, after, params)
        if upper is None:
            break
        with conn.transaction():
            if count:
                with phases.timed("batch"):
                    rows, migrated, vectors = _attempt(conn, m, {**params, "after": after, "upper": upper}, tr, rg,
                                                       phases)
                tr.rows, tr.migrated, tr.vectors = tr.rows + rows, tr.migrated + migrated, tr.vectors + vectors
                tr.batches += 1
            with phases.timed("checkpoint"):
                ranges.advance(conn, m, rg, upper, run.run_id)
        after = upper
        if rg.anti_join and tr.batches & (tr.batches - 1) == 0:  # 1, 2, 4, ...: keep the anti-join's estimates
            with phases.timed("statistics"):
                _refresh_statistics(conn)
        done.add(rows if count else 0)
        log.info("batch table=%s range=%d batches=%d rows=%d migrated=%d", m.table, rg.no, tr.batches, tr.rows,
                 tr.migrated)
        if opts.pause_ms:
            time.sleep(opts.pause_ms / 1000)
    if stop.is_set():
        return tr  # not completed: the failure that set ``stop`` is raised by its own worker
    with phases.timed("checkpoint"), conn.transaction():
        ranges.complete(conn, m, rg, after)
    return tr


def ids_follow_keys(m: TableMapping) -> bool:
    """Whether distinct source keys always give distinct memory ids, so that key ranges of the table can run
    in parallel without changing which row keeps an id (I3's text ids do not: 'A…' and 'a…' are one uuid)."""
    return m.source.ids_follow_keys(m)


def _refresh_statistics(conn: psycopg.Connection) -> None:
    """ANALYZE the outcome tables: the anti-joins that find pending rows go quadratic on stale estimates."""
    analyze(conn)


def _attempt(conn: psycopg.Connection, m: TableMapping, params: dict[str, object], tr: TableRun,
             rg: ranges.Range, phases: Phases) -> tuple[int, int, int]:
    """Run one range; when the database rejects it, split until the bad rows are isolated."""
    try:
        with conn.transaction():
            row = conn.cursor(row_factory=dict_row).execute(batchsql.batch(m, pending=rg.anti_join), params).fetchone()
        assert row is not None
        return int(row["rows"]), int(row["migrated"]), int(row["vectors"])
    except psycopg.Error as exc:
        if (exc.sqlstate or "")[:2] not in _SPLITTABLE:
            raise translate(exc, f"migrating {m.table}") from exc
        with phases.timed("isolate"):
            keys = [r["key"] for r in conn.cursor(row_factory=dict_row).execute(
                batchsql.keys_in_range(m, pending=rg.anti_join), params)]
            if len(keys) <= 1:
                with conn.transaction():
                    conn.execute(batchsql.quarantine_one(m), {**params, "upper": next(iter(keys), params["upper"]),
                                                              "sqlstate": exc.sqlstate})
                tr.isolated += 1
                log.warning("quarantined table=%s reason=rejected_by_database sqlstate=%s", m.table, exc.sqlstate)
                return 1, 0, 0
            middle = keys[len(keys) // 2 - 1]
        first = _attempt(conn, m, {**params, "upper": middle}, tr, rg, phases)
        second = _attempt(conn, m, {**params, "after": middle}, tr, rg, phases)
        rows, migrated, vectors = (a + b for a, b in zip(first, second, strict=True))
        return rows, migrated, vectors


def _next_upper(conn: psycopg.Connection, m: TableMapping, rg: ranges.Range, after: str | None,
                params: dict[str, object]) -> tuple[str | None, int]:
    """The next batch's upper key and row count within ``rg`` (for ctid tables an empty window just moves on)."""
    return m.source.next_batch(conn, m, rg, after, params)


def _pending(conn: psycopg.Connection, m: TableMapping) -> int:
    """Source rows that have no outcome yet (for ctid tables: rows past the checkpoints)."""
    return m.source.pending(conn, m)


def _defer_indexes(conn: psycopg.Connection) -> None:
    """When memories is empty, drop its secondary indexes for the load; their definitions are kept first."""
    with conn.transaction():
        empty = scalar(conn, "SELECT NOT EXISTS (SELECT 1 FROM memories) AND pg_has_role(current_user, "
                           "(SELECT relowner FROM pg_class WHERE oid = 'memories'::regclass), 'USAGE')")
        if not empty:  # only the owner may drop indexes: others load with them
            return
        indexes = conn.cursor(row_factory=dict_row).execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'memories' AND left(indexname, 13) = 'idx_memories_'").fetchall()
        for index in indexes:
            conn.execute("INSERT INTO memory_migration_deferred_indexes (index_name, definition) VALUES (%s, %s) "
                         "ON CONFLICT DO NOTHING", [index["indexname"], index["indexdef"]])
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index["indexname"])))
    log.info("deferred %d secondary indexes of memories until after the load", len(indexes))


def _deferred_count(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SELECT count(*) FROM memory_migration_deferred_indexes"))


def rebuild_deferred_indexes(conn: psycopg.Connection, workers: Workers | None = None) -> int:
    """Recreate the indexes dropped for a bulk load, one transaction each (resumable), on parallel connections
    when ``workers`` has several, each build with parallel maintenance workers for the cores left over."""
    rows = conn.cursor(row_factory=dict_row).execute(
        "SELECT index_name, definition FROM memory_migration_deferred_indexes "
        "ORDER BY definition LIKE '%% USING gin %%' DESC, index_name").fetchall()
    builders = min(workers.n if workers else 1, max(len(rows), 1))
    helpers = str(max(0, server_cores(conn) // builders - 1)) if builders > 1 else None  # one builder: the server's

    def build(c: psycopg.Connection, index: dict[str, str]) -> None:
        c.execute("SELECT set_config('maintenance_work_mem', '256MB', false), "
                  "set_config('max_parallel_maintenance_workers', "
                  "coalesce(%s, current_setting('max_parallel_maintenance_workers')), false)", [helpers])
        with c.transaction():
            # the definition is pg_get_indexdef() output saved by _defer_indexes, not user input
            c.execute(_if_not_exists(index["definition"]))
            c.execute("DELETE FROM memory_migration_deferred_indexes WHERE index_name = %s", [index["index_name"]])
        c.execute("RESET maintenance_work_mem")
        c.execute("RESET max_parallel_maintenance_workers")

    if workers is not None:
        workers.map(build, rows)
    else:
        for index in rows:
            build(conn, index)
    return len(rows)


def _if_not_exists(definition: str) -> sql.Composed:
    """``CREATE [UNIQUE] INDEX name ON ...`` as ``CREATE [UNIQUE] INDEX IF NOT EXISTS name ON ...``."""
    match = re.match(r"CREATE (UNIQUE )?INDEX (.*)$", definition, re.DOTALL)
    if match is None:
        raise MigrationError("a deferred index definition is not a CREATE INDEX statement")
    return sql.SQL("CREATE {}INDEX IF NOT EXISTS {}").format(sql.SQL(match.group(1) or ""), sql.SQL(match.group(2)))


def _open_ledger(conn: psycopg.Connection, run: MigrationRun, opts: MigrationOptions) -> int:
    with conn.transaction():
        conn.execute("UPDATE memory_migration_runs SET status = 'interrupted', finished_at = now() "
                     "WHERE status = 'running'")  # we hold the lock: a 'running' row is a dead run
        run_id = scalar(conn, "INSERT INTO memory_migration_runs (options, shapes) VALUES (%s, %s) RETURNING run_id",
                        [json.dumps(opts.to_dict()), json.dumps(run.shapes)])
    return int(run_id)


def _close_ledger(conn: psycopg.Connection, run: MigrationRun, status: RunStatus, error: str | None) -> None:
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return
    counts = {t: a.to_dict() for t, a in run.accounts.items()}
    conn.execute("UPDATE memory_migration_runs SET status = %s, finished_at = now(), counts = %s, error = %s "
                 "WHERE run_id = %s AND status <> 'rolled_back'", [status, json.dumps(counts), error, run.run_id])


def _check_options(conn: psycopg.Connection, opts: MigrationOptions) -> None:
    if not conn.autocommit:
        raise ConfigError("migrate needs an autocommit connection: it commits one transaction per batch")
    if opts.batch_size < 1 or opts.max_batch_bytes < 1:
        raise ConfigError("--batch-size and --max-batch-bytes must be positive")
    if not 0 <= opts.jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs takes 1 to {MAX_JOBS} (0: the server's core count)")
    if opts.expiry not in ("arrival", "created"):
        raise ConfigError("--expiry takes 'arrival' or 'created'")
    unknown = set(opts.tables) - set(PRECEDENCE)
    if unknown:
        raise ConfigError(f"unknown tables {sorted(unknown)}; known: {', '.join(PRECEDENCE)}")
    if not relation_exists(conn, "memory_migration_checkpoints"):
        raise SchemaError("the unified schema is not applied: run `unified-memory schema up` first")
    check_timezone(conn, opts.source_timezone)
