"""Rollback: put the legacy tables back exactly as the backup holds them, and take out what the migration added.

Nothing is destroyed before its replacement is proven. The backup is verified completely first (no database
needed). Then one transaction restores every table into a staging schema, reads each back (COPY in the
backup's format) to the manifest's row count and SHA-256, and only then switches: a legacy table that still
exists is moved aside to ``unified_memory_rollback_saved`` (never dropped; rows added since the backup are
carried over unless ``discard_new_rows``), the restored one takes its place, and the memories the migration
created are deleted by provenance. Any failure, or a SIGKILL, aborts the transaction and leaves the database
as it was. A dry run is the same transaction, rolled back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import psycopg
from psycopg import sql

from . import cutover, locks, privileges, restore
from .backup import (
    DETERMINISTIC_SESSION,
    BackupManifest,
    TableBackup,
    copy_digest,
    copy_sql,
    identity,
    tables_data,
    verify,
)
from .checks import SECONDS, RollbackStatus, Serialised, json_field
from .db import maintenance, one_row, relation_exists, scalar
from .errors import RollbackError, RollbackNotConfirmed, flag, redacted_message, translate

log = logging.getLogger("unified_memory.rollback")

STAGE = "unified_memory_rollback_stage"
SAVED = "unified_memory_rollback_saved"

# count and an order-independent checksum of whole rows: the sum of a 64-bit slice of each row's md5
ROW_CHECKSUM = ("SELECT count(*) AS rows, "
                "coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint::numeric), 0)::text AS checksum "
                "FROM {} t")
# changed since the migration: a version above the one the migration last wrote (catch-up's own edits and
# soft-deletes are recorded in memory_migration_synced, 020); without 020, any edit or soft delete
_CHANGED = {True: "version > coalesce((SELECT s.version FROM memory_migration_synced s WHERE s.memory_id = id), 1)",
            False: "(version > 1 OR deleted_at IS NOT NULL)"}
_COUNT_CHANGED = "SELECT count(*) FROM memories WHERE source_table = ANY(%(tables)s) AND {changed}"
_DELETE_MIGRATED = "DELETE FROM memories WHERE source_table = ANY(%(tables)s)"
_DELETE_UNCHANGED = "DELETE FROM memories WHERE source_table = ANY(%(tables)s) AND NOT {changed}"


RestoreAction = Literal["restored", "replaced", "unchanged", "kept"]


@dataclass
class TableRestore(Serialised):
    """What the rollback did (or would do) to one legacy table."""

    table: str = field(metadata=json_field(omit=True))
    action: RestoreAction  # restored (was gone) | replaced (on request, it had changed) | unchanged | kept (live rows)
    rows: int
    rows_added_since: int = 0
    rows_missing_since: int = 0
    kept_new_rows: int = 0
    saved_as: str | None = None


@dataclass
class RollbackResult(Serialised):
    """The rollback's plan or outcome."""

    json_derived: ClassVar[dict[str, str]] = {"status": "status"}
    json_order: ClassVar[tuple[str, ...]] = ("status",)

    backup: str
    dry_run: bool
    tables: dict[str, TableRestore] = field(default_factory=dict)
    memories_removed: int = 0
    memories_kept_changed: int = 0
    quarantine_cleared: int = 0
    checkpoints_cleared: int = 0
    runs_marked: int = field(default=0, metadata=json_field(key="runs_marked_rolled_back"))
    seconds: float = field(default=0.0, metadata=SECONDS)

    @property
    def status(self) -> RollbackStatus:
        return "planned" if self.dry_run else "rolled_back"


def rollback(conn: psycopg.Connection, path: Path, *, secret: bytes | None = None, dry_run: bool = False,
             yes: bool = False, force: bool = False, discard_new_rows: bool = False,
             replace_tables: bool = False, lock_timeout_ms: int = 5000, lock_wait: float = locks.DEFAULT_WAIT,
             into_other_database: bool = False) -> RollbackResult:
    """Restore the legacy tables of the backup at ``path`` and remove the migrated memories.

    ``force`` also removes migrated memories changed since the migration (kept and reported otherwise).
    A legacy table that still exists holds the application's newest rows and is kept as it is; only tables
    that are gone are restored, unless ``replace_tables`` (the live table is then saved aside). Change
    capture and the cutover's read-only guard are undone. A backup of another database (cluster system
    identifier, database OID) is refused unless ``into_other_database``.

    Raises:
        BackupIntegrityError / BackupKeyError: the backup is not intact; the database was not touched.
        RollbackError: refused (no ``yes``) or a restored table does not match its manifest.
        LockBusy: a migration, backup, schema change or another rollback still held the lock after ``lock_wait``.
    """
    started = time.monotonic()
    manifest = verify(path, secret=secret)
    if not dry_run and not yes:
        raise RollbackNotConfirmed("the rollback changes the database", alternative="dry_run")
    if not conn.autocommit:
        raise RollbackError("rollback needs an autocommit connection: it owns its transaction")
    _check_identity(conn, manifest, into_other_database)
    result = RollbackResult(str(path), dry_run)
    tables = list(manifest.tables.values())
    try:
        with locks.hold(conn, "rollback", lock_wait), maintenance(conn), conn.transaction(force_rollback=dry_run):
            _prepare(conn, lock_timeout_ms)
            restore = [e for e in tables if replace_tables or not relation_exists(conn, _name(conn, e.table))]
            _stage(conn, path, restore, secret)
            for entry in tables:
                result.tables[entry.table] = (_switch(conn, entry, discard_new_rows=discard_new_rows)
                                              if entry in restore else _kept(conn, entry))
            for entry in restore:
                if result.tables[entry.table].action != "unchanged":
                    _add_constraints_and_indexes(conn, entry)
            conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(STAGE)))
            _undo_unified_side(conn, result, [t.table for t in tables], force=force)
    except psycopg.errors.InsufficientPrivilege as exc:  # e.g. a forged expression the restore role may not run
        raise RollbackError(f"rollback refused (nothing was changed): [42501] {redacted_message(exc)}") from exc
    except psycopg.Error as exc:
        raise translate(exc, "rollback (nothing was changed)") from exc
    result.seconds = time.monotonic() - started
    log.info("rollback dry_run=%s tables=%d memories_removed=%d kept_changed=%d", dry_run, len(tables),
             result.memories_removed, result.memories_kept_changed)
    return result


def _prepare(conn: psycopg.Connection, lock_timeout_ms: int) -> None:
    """The privileges the rollback needs, and its transaction's settings."""
    privileges.require(conn, "rollback")
    conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{lock_timeout_ms}ms"])
    conn.execute("SET LOCAL synchronize_seqscans = off")  # read staged rows back in their load order
    for statement in DETERMINISTIC_SESSION:
        conn.execute(statement)


def _check_identity(conn: psycopg.Connection, manifest: BackupManifest, into_other_database: bool) -> None:
    here = identity(conn)
    differences = manifest.identity.differences(here)
    if differences and not into_other_database:
        raise RollbackError(f"this backup is of another database ({'; '.join(differences)}): refusing to restore "
                            f"it into {here.database!r}; nothing was changed. Pass {flag('into_other_database')} to "
                            "do so on purpose")
    if differences:
        log.warning("restoring a backup of another database on purpose: %s", "; ".join(differences))


def _stage(conn: psycopg.Connection, path: Path, tables: list[TableBackup], secret: bytes | None) -> None:
    """Restore every table into the staging schema and prove it equals the manifest."""
    if scalar(conn, "SELECT to_regnamespace(%s)", [STAGE]) is not None:
        raise RollbackError(f"schema {STAGE} exists: another rollback left it; inspect and drop it first")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(STAGE)))
    restore.prepare(conn, STAGE)
    by_name = {entry.table: entry for entry in tables}
    for entry in tables:
        _ensure_types(conn, entry)
        restore.create_table(conn, sql.Identifier(STAGE, entry.table), entry.definition["columns"])
    for table, blocks in tables_data(path, secret=secret):
        if table not in by_name:  # kept live: its rows are read (the backup is proven whole) but not restored
            for _ in blocks:
                pass
            continue
        entry = by_name[table]
        copy_in = copy_sql(sql.Identifier(STAGE, entry.table), entry.column_names, entry.copy_format, "FROM STDIN")
        with restore.restricted(conn), conn.cursor() as cur, cur.copy(copy_in) as copy:
            for block in blocks:
                copy.write(block)
    # COPY into a table created in this transaction skips the free space map, so heap order is load order and
    # an exact restore reads back byte for byte; anything else fails the proof (a refusal, never a loss).
    for entry in tables:
        staged = copy_digest(conn, sql.Identifier(STAGE, entry.table), entry.column_names, entry.copy_format)
        if staged != (entry.rows, entry.bytes, entry.sha256):
            raise RollbackError(f"{entry.table}: the restored rows do not read back to the backup's SHA-256")


def _name(conn: psycopg.Connection, table: str) -> str:
    return sql.Identifier(table).as_string(conn)


def _kept(conn: psycopg.Connection, entry: TableBackup) -> TableRestore:
    """A legacy table that still exists: the application's current rows are the newest truth."""
    rows = int(scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(entry.table))))
    return TableRestore(entry.table, "kept", rows)


def row_checksum(conn: psycopg.Connection, table: sql.Identifier) -> tuple[int, str]:
    """(rows, order-independent checksum of all columns) of a table, computed in SQL."""
    row = one_row(conn, sql.SQL(ROW_CHECKSUM).format(table))
    assert row is not None
    return int(row["rows"]), str(row["checksum"])


def _ensure_types(conn: psycopg.Connection, entry: TableBackup) -> None:
    if any(c["type"].startswith("vector") for c in entry.definition["columns"]):
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is None:
            raise RollbackError(f"{entry.table} has pgvector columns but this server has no pgvector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def _switch(conn: psycopg.Connection, entry: TableBackup, *, discard_new_rows: bool) -> TableRestore:
    """Put the staged table in place; a live table that differs is moved aside, never dropped."""
    here = str(scalar(conn, "SELECT current_schema()"))
    if entry.definition["schema"] != here:
        raise RollbackError(f"{entry.table} was backed up from schema {entry.definition['schema']}, not {here}")
    staged, live = sql.Identifier(STAGE, entry.table), sql.Identifier(entry.table)
    if not relation_exists(conn, sql.Identifier(entry.table).as_string(conn)):
        _build_in_stage(conn, entry)
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged, sql.Identifier(here)))
        return TableRestore(entry.table, "restored", entry.rows)
    if row_checksum(conn, live) == row_checksum(conn, staged):
        conn.execute(sql.SQL("DROP TABLE {}").format(staged))
        return TableRestore(entry.table, "unchanged", entry.rows)
    columns = sql.SQL(", ").join(map(sql.Identifier, entry.column_names))
    added = _count_except(conn, live, staged, columns)
    missing = _count_except(conn, staged, live, columns)
    _build_in_stage(conn, entry)
    saved_name = _saved_name(conn, entry.table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SAVED)))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(live, sql.Identifier(SAVED)))
    if saved_name != entry.table:
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(SAVED, entry.table),
                                                                   sql.Identifier(saved_name)))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged, sql.Identifier(here)))
    kept = 0
    if added and not discard_new_rows:
        kept = conn.execute(sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s} EXCEPT ALL SELECT {c} FROM {t} "
                                        "ON CONFLICT DO NOTHING").format(
            t=live, c=columns, s=sql.Identifier(SAVED, saved_name))).rowcount
    return TableRestore(entry.table, "replaced", entry.rows, added, missing, kept, f"{SAVED}.{saved_name}")


def _count_except(conn: psycopg.Connection, a: sql.Identifier, b: sql.Identifier, columns: sql.Composable) -> int:
    return int(scalar(conn, sql.SQL("SELECT count(*) FROM (SELECT {c} FROM {a} EXCEPT ALL SELECT {c} FROM {b}) d")
                      .format(a=a, b=b, c=columns)))


def _saved_name(conn: psycopg.Connection, table: str) -> str:
    name, n = table, 1
    while relation_exists(conn, sql.Identifier(SAVED, name).as_string(conn)):
        name, n = f"{table}_{n}", n + 1
    return name


def _build_in_stage(conn: psycopg.Connection, entry: TableBackup) -> None:
    """Constraints and indexes on the staged table, as the restore role, proven before any row is added to it."""
    staged = sql.Identifier(STAGE, entry.table)
    restore.add_constraints_and_indexes(conn, staged, entry.definition)
    restore.refuse_privileged_calls(conn, staged)


def _add_constraints_and_indexes(conn: psycopg.Connection, entry: TableBackup) -> None:
    """Foreign keys once every table is in place; then prove the table and hand it to the caller's role."""
    live, owner = sql.Identifier(entry.table), str(scalar(conn, "SELECT current_user"))
    restore.add_foreign_keys(conn, live, entry.definition)
    restore.prove_and_hand_over(conn, live, entry.definition["columns"], entry.definition, owner=owner)


def _undo_unified_side(conn: psycopg.Connection, result: RollbackResult, tables: list[str], *, force: bool) -> None:
    """Delete the memories the migration created (by provenance), its quarantine and checkpoints."""
    if not relation_exists(conn, "memory_migration_runs"):
        return
    params = {"tables": tables}
    predicate = _CHANGED[relation_exists(conn, "memory_migration_synced")]
    changed = scalar(conn, sql.SQL(_COUNT_CHANGED).format(changed=sql.SQL(predicate)), params)
    result.memories_kept_changed = 0 if force else int(changed or 0)
    delete = sql.SQL(_DELETE_MIGRATED if force else _DELETE_UNCHANGED).format(changed=sql.SQL(predicate))
    result.memories_removed = conn.execute(delete, params).rowcount
    cutover.undo(conn, tables)
    result.quarantine_cleared = conn.execute(
        "DELETE FROM memory_migration_quarantine WHERE source_table = ANY(%(tables)s)", params).rowcount
    result.checkpoints_cleared = conn.execute(
        "DELETE FROM memory_migration_checkpoints WHERE source_table = ANY(%(tables)s)", params).rowcount
    result.runs_marked = conn.execute(
        "UPDATE memory_migration_runs SET status = 'rolled_back' WHERE status <> 'rolled_back'").rowcount
