"""Cutover and cleanup: the application leaves the legacy tables, then the legacy tables leave the database.

Cutover catches up without locks first (so the locked moment is short), then in one transaction takes
SHARE ROW EXCLUSIVE locks on the legacy tables (the application's writes wait, its reads go on) with a short
``lock_timeout`` retried with backoff, applies the last changes, puts the read-only guard on each table (a
write fails loudly with SQLSTATE 25006 instead of vanishing), removes capture and records the cutover. A
crash anywhere leaves the database as before the command; a re-run does it again.

Cleanup (the guide's step 5) refuses unless every legacy table is cut over and the last migration and
validation succeeded; it writes a final backup, verifies it, and only then drops the tables in one
transaction. ``rollback`` of that final backup restores them exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import backup as backups
from . import locks
from .accounting import account
from .checks import FAIL, RUN_OK, SECONDS, CleanupStatus, CutoverStatus, Serialised, json_field
from .db import first_column, maintenance, relation_exists, scalar
from .errors import ConfirmationRequired, MigrationError, UnifiedMemoryError
from .live import CatchUp, Settings, capturing, catch_up, retry_locked, settings_of_last_run, stop_capture
from .mapping import PRECEDENCE
from .shapes import detect

log = logging.getLogger("unified_memory.cutover")


class CleanupRefused(UnifiedMemoryError):
    """Cleanup (or cutover) refused: a precondition does not hold; nothing was changed."""

    exit_code = 9


class CleanupNotConfirmed(CleanupRefused, ConfirmationRequired):
    """Cleanup was called without ``yes``."""


@dataclass
class CutoverResult(Serialised):
    """What the cutover did."""

    json_derived: ClassVar[dict[str, str]] = {"status": "status"}
    json_order: ClassVar[tuple[str, ...]] = ("status",)

    tables: list[str] = field(default_factory=list)
    before_lock: CatchUp = field(default_factory=CatchUp, metadata=json_field(key="catch_up_before_lock"))
    under_lock: CatchUp = field(default_factory=CatchUp, metadata=json_field(key="catch_up_under_lock"))
    attempts: int = field(default=0, metadata=json_field(key="lock_attempts"))
    locked_seconds: float = field(default=0.0, metadata=SECONDS)
    seconds: float = field(default=0.0, metadata=SECONDS)

    @property
    def status(self) -> CutoverStatus:
        return "cut_over"


@dataclass
class CleanupResult(Serialised):
    """The final backup and the tables dropped."""

    json_derived: ClassVar[dict[str, str]] = {"status": "status"}
    json_order: ClassVar[tuple[str, ...]] = ("status",)

    backup: str = field(metadata=json_field(key="final_backup"))
    tables: dict[str, int] = field(default_factory=dict, metadata=json_field(key="dropped"))
    seconds: float = field(default=0.0, metadata=SECONDS)

    @property
    def status(self) -> CleanupStatus:
        return "cleaned_up"


def _present(conn: psycopg.Connection) -> list[str]:
    return [t for t in PRECEDENCE if relation_exists(conn, sql.Identifier(t).as_string(conn))]


def cutover(conn: psycopg.Connection, *, lock_timeout_ms: int = 2000, attempts: int = 30,
            settings: Settings | None = None) -> CutoverResult:
    """Move the application off the legacy tables: last changes applied, tables read-only, capture removed.

    Raises:
        MigrationError: the migration has not given every row an outcome yet (run ``migrate`` first).
        LockBusy: the tables stayed locked through every attempt (nothing changed).
    """
    started = time.monotonic()
    result = CutoverResult()
    with locks.hold(conn, "cutover"), maintenance(conn):
        chosen = settings or settings_of_last_run(conn)
        result.tables = [t for t in _present(conn) if t in capturing(conn) or not _is_cut_over(conn, t)]
        if not result.tables:
            raise CleanupRefused("nothing to cut over: no legacy table is left that is not cut over already")
        result.before_lock = catch_up(conn, chosen)
        _require_migrated(conn, result.tables)

        def work() -> None:
            result.attempts += 1
            locked = time.monotonic()
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(
                sql.SQL(", ").join(map(sql.Identifier, result.tables))))
            result.under_lock = catch_up(conn, Settings(chosen.source_timezone, chosen.expiry, run_id=chosen.run_id))
            for table in result.tables:
                conn.execute("SELECT memory_migration_read_only_on(%s::regclass)", [table])
            stop_capture(conn, result.tables)
            _record(conn, result.tables, result.before_lock.changes + result.under_lock.changes)
            result.locked_seconds = time.monotonic() - locked

        retry_locked(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=attempts)
    result.seconds = time.monotonic() - started
    log.info("cutover tables=%s locked_seconds=%.3f attempts=%d", ",".join(result.tables), result.locked_seconds,
             result.attempts)
    return result


def _is_cut_over(conn: psycopg.Connection, table: str) -> bool:
    return bool(scalar(conn, "SELECT EXISTS (SELECT 1 FROM memory_migration_live WHERE source_table = %s "
                             "AND cutover_at IS NOT NULL)", [table]))


def _require_migrated(conn: psycopg.Connection, tables: list[str]) -> None:
    missing = []
    for table in tables:
        found = detect(conn, table)
        if found is not None and account(conn, table, found.shape).unaccounted:
            missing.append(table)
    if missing:
        raise MigrationError(f"{', '.join(missing)}: rows without an outcome; run `unified-memory migrate` first")


def _record(conn: psycopg.Connection, tables: list[str], changes: int) -> None:
    conn.execute("INSERT INTO memory_migration_live (source_table, cutover_at) SELECT t, now() "
                 "FROM unnest(%s::text[]) t ON CONFLICT (source_table) DO UPDATE SET cutover_at = now()", [tables])
    conn.execute("INSERT INTO memory_migration_live_log (action, tables, detail) VALUES ('cutover', %s, "
                 "jsonb_build_object('changes_applied', %s::int))", [tables, changes])


# ------------------------------------------------------------------------------------------------ cleanup
def cleanup(conn: psycopg.Connection, path: Path, *, secret: bytes | None = None, yes: bool = False,
            lock_timeout_ms: int = 5000, attempts: int = 10) -> CleanupResult:
    """Write and verify a final backup of the cut-over legacy tables, then drop them.

    Raises:
        CleanupRefused: no ``yes``, a table not cut over, the last migration or validation not successful,
            or other objects still depend on a legacy table; nothing was changed.
    """
    if not yes:
        raise CleanupNotConfirmed("cleanup drops the legacy tables", note="a final backup is written first")
    started = time.monotonic()
    with locks.hold(conn, "cleanup"):
        with maintenance(conn):
            tables = _present(conn)
            _preconditions(conn, tables)
        _require_validation(conn)
        manifest = backups.backup(conn, path, secret=secret, tables=tuple(tables))
        verified = backups.verify(path, secret=secret)
        result = CleanupResult(str(path))

        def work() -> None:
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.SQL(", ").join(map(sql.Identifier, tables))))
            for table in tables:
                rows = int(scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))))
                if table not in verified.tables or verified.tables[table].rows != rows:
                    raise CleanupRefused(f"{table} changed after the final backup; nothing was dropped")
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
                result.tables[table] = rows
            conn.execute("UPDATE memory_migration_live SET cleaned_at = now(), final_backup = %s "
                         "WHERE source_table = ANY(%s)", [path.name, tables])
            conn.execute("INSERT INTO memory_migration_live_log (action, tables, detail) VALUES ('cleanup', %s, "
                         "jsonb_build_object('final_backup', %s::text))", [tables, path.name])

        with maintenance(conn):
            retry_locked(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=attempts)
    result.seconds = time.monotonic() - started
    log.info("cleanup dropped=%s final_backup=%s rows=%s", ",".join(tables), path.name,
             {t: e.rows for t, e in manifest.tables.items()})
    return result


def _preconditions(conn: psycopg.Connection, tables: list[str]) -> None:
    if not tables:
        raise CleanupRefused("no legacy table is left to clean up")
    not_cut = [t for t in tables if not _is_cut_over(conn, t)]
    if not_cut:
        raise CleanupRefused(f"{', '.join(not_cut)} not cut over: run `unified-memory cutover` first")
    last = scalar(conn, "SELECT status FROM memory_migration_runs WHERE status <> 'rolled_back' "
                        "ORDER BY run_id DESC LIMIT 1")
    if last not in RUN_OK:
        raise CleanupRefused(f"the last migration run is {last or 'missing'}, not succeeded")
    _require_validation(conn)
    dependents = _dependents(conn, tables)
    if dependents:
        raise CleanupRefused("other objects depend on the legacy tables (" + ", ".join(dependents[:10]) +
                             "): move or drop them first; nothing was changed")


def _require_validation(conn: psycopg.Connection) -> None:
    """The last validation (issue 16's ledger when present, else one run now) passed after the cutover."""
    if relation_exists(conn, "memory_validation_runs"):
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute("SELECT status, started_at >= (SELECT max(cutover_at) FROM memory_migration_live) "
                              "AS after_cutover FROM memory_validation_runs ORDER BY run_id DESC LIMIT 1").fetchone()
        if not row or row["status"] != "passed" or not row["after_cutover"]:
            raise CleanupRefused("the last validation did not pass after the cutover: run `unified-memory validate`")
        return
    from .validate import validate

    report = validate(conn)
    if report.status == FAIL:
        raise CleanupRefused("validation failed: " + ", ".join(c.name for c in report.failed()[:10]))


def _dependents(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """Views, and foreign keys of other tables, that a plain DROP TABLE of ``tables`` would refuse."""
    return [str(name) for name in first_column(
        conn, "SELECT DISTINCT coalesce(v.oid::regclass::text, c.conname || ' on ' || c.conrelid::regclass::text) "
        "FROM pg_depend d LEFT JOIN pg_rewrite w ON w.oid = d.objid AND d.classid = 'pg_rewrite'::regclass "
        "LEFT JOIN pg_class v ON v.oid = w.ev_class "
        "LEFT JOIN pg_constraint c ON c.oid = d.objid AND d.classid = 'pg_constraint'::regclass "
        "WHERE d.refobjid = ANY(%s::regclass[]) AND d.deptype = 'n' "
        "AND (v.oid IS NOT NULL AND v.oid <> ALL(%s::regclass[]) "
        "     OR c.oid IS NOT NULL AND c.conrelid <> ALL(%s::regclass[])) ORDER BY 1", [tables, tables, tables])]


# ------------------------------------------------------------------------------------------------ undo
def undo(conn: psycopg.Connection, tables: list[str]) -> int:
    """Undo capture and cutover for ``tables`` (inside the rollback's transaction): triggers off, log cleared."""
    if not relation_exists(conn, "memory_migration_live"):
        return 0
    present = [t for t in tables if relation_exists(conn, sql.Identifier(t).as_string(conn))]
    for table in present:
        conn.execute("SELECT memory_migration_read_only_off(%s::regclass)", [table])
    stopped = stop_capture(conn, present)
    conn.execute("DELETE FROM memory_migration_changes WHERE source_table = ANY(%s)", [tables])
    conn.execute("DELETE FROM memory_migration_conflicts WHERE source_table = ANY(%s)", [tables])
    conn.execute("DELETE FROM memory_migration_live WHERE source_table = ANY(%s)", [tables])
    conn.execute("INSERT INTO memory_migration_live_log (action, tables) VALUES ('rollback', %s)", [tables])
    return len(stopped)
