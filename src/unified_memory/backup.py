"""Backup: the legacy tables, definition and rows, in one verified file, taken before any change.

Each table is read with ``COPY ... TO STDOUT (FORMAT binary)`` inside one REPEATABLE READ snapshot and
streamed through zstd (and AES-256-GCM when a key is set) to disk: the client's memory stays flat whatever
the size. Binary COPY round-trips every type bit for bit (floats and vectors included) and spares the server
the text conversion, the largest cost of a dump. The manifest holds each table's definition, its row count
(the server's COPY count) and the SHA-256 of its data; the rollback proves a restored table by reading it
back to the same SHA-256. ``verify`` needs no database.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from . import __version__, locks, privileges
from .backupfile import FORMAT_VERSION, BackupWriter, Record, check_directory, clean_leftovers, read_records
from .checks import SECONDS, Serialised, as_dict, json_field
from .db import one_row, relation_exists, scalar
from .errors import BackupIntegrityError, ConfigError
from .shapes import LEGACY_TABLES, table_columns

log = logging.getLogger("unified_memory.backup")

BACKUP_PREFIX = "memory_migration_backup_"
BACKUP_SUFFIX = ".umbk"
RECORD_BYTES = 1 << 20

# The COPY format of backups, unless told "text" (slower, but readable by other tools); each table records its own.
COPY_FORMAT = "binary"
COPY_FORMATS = ("binary", "text")
BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
BINARY_TRAILER = b"\xff\xff"

# Text output that does not depend on the session, so that text COPY and row::text checksums are reproducible.
DETERMINISTIC_SESSION = (
    "SET LOCAL TimeZone = 'UTC'", "SET LOCAL DateStyle = 'ISO, YMD'", "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL extra_float_digits = 1", "SET LOCAL bytea_output = 'hex'",
)

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
       a.atttypid::regtype::text, a.atttypmod
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
SELECT (SELECT count(*) FROM memories WHERE source_table IS NOT NULL) AS memories_with_provenance,
       (SELECT count(*) FROM memories) AS memories,
       (SELECT max(run_id) FROM memory_migration_runs) AS last_run_id"""


@dataclass
class TableBackup(Serialised):
    """One legacy table in a backup: its definition and what its data must check to."""

    json_order: ClassVar[tuple[str, ...]] = ("table", "rows", "bytes", "sha256", "copy_format", "definition")

    table: str
    definition: dict[str, Any]
    rows: int = 0
    bytes: int = 0
    sha256: str = ""
    copy_format: str = COPY_FORMAT

    @property
    def column_names(self) -> list[str]:
        return [c["name"] for c in self.definition["columns"]]

    def summary(self) -> dict[str, Any]:
        """What the data checks to, without the definition (the ``E`` record and the manifest's table list)."""
        return {k: v for k, v in as_dict(self).items() if k != "definition"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableBackup:
        return cls(data["table"], data["definition"], int(data["rows"]), int(data["bytes"]), data["sha256"],
                   data["copy_format"])


_IDENTITY = """
SELECT current_database() AS database, d.oid::bigint AS database_oid,
       CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE')
            THEN (SELECT system_identifier::text FROM pg_control_system()) END AS system_identifier
FROM pg_database d WHERE d.datname = current_database()"""


@dataclass(frozen=True)
class Identity:
    """Which database a backup comes from: the cluster's system identifier, the database's name and OID."""

    database: str
    database_oid: int | None = None
    system_identifier: str | None = None

    def differences(self, here: Identity) -> list[str]:
        """Why ``here`` is not the database this identity names (empty when it is, as far as both know)."""
        found = []
        if self.system_identifier and here.system_identifier and self.system_identifier != here.system_identifier:
            found.append(f"cluster {self.system_identifier}, not {here.system_identifier}")
        if self.database_oid is not None and here.database_oid is not None:
            if self.database_oid != here.database_oid:
                found.append(f"database OID {self.database_oid}, not {here.database_oid}")
        elif self.database != here.database:  # an older backup without an OID: its name must match
            found.append(f"database {self.database!r}, not {here.database!r}")
        return found


def identity(conn: psycopg.Connection) -> Identity:
    """The identity of ``conn``'s database (the system identifier only where this role may read it)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_IDENTITY).fetchone()
    assert row is not None
    return Identity(str(row["database"]), int(row["database_oid"]), row["system_identifier"])


def _summaries(tables: dict[str, TableBackup]) -> dict[str, dict[str, Any]]:
    return {t: b.summary() for t, b in tables.items()}


@dataclass
class BackupManifest(Serialised):
    """What a backup holds: where it came from, and each table with its checksums."""

    json_order: ClassVar[tuple[str, ...]] = (
        "path", "format_version", "created_at", "server_version", "database", "database_oid", "system_identifier",
        "authenticated", "tool_version", "encrypted", "unified", "file_bytes", "seconds", "tables")

    path: Path = field(metadata=json_field(convert=str))
    created_at: str
    server_version: str
    database: str
    tool_version: str
    encrypted: bool
    unified: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, TableBackup] = field(default_factory=dict, metadata=json_field(convert=_summaries))
    seconds: float = field(default=0.0, metadata=SECONDS)
    file_bytes: int = 0
    format_version: int = FORMAT_VERSION
    database_oid: int | None = None
    system_identifier: str | None = None
    authenticated: bool = False

    @property
    def identity(self) -> Identity:
        return Identity(self.database, self.database_oid, self.system_identifier)


def default_path(directory: Path, now: datetime | None = None) -> Path:
    """``memory_migration_backup_YYYYMMDD_HHMMSS_ffffff_<random>.umbk`` (UTC) in ``directory`` (created 0700).

    The microseconds keep names sortable by time; the random part keeps two backups started in the same
    microsecond (or on two hosts sharing the directory) apart. The directory must be private (see
    :func:`check_directory`).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_directory(directory)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S_%f")
    return directory / f"{BACKUP_PREFIX}{stamp}_{secrets.token_hex(4)}{BACKUP_SUFFIX}"


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
           tables: tuple[str, ...] = LEGACY_TABLES, copy_format: str = COPY_FORMAT,
           lock_wait: float = locks.DEFAULT_WAIT) -> BackupManifest:
    """Write every present legacy table of ``conn``'s database to ``path`` and return the manifest.

    ``copy_format`` "text" trades speed for data that other tools (psql's copy) can read.

    Raises:
        ConfigError: the connection is not in autocommit mode, or ``copy_format`` is unknown.
    """
    if copy_format not in COPY_FORMATS:
        raise ConfigError(f"unknown COPY format {copy_format!r}; use one of {', '.join(COPY_FORMATS)}")
    privileges.require(conn, "backup", legacy=[t for t in tables if t in privileges.present_legacy_tables(conn)])
    started = time.monotonic()
    check_directory(path.parent)
    for name in clean_leftovers(path.parent, BACKUP_PREFIX):
        log.info("removed the leftover of a killed backup: %s", name)
    writer = BackupWriter(path, secret=secret)
    try:
        with locks.hold(conn, "backup", lock_wait), snapshot(conn):
            manifest = _header(conn, path, encrypted=secret is not None)
            writer.json(b"H", _manifest_dict(manifest))
            for table in (t for t in tables if table_columns(conn, t)):
                entry = manifest.tables[table] = _write_table(conn, writer, table, copy_format)
                writer.json(b"E", entry.summary())
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


def read_back(written: BackupManifest, *, secret: bytes | None) -> BackupManifest:
    """Verify the file just written and that it holds what was written (``migrate`` does so before any change).

    Raises:
        BackupIntegrityError: the file does not verify, or its tables or checksums differ from ``written``.
    """
    found = verify(written.path, secret=secret)
    expected = {t: (b.rows, b.bytes, b.sha256) for t, b in written.tables.items()}
    if {t: (b.rows, b.bytes, b.sha256) for t, b in found.tables.items()} != expected:
        raise BackupIntegrityError(f"{written.path.name} does not read back to what was written; nothing was changed")
    return found


def _header(conn: psycopg.Connection, path: Path, *, encrypted: bool) -> BackupManifest:
    version = str(scalar(conn, "SELECT current_setting('server_version')"))
    origin = identity(conn)
    unified: dict[str, Any] = {"schema_applied": relation_exists(conn, "memory_migration_runs")}
    if unified["schema_applied"]:
        state = one_row(conn, _UNIFIED_STATE)
        assert state is not None
        unified.update(memories_with_provenance=int(state["memories_with_provenance"]),
                       memories=int(state["memories"]), last_run_id=state["last_run_id"])
    unified["undo"] = "delete memories by provenance (source_table, source_key); clear quarantine and checkpoints"
    return BackupManifest(path, datetime.now(UTC).isoformat(), version, origin.database, __version__, encrypted,
                          unified, database_oid=origin.database_oid, system_identifier=origin.system_identifier,
                          authenticated=encrypted)


def definition(conn: psycopg.Connection, table: str) -> dict[str, Any]:
    """Columns (name, type, not null, default; the type also as base name and modifier, which the restore has
    the server resolve), constraints and indexes of ``table``."""
    name = sql.Identifier(table).as_string(conn)
    return {
        "schema": str(scalar(conn, "SELECT current_schema()")),
        "columns": [{"name": n, "type": t, "not_null": nn, "default": d, "type_name": tn, "typmod": tm}
                    for n, t, nn, d, tn, tm in conn.execute(_COLUMNS, [name])],
        "constraints": [{"name": n, "type": t, "definition": d} for n, t, d in conn.execute(_CONSTRAINTS, [name])],
        "indexes": [{"name": n, "definition": d} for n, d in conn.execute(_INDEXES, [name])],
    }


def copy_sql(table: sql.Composable, columns: list[str], copy_format: str, direction: str) -> sql.Composed:
    """``COPY table (columns) TO STDOUT`` or ``FROM STDIN`` in ``copy_format``, every name quoted."""
    if copy_format not in COPY_FORMATS or direction not in ("TO STDOUT", "FROM STDIN"):
        raise ValueError(f"unsupported COPY {direction} format {copy_format!r}")
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    if direction == "TO STDOUT":  # a query, so that views and partitioned tables are read like tables
        return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT {})").format(names, table, sql.SQL(copy_format))
    return sql.SQL("COPY {} ({}) {} (FORMAT {})").format(table, names, sql.SQL(direction), sql.SQL(copy_format))


def copy_digest(conn: psycopg.Connection, table: sql.Composable, columns: list[str], copy_format: str,
                sink: BackupWriter | None = None) -> tuple[int, int, str]:
    """(rows, bytes, SHA-256) of a table's COPY output; with ``sink``, the data also goes there in ``D`` records.

    Blocks are gathered into records of about a megabyte, so compression and hashing work on large buffers.
    """
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray()
    with conn.cursor() as cur:
        with cur.copy(copy_sql(table, columns, copy_format, "TO STDOUT")) as copy:
            for block in copy:
                buffer += block
                if len(buffer) >= RECORD_BYTES:
                    size += _flush(buffer, digest, sink)
        size += _flush(buffer, digest, sink)
        return cur.rowcount, size, digest.hexdigest()


def _flush(buffer: bytearray, digest: Any, sink: BackupWriter | None) -> int:
    size = len(buffer)
    if size:
        digest.update(buffer)
        if sink is not None:
            sink.record(b"D", bytes(buffer))
        buffer.clear()
    return size


def _write_table(conn: psycopg.Connection, writer: BackupWriter, table: str, copy_format: str) -> TableBackup:
    """Stream one table's COPY into ``D`` records between its ``T`` record and (later) its ``E``."""
    entry = TableBackup(table, definition(conn, table), copy_format=copy_format)
    writer.json(b"T", {"table": table, "definition": entry.definition, "copy_format": entry.copy_format})
    entry.rows, entry.bytes, entry.sha256 = copy_digest(conn, sql.Identifier(table), entry.column_names,
                                                        entry.copy_format, writer)
    return entry


def _manifest_dict(manifest: BackupManifest) -> dict[str, Any]:
    data = as_dict(manifest)
    data["tables"] = {t: as_dict(b) for t, b in manifest.tables.items()}
    data.pop("path")
    return data


# ------------------------------------------------------------------------------------------- verify
def verify(path: Path, *, secret: bytes | None = None) -> BackupManifest:
    """Read the whole file: decryption, compression, every table's bytes, framing and SHA-256, the manifest.

    Raises:
        BackupIntegrityError: incomplete, truncated or altered.
        BackupKeyError: encrypted, and the key is missing or wrong.
    """
    started = time.monotonic()
    opened: dict[str, _TableCheck] = {}
    seen: dict[str, TableBackup] = {}
    final: dict[str, Any] | None = None
    header: dict[str, Any] = {}
    for current, record in _by_table(read_records(path, secret=secret, header_out=header)):
        if final is not None:
            raise BackupIntegrityError("the backup has records after its manifest")
        if record.kind == b"T":
            info = record.json()
            if info.get("copy_format") not in COPY_FORMATS:
                raise BackupIntegrityError(f"{info.get('table')}: unknown COPY format {info.get('copy_format')!r}")
            opened[info["table"]] = _TableCheck(info["table"], info["copy_format"])
        elif record.kind == b"D":
            if current is None:
                raise BackupIntegrityError("the backup holds data outside a table")
            opened[current].update(record.payload)
        elif record.kind == b"E":
            end = record.json()
            if end.get("table") not in opened:
                raise BackupIntegrityError("the backup's table records are out of order")
            seen[end["table"]] = opened[end["table"]].close(end)
        elif record.kind == b"M":
            final = record.json()
    if final is None:
        raise BackupIntegrityError("the backup is incomplete: it has no manifest (interrupted or truncated)")
    manifest = manifest_from(path, final)
    manifest.encrypted = manifest.authenticated = header.get("encryption") is not None  # the file's, not its claim
    if set(manifest.tables) != set(seen):
        raise BackupIntegrityError("the manifest and the tables in the file disagree")
    for table, entry in manifest.tables.items():
        if (entry.rows, entry.bytes, entry.sha256) != (seen[table].rows, seen[table].bytes, seen[table].sha256):
            raise BackupIntegrityError(f"{table}: the manifest's checksum does not match the data")
    manifest.seconds = time.monotonic() - started
    manifest.file_bytes = path.stat().st_size
    return manifest


class _TableCheck:
    """One table's data as ``verify`` reads it: running SHA-256, size, and the COPY framing at both ends."""

    def __init__(self, table: str, copy_format: str) -> None:
        self.table, self.copy_format = table, copy_format
        self.digest, self.size, self.head, self.tail = hashlib.sha256(), 0, b"", b""

    def update(self, payload: bytes) -> None:
        self.digest.update(payload)
        self.size += len(payload)
        if len(self.head) < len(BINARY_SIGNATURE):
            self.head = (self.head + payload)[:len(BINARY_SIGNATURE)]
        self.tail = (self.tail + payload)[-len(BINARY_TRAILER):]

    def close(self, end: dict[str, Any]) -> TableBackup:
        if end.get("bytes") != self.size or end.get("sha256") != self.digest.hexdigest():
            raise BackupIntegrityError(f"{self.table}: data does not match its SHA-256 (the file was altered)")
        framed = (self.head == BINARY_SIGNATURE and self.tail == BINARY_TRAILER if self.copy_format == "binary"
                  else self.size == 0 or self.tail.endswith(b"\n"))
        if not framed:
            raise BackupIntegrityError(f"{self.table}: its COPY data is not complete")
        return TableBackup(self.table, {}, int(end["rows"]), self.size, end["sha256"], self.copy_format)


def manifest_from(path: Path, data: dict[str, Any]) -> BackupManifest:
    """The manifest object of a backup's ``M`` record."""
    manifest = BackupManifest(path, data["created_at"], data["server_version"], data["database"],
                              data["tool_version"], bool(data["encrypted"]), data.get("unified", {}),
                              format_version=int(data["format_version"]),
                              database_oid=data.get("database_oid"), system_identifier=data.get("system_identifier"))
    manifest.tables = {t: TableBackup.from_dict(b) for t, b in data["tables"].items()}
    return manifest


def tables_data(path: Path, *, secret: bytes | None) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Each table's COPY data in file order, in one pass over a (verified) backup.

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
