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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import privileges
from .backup import DETERMINISTIC_SESSION, TableBackup, copy_digest, copy_sql, tables_data, verify
from .db import maintenance, relation_exists, scalar
from .errors import RollbackError, translate

log = logging.getLogger("unified_memory.rollback")

STAGE = "unified_memory_rollback_stage"
SAVED = "unified_memory_rollback_saved"
_TYPE = re.compile(r"^[a-z][a-z0-9_ ]*(\(\d+(,\s*\d+)?\))?( with(out)? time zone)?(\[\])*$")
_INDEX = re.compile(r"^CREATE (UNIQUE )?INDEX [a-z0-9_\"]+ ON [a-z0-9_\".]+ USING ", re.IGNORECASE)

# count and an order-independent checksum of whole rows: the sum of a 64-bit slice of each row's md5
ROW_CHECKSUM = ("SELECT count(*), coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint::numeric), 0)::text "
                "FROM {} t")
_COUNT_CHANGED = ("SELECT count(*) FROM memories WHERE source_table = ANY(%(tables)s) "
                  "AND (version > 1 OR deleted_at IS NOT NULL)")
_DELETE_MIGRATED = "DELETE FROM memories WHERE source_table = ANY(%(tables)s)"
_DELETE_UNCHANGED = ("DELETE FROM memories WHERE source_table = ANY(%(tables)s) "
                     "AND version = 1 AND deleted_at IS NULL")


@dataclass
class TableRestore:
    """What the rollback did (or would do) to one legacy table."""

    table: str
    action: str  # restored (it was gone) | replaced (it had changed) | unchanged
    rows: int
    rows_added_since: int = 0
    rows_missing_since: int = 0
    kept_new_rows: int = 0
    saved_as: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "rows": self.rows, "rows_added_since": self.rows_added_since,
                "rows_missing_since": self.rows_missing_since, "kept_new_rows": self.kept_new_rows,
                "saved_as": self.saved_as}


@dataclass
class RollbackResult:
    """The rollback's plan or outcome."""

    backup: str
    dry_run: bool
    tables: dict[str, TableRestore] = field(default_factory=dict)
    memories_removed: int = 0
    memories_kept_changed: int = 0
    quarantine_cleared: int = 0
    checkpoints_cleared: int = 0
    runs_marked: int = 0
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "planned" if self.dry_run else "rolled_back"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "backup": self.backup, "dry_run": self.dry_run,
                "tables": {t: r.to_dict() for t, r in self.tables.items()},
                "memories_removed": self.memories_removed, "memories_kept_changed": self.memories_kept_changed,
                "quarantine_cleared": self.quarantine_cleared, "checkpoints_cleared": self.checkpoints_cleared,
                "runs_marked_rolled_back": self.runs_marked, "seconds": round(self.seconds, 3)}


def rollback(conn: psycopg.Connection, path: Path, *, secret: bytes | None = None, dry_run: bool = False,
             yes: bool = False, force: bool = False, discard_new_rows: bool = False,
             lock_timeout_ms: int = 5000) -> RollbackResult:
    """Restore the legacy tables of the backup at ``path`` and remove the migrated memories.

    ``force`` also removes migrated memories changed since the migration (kept and reported otherwise).

    Raises:
        BackupIntegrityError / BackupKeyError: the backup is not intact; the database was not touched.
        RollbackError: refused (no ``yes``) or a restored table does not match its manifest.
    """
    started = time.monotonic()
    manifest = verify(path, secret=secret)
    if not dry_run and not yes:
        raise RollbackError("the rollback changes the database: pass --yes to proceed, or --dry-run for the plan")
    if not conn.autocommit:
        raise RollbackError("rollback needs an autocommit connection: it owns its transaction")
    result = RollbackResult(str(path), dry_run)
    tables = list(manifest.tables.values())
    try:
        with maintenance(conn), conn.transaction(force_rollback=dry_run):
            privileges.require(conn, "rollback")
            conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{lock_timeout_ms}ms"])
            conn.execute("SET LOCAL synchronize_seqscans = off")  # read staged rows back in their load order
            for statement in DETERMINISTIC_SESSION:
                conn.execute(statement)
            _stage(conn, path, tables, secret)
            for entry in tables:
                result.tables[entry.table] = _switch(conn, entry, discard_new_rows=discard_new_rows)
            for entry in tables:
                if result.tables[entry.table].action != "unchanged":
                    _add_constraints_and_indexes(conn, entry)
            conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(STAGE)))
            _undo_unified_side(conn, result, [t.table for t in tables], force=force)
    except psycopg.Error as exc:
        raise translate(exc, "rollback (nothing was changed)") from exc
    result.seconds = time.monotonic() - started
    log.info("rollback dry_run=%s tables=%d memories_removed=%d kept_changed=%d", dry_run, len(tables),
             result.memories_removed, result.memories_kept_changed)
    return result


def _stage(conn: psycopg.Connection, path: Path, tables: list[TableBackup], secret: bytes | None) -> None:
    """Restore every table into the staging schema and prove it equals the manifest."""
    if conn.execute("SELECT to_regnamespace(%s)", [STAGE]).fetchone() != (None,):
        raise RollbackError(f"schema {STAGE} exists: another rollback left it; inspect and drop it first")
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(STAGE)))
    by_name = {entry.table: entry for entry in tables}
    for entry in tables:
        _ensure_types(conn, entry)
        conn.execute(_create_table(entry))
    for table, blocks in tables_data(path, secret=secret):
        entry = by_name[table]
        copy_in = copy_sql(sql.Identifier(STAGE, entry.table), entry.column_names, entry.copy_format, "FROM STDIN")
        with conn.cursor() as cur, cur.copy(copy_in) as copy:
            for block in blocks:
                copy.write(block)
    # COPY into a table created in this transaction skips the free space map, so heap order is load order and
    # an exact restore reads back byte for byte; anything else fails the proof (a refusal, never a loss).
    for entry in tables:
        staged = copy_digest(conn, sql.Identifier(STAGE, entry.table), entry.column_names, entry.copy_format)
        if staged != (entry.rows, entry.bytes, entry.sha256):
            raise RollbackError(f"{entry.table}: the restored rows do not read back to the backup's SHA-256")


def row_checksum(conn: psycopg.Connection, table: sql.Identifier) -> tuple[int, str]:
    """(rows, order-independent checksum of all columns) of a table, computed in SQL."""
    row = conn.execute(sql.SQL(ROW_CHECKSUM).format(table)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def _create_table(entry: TableBackup) -> sql.Composed:
    parts = []
    for column in entry.definition["columns"]:
        if not _TYPE.match(column["type"]):
            raise RollbackError(f"{entry.table}.{column['name']}: unexpected type {column['type']!r} in the backup")
        piece = sql.SQL("{} {}").format(sql.Identifier(column["name"]), sql.SQL(column["type"]))
        if column["default"] is not None:
            piece = sql.SQL("{} DEFAULT {}").format(piece, sql.SQL(_fragment(column["default"])))
        if column["not_null"]:
            piece = sql.SQL("{} NOT NULL").format(piece)
        parts.append(piece)
    return sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(STAGE, entry.table), sql.SQL(", ").join(parts))


def _fragment(text: str) -> str:
    """A default, constraint or index definition read back from a verified backup: one expression only."""
    if ";" in text.replace("';'", ""):
        raise RollbackError("the backup holds a definition with a statement separator; refusing it")
    return text


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
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged, sql.Identifier(here)))
        return TableRestore(entry.table, "restored", entry.rows)
    if row_checksum(conn, live) == row_checksum(conn, staged):
        conn.execute(sql.SQL("DROP TABLE {}").format(staged))
        return TableRestore(entry.table, "unchanged", entry.rows)
    columns = sql.SQL(", ").join(map(sql.Identifier, entry.column_names))
    added = _count_except(conn, live, staged, columns)
    missing = _count_except(conn, staged, live, columns)
    saved_name = _saved_name(conn, entry.table)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SAVED)))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(live, sql.Identifier(SAVED)))
    if saved_name != entry.table:
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(SAVED, entry.table),
                                                                   sql.Identifier(saved_name)))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged, sql.Identifier(here)))
    kept = 0
    if added and not discard_new_rows:
        kept = conn.execute(sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s} EXCEPT ALL SELECT {c} FROM {t}").format(
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


def _add_constraints_and_indexes(conn: psycopg.Connection, entry: TableBackup) -> None:
    live = sql.Identifier(entry.table)
    for constraint in entry.definition["constraints"]:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            live, sql.Identifier(constraint["name"]), sql.SQL(_fragment(constraint["definition"]))))
    for index in entry.definition["indexes"]:
        if not _INDEX.match(index["definition"]):
            raise RollbackError(f"{entry.table}: unexpected index definition in the backup")
        conn.execute(sql.SQL(_fragment(index["definition"])))


def _undo_unified_side(conn: psycopg.Connection, result: RollbackResult, tables: list[str], *, force: bool) -> None:
    """Delete the memories the migration created (by provenance), its quarantine and checkpoints."""
    if not relation_exists(conn, "memory_migration_runs"):
        return
    params = {"tables": tables}
    changed = conn.execute(_COUNT_CHANGED, params).fetchone()
    result.memories_kept_changed = 0 if force else int(changed[0]) if changed else 0
    result.memories_removed = conn.execute(_DELETE_MIGRATED if force else _DELETE_UNCHANGED, params).rowcount
    result.quarantine_cleared = conn.execute(
        "DELETE FROM memory_migration_quarantine WHERE source_table = ANY(%(tables)s)", params).rowcount
    result.checkpoints_cleared = conn.execute(
        "DELETE FROM memory_migration_checkpoints WHERE source_table = ANY(%(tables)s)", params).rowcount
    result.runs_marked = conn.execute(
        "UPDATE memory_migration_runs SET status = 'rolled_back' WHERE status <> 'rolled_back'").rowcount
