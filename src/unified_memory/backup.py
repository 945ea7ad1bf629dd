"""Backup: the legacy tables, definition and rows, in one verified file, taken before any change.

Each table is read with ``COPY ... TO STDOUT`` inside one REPEATABLE READ snapshot and streamed through
zstd (and AES-256-GCM when a key is set) to disk: the client's memory stays flat whatever the size. The
manifest holds each table's definition, row count, SHA-256 of its data and an order-independent row
checksum computed in SQL, which the rollback compares after restoring. ``verify`` needs no database.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import __version__
from .backupfile import BackupWriter, Record, read_records
from .db import relation_exists, scalar
from .errors import BackupIntegrityError, ConfigError
from .shapes import LEGACY_TABLES, table_columns

log = logging.getLogger("unified_memory.backup")

BACKUP_PREFIX = "memory_migration_backup_"
BACKUP_SUFFIX = ".umbk"
RECORD_BYTES = 1 << 20

# Text output that does not depend on the session: the checksums of backup and rollback must agree.
DETERMINISTIC_SESSION = (
    "SET LOCAL TimeZone = 'UTC'", "SET LOCAL DateStyle = 'ISO, YMD'", "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL extra_float_digits = 1", "SET LOCAL bytea_output = 'hex'",
)

# count and an order-independent checksum of whole rows: the sum of a 64-bit slice of each row's md5
ROW_CHECKSUM = ("SELECT count(*), coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint::numeric), 0)::text "
                "FROM {} t")

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""
_CONSTRAINTS = """
SELECT conname, contype::text, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'c', 'f', 'x') ORDER BY contype <> 'p', conname"""
_INDEXES = """
SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = %s::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid)
ORDER BY c.relname"""
_UNIFIED_STATE = """
SELECT (SELECT count(*) FROM memories WHERE source_table IS NOT NULL),
       (SELECT count(*) FROM memories),
       (SELECT max(run_id) FROM memory_migration_runs)"""


@dataclass
class TableBackup:
    """One legacy table in a backup: its definition and what its data must check to."""

    table: str
    definition: dict[str, Any]
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    row_checksum: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "definition": self.definition, "rows": self.rows, "bytes": self.bytes,
                "sha256": self.sha256, "row_checksum": self.row_checksum}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableBackup:
        return cls(data["table"], data["definition"], int(data["rows"]), int(data["bytes"]), data["sha256"],
                   data["row_checksum"])


@dataclass
class BackupManifest:
    """What a backup holds: where it came from, and each table with its checksums."""

    path: Path
    created_at: str
    server_version: str
    database: str
    tool_version: str
    encrypted: bool
    unified: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, TableBackup] = field(default_factory=dict)
    seconds: float = 0.0
    file_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "created_at": self.created_at, "server_version": self.server_version,
                "database": self.database, "tool_version": self.tool_version, "encrypted": self.encrypted,
                "unified": self.unified, "file_bytes": self.file_bytes, "seconds": round(self.seconds, 3),
                "tables": {t: {k: v for k, v in b.to_dict().items() if k != "definition"}
                           for t, b in self.tables.items()}}


def default_path(directory: Path, now: datetime | None = None) -> Path:
    """``memory_migration_backup_YYYYMMDD_HHMMSS.umbk`` (UTC) in ``directory`` (created 0700)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")
    path = directory / f"{BACKUP_PREFIX}{stamp}{BACKUP_SUFFIX}"
    n = 1
    while path.exists():
        path, n = directory / f"{BACKUP_PREFIX}{stamp}_{n}{BACKUP_SUFFIX}", n + 1
    return path


@contextmanager
def snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """A read-only REPEATABLE READ transaction with deterministic text output."""
    if not conn.autocommit:
        raise ConfigError("backup needs an autocommit connection: it opens its own snapshot transaction")
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        for statement in DETERMINISTIC_SESSION:
            conn.execute(statement)
        yield
    finally:
        conn.execute("ROLLBACK")


def backup(conn: psycopg.Connection, path: Path, *, secret: bytes | None = None,
           tables: tuple[str, ...] = LEGACY_TABLES) -> BackupManifest:
    """Write every present legacy table of ``conn``'s database to ``path`` and return the manifest.

    The SQL row checksums are computed on a second connection that shares the snapshot (as ``pg_dump -j``
    does), while this one streams the data; where a second connection cannot be opened, they run here after.

    Raises:
        ConfigError: the connection is not in autocommit mode.
    """
    started = time.monotonic()
    writer = BackupWriter(path, secret=secret)
    try:
        with snapshot(conn), ThreadPoolExecutor(max_workers=1) as helper:
            manifest = _header(conn, path, encrypted=secret is not None)
            present = [t for t in tables if table_columns(conn, t)]
            exported = str(scalar(conn, "SELECT pg_export_snapshot()"))
            checksums = helper.submit(_checksums_in_snapshot, conn, exported, present)
            writer.json(b"H", _manifest_dict(manifest))
            for table in present:
                manifest.tables[table] = _write_table(conn, writer, table)
            sums = checksums.result() or {t: row_checksum(conn, t) for t in present}
            for table, (rows, checksum) in sums.items():
                entry = manifest.tables[table]
                if rows != entry.rows:
                    raise BackupIntegrityError(f"{table}: COPY gave {entry.rows} rows but the table holds {rows}")
                entry.row_checksum = checksum
                writer.json(b"E", {k: v for k, v in entry.to_dict().items() if k != "definition"})
        manifest.seconds = time.monotonic() - started
        writer.json(b"M", _manifest_dict(manifest))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    manifest.file_bytes = path.stat().st_size
    log.info("backup file=%s tables=%d bytes=%d seconds=%.2f", path.name, len(manifest.tables),
             manifest.file_bytes, manifest.seconds)
    return manifest


def _checksums_in_snapshot(conn: psycopg.Connection, exported: str,
                           tables: list[str]) -> dict[str, tuple[int, str]] | None:
    """Row checksums of ``tables`` on a second connection in the exported snapshot; None if it cannot connect."""
    try:
        helper = psycopg.connect(conn.info.dsn, password=conn.info.password or None, autocommit=True,
                                 application_name="unified-memory backup checksums")
    except psycopg.OperationalError:
        return None
    with helper:
        helper.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        helper.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(exported)))
        helper.execute("SELECT set_config('row_security', 'off', true)")
        for statement in DETERMINISTIC_SESSION:
            helper.execute(statement)
        return {t: row_checksum(helper, t) for t in tables}


def _header(conn: psycopg.Connection, path: Path, *, encrypted: bool) -> BackupManifest:
    row = conn.execute("SELECT current_setting('server_version'), current_database()").fetchone()
    assert row is not None
    unified: dict[str, Any] = {"schema_applied": relation_exists(conn, "memory_migration_runs")}
    if unified["schema_applied"]:
        state = conn.execute(_UNIFIED_STATE).fetchone()
        assert state is not None
        unified.update(memories_with_provenance=int(state[0]), memories=int(state[1]), last_run_id=state[2])
    unified["undo"] = "delete memories by provenance (source_table, source_key); clear quarantine and checkpoints"
    return BackupManifest(path, datetime.now(UTC).isoformat(), str(row[0]), str(row[1]), __version__, encrypted,
                          unified)


def definition(conn: psycopg.Connection, table: str) -> dict[str, Any]:
    """Columns (name, type, not null, default), constraints and indexes of ``table``."""
    name = sql.Identifier(table).as_string(conn)
    return {
        "schema": str(scalar(conn, "SELECT current_schema()")),
        "columns": [{"name": n, "type": t, "not_null": nn, "default": d}
                    for n, t, nn, d in conn.execute(_COLUMNS, [name])],
        "constraints": [{"name": n, "type": t, "definition": d} for n, t, d in conn.execute(_CONSTRAINTS, [name])],
        "indexes": [{"name": n, "definition": d} for n, d in conn.execute(_INDEXES, [name])],
    }


def row_checksum(conn: psycopg.Connection, table: str, schema: str | None = None) -> tuple[int, str]:
    """(rows, order-independent checksum of all columns) of a table, computed in SQL."""
    name = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    row = conn.execute(sql.SQL(ROW_CHECKSUM).format(name)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def copy_out_sql(table: str, columns: list[str]) -> sql.Composed:
    """``COPY table (columns) TO STDOUT`` (text format) with every name quoted."""
    return sql.SQL("COPY {} ({}) TO STDOUT").format(sql.Identifier(table),
                                                    sql.SQL(", ").join(map(sql.Identifier, columns)))


def _write_table(conn: psycopg.Connection, writer: BackupWriter, table: str) -> TableBackup:
    """Stream one table's COPY text into ``D`` records of about a megabyte; the ``E`` record comes later."""
    entry = TableBackup(table, definition(conn, table))
    writer.json(b"T", {"table": table, "definition": entry.definition})
    columns = [c["name"] for c in entry.definition["columns"]]
    digest = hashlib.sha256()
    buffer = bytearray()

    def flush() -> None:
        digest.update(buffer)
        entry.rows += buffer.count(b"\n")
        entry.bytes += len(buffer)
        writer.record(b"D", bytes(buffer))
        buffer.clear()

    with conn.cursor() as cur, cur.copy(copy_out_sql(table, columns)) as copy:
        for block in copy:
            buffer += block
            if len(buffer) >= RECORD_BYTES:
                flush()
    if buffer:
        flush()
    entry.sha256 = digest.hexdigest()
    return entry


def _manifest_dict(manifest: BackupManifest) -> dict[str, Any]:
    data = manifest.to_dict()
    data["tables"] = {t: b.to_dict() for t, b in manifest.tables.items()}
    data.pop("path")
    return data


# ------------------------------------------------------------------------------------------- verify
def verify(path: Path, *, secret: bytes | None = None) -> BackupManifest:
    """Read the whole file: decryption, compression, every table's rows and SHA-256, the manifest.

    Raises:
        BackupIntegrityError: incomplete, truncated or altered.
        BackupKeyError: encrypted, and the key is missing or wrong.
    """
    started = time.monotonic()
    opened: dict[str, tuple[TableBackup, Any]] = {}  # table -> (what its data shows, running SHA-256)
    seen: dict[str, TableBackup] = {}
    final: dict[str, Any] | None = None
    for current, record in _by_table(read_records(path, secret=secret)):
        if final is not None:
            raise BackupIntegrityError("the backup has records after its manifest")
        if record.kind == b"T":
            info = record.json()
            opened[info["table"]] = (TableBackup(info["table"], info["definition"]), hashlib.sha256())
        elif record.kind == b"D":
            if current is None:
                raise BackupIntegrityError("the backup holds data outside a table")
            entry, digest = opened[current]
            digest.update(record.payload)
            entry.rows += record.payload.count(b"\n")
            entry.bytes += len(record.payload)
        elif record.kind == b"E":
            end = record.json()
            if end.get("table") not in opened:
                raise BackupIntegrityError("the backup's table records are out of order")
            seen[end["table"]] = _close_table(*opened[end["table"]], end)
        elif record.kind == b"M":
            final = record.json()
    if final is None:
        raise BackupIntegrityError("the backup is incomplete: it has no manifest (interrupted or truncated)")
    manifest = manifest_from(path, final)
    if set(manifest.tables) != set(seen):
        raise BackupIntegrityError("the manifest and the tables in the file disagree")
    for table, entry in manifest.tables.items():
        if (entry.rows, entry.sha256) != (seen[table].rows, seen[table].sha256):
            raise BackupIntegrityError(f"{table}: the manifest's checksum does not match the data")
    manifest.seconds = time.monotonic() - started
    manifest.file_bytes = path.stat().st_size
    return manifest


def _close_table(current: TableBackup, digest: Any, end: dict[str, Any]) -> TableBackup:
    if end.get("rows") != current.rows or end.get("sha256") != digest.hexdigest():
        raise BackupIntegrityError(f"{current.table}: data does not match its SHA-256 (the file was altered)")
    current.sha256, current.row_checksum = end["sha256"], end["row_checksum"]
    return current


def manifest_from(path: Path, data: dict[str, Any]) -> BackupManifest:
    """The manifest object of a backup's ``M`` record."""
    manifest = BackupManifest(path, data["created_at"], data["server_version"], data["database"],
                              data["tool_version"], bool(data["encrypted"]), data.get("unified", {}))
    manifest.tables = {t: TableBackup.from_dict(b) for t, b in data["tables"].items()}
    return manifest


def tables_data(path: Path, *, secret: bytes | None) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Each table's COPY text data in file order, in one pass over a (verified) backup.

    Yields (table, blocks); consume the blocks before asking for the next table.
    """
    tagged = ((table, r.payload) for table, r in _by_table(read_records(path, secret=secret)) if r.kind == b"D")
    for table, group in groupby(tagged, key=lambda item: item[0]):
        yield table, (payload for _, payload in group)


def _by_table(records: Iterator[Record]) -> Iterator[tuple[str | None, Record]]:
    current: str | None = None
    for record in records:
        if record.kind == b"T":
            current = record.json()["table"]
        yield current, record
