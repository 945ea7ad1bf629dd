"""The migration manager: versioned SQL files applied in order, tracked by their content's SHA-256.

Why our own runner rather than yoyo or Alembic: the files must stay plain psql scripts (the guide applies them
with ``psql -f``), and the runner must refuse edited files by content hash, wait briefly on an advisory lock,
name the failing file *and line*, and retry DDL that hits a short ``lock_timeout``. Neither library does the
last three; wrapping one would be more code than this module.

Files live in ``migrations/postgres`` as ``NNN_name.sql`` with an optional ``NNN_name.down.sql``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from . import locks, sqlfile
from .db import relation_exists, scalar
from .errors import LockBusy, SchemaError

TRACKING_TABLE = "unified_memory_schema_migrations"

_CREATE_TRACKING = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (version TEXT PRIMARY KEY, name TEXT NOT NULL, sha256 CHAR(64) NOT NULL,"
    " applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), duration_ms INTEGER NOT NULL)"
).format(sql.Identifier(TRACKING_TABLE))


def default_directory() -> Path:
    """The SQL files shipped with the package (``data/migrations/postgres`` in the repository)."""
    return Path(str(resources.files("unified_memory") / "migrations" / "postgres"))


@dataclass(frozen=True)
class MigrationFile:
    """One versioned SQL file and, where it exists, its down file."""

    version: str
    name: str
    path: Path
    down_path: Path | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class SchemaStatus:
    """Applied and pending files, and applied files whose content changed since."""

    applied: list[dict[str, str]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"applied": self.applied, "pending": self.pending, "edited": self.edited}


@dataclass
class SchemaResult:
    """What ``up`` or ``down`` did."""

    action: str
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"action": self.action, "files": self.files, "seconds": round(self.seconds, 3)}


def discover(directory: Path | None = None) -> list[MigrationFile]:
    """The migration files of ``directory`` in version order."""
    directory = directory or default_directory()
    files = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        if path.name.endswith(".down.sql"):
            continue
        down = path.with_name(path.name[: -len(".sql")] + ".down.sql")
        files.append(MigrationFile(path.name[:3], path.stem, path, down if down.exists() else None))
    return files


def status(conn: psycopg.Connection, *, directory: Path | None = None) -> SchemaStatus:
    """Which files are applied, pending, or edited after being applied."""
    applied = _applied(conn)
    result = SchemaStatus()
    for mf in discover(directory):
        record = applied.get(mf.version)
        if record is None:
            result.pending.append(mf.path.name)
            continue
        result.applied.append({"file": mf.path.name, "sha256": record[0], "applied_at": record[1]})
        if record[0] != mf.sha256:
            result.edited.append(mf.path.name)
    return result


def up(conn: psycopg.Connection, *, directory: Path | None = None, target: str | None = None,
       lock_wait: float = 10.0, lock_timeout_ms: int = 2000, retries: int = 6) -> SchemaResult:
    """Apply every pending file (up to ``target``), each in its own transaction.

    Raises:
        SchemaError: an applied file was edited, or a file failed (naming file and line).
        LockBusy: another run holds the lock, or a table stayed locked through every retry.
    """
    started = time.monotonic()
    result = SchemaResult("up")
    with locks.hold(conn, "schema up", lock_wait):
        current = status(conn, directory=directory)
        if current.edited:
            raise SchemaError(f"applied files were edited since: {', '.join(current.edited)}; refusing to run")
        for mf in discover(directory):
            if mf.path.name in current.pending and (target is None or mf.version <= target):
                _run_with_retries(conn, mf.path, lock_timeout_ms, retries, record=mf)
                result.files.append(mf.path.name)
    result.seconds = time.monotonic() - started
    return result


def down(conn: psycopg.Connection, *, directory: Path | None = None, steps: int = 1, force: bool = False,
         lock_wait: float = 10.0, lock_timeout_ms: int = 2000, retries: int = 6) -> SchemaResult:
    """Undo the last ``steps`` applied files with their down files, newest first."""
    started = time.monotonic()
    result = SchemaResult("down")
    with locks.hold(conn, "schema down", lock_wait):
        applied = _applied(conn)
        undo = [f for f in reversed(discover(directory)) if f.version in applied][:steps]
        if not force:
            _refuse_data_loss(conn, undo)
        for mf in undo:
            if mf.down_path is None:
                raise SchemaError(f"{mf.path.name} has no down file", file=mf.path.name)
            _run_with_retries(conn, mf.down_path, lock_timeout_ms, retries, forget=mf, force=force)
            result.files.append(mf.down_path.name)
    result.seconds = time.monotonic() - started
    return result


_DROP_TABLE = re.compile(r"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(.+?)(?:\s+(?:CASCADE|RESTRICT))?\s*;?\s*$",
                         re.IGNORECASE | re.DOTALL)
_WHAT = {"memories": "memories", "memory_access_log": "the access audit log",
         "memory_relationships": "memory relationships", "memory_migration_quarantine": "quarantined legacy rows",
         "memory_legacy_embeddings": "kept legacy vectors", "memory_migration_runs": "the migration's run ledger",
         "memory_migration_checkpoints": "the migration's checkpoints"}
_RELATION = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p')"""


def _refuse_data_loss(conn: psycopg.Connection, files: list[MigrationFile]) -> None:
    """Refuse to run down files that would drop tables holding rows, naming each table and what it holds."""
    losses = []
    for mf in files:
        for name in _dropped_tables(mf):
            found = conn.execute(_RELATION, [name]).fetchone()
            if found is None:
                continue
            rows = int(scalar(conn, sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT 1000000) r").format(
                sql.Identifier(found[0], found[1]))))
            if rows:
                shown = f"{rows:,}" if rows < 1000000 else "1,000,000 or more"
                losses.append(f"{found[1]} ({shown} rows: {_WHAT.get(found[1], 'data')}, by {mf.down_path.name})"
                              if mf.down_path else found[1])
    if losses:
        raise SchemaError("schema down would drop tables that hold rows: " + "; ".join(losses)
                          + ". Nothing was changed; back them up, or pass --force to drop them")


def _dropped_tables(mf: MigrationFile) -> list[str]:
    if mf.down_path is None:
        return []
    names: list[str] = []
    for statement in sqlfile.split(mf.down_path.read_text(encoding="utf-8")):
        text = "\n".join(line for line in statement.sql.splitlines() if not line.lstrip().startswith("--")).strip()
        match = _DROP_TABLE.match(text)
        if match:
            names.extend(n.strip() for n in match.group(1).split(","))
    return names


def ensure_applied(conn: psycopg.Connection, *, directory: Path | None = None) -> SchemaResult:
    """Apply what is pending (used by stages that need the schema); a no-op when up to date."""
    return up(conn, directory=directory)


def _applied(conn: psycopg.Connection) -> dict[str, tuple[str, str]]:
    if not relation_exists(conn, TRACKING_TABLE):
        return {}
    query = sql.SQL("SELECT version, sha256, applied_at::text FROM {}").format(sql.Identifier(TRACKING_TABLE))
    return {row[0]: (row[1], row[2]) for row in conn.execute(query)}


def _run_with_retries(conn: psycopg.Connection, path: Path, lock_timeout_ms: int, retries: int, *,
                      record: MigrationFile | None = None, forget: MigrationFile | None = None,
                      force: bool = False) -> None:
    statements = [s for s in sqlfile.split(path.read_text(encoding="utf-8")) if not s.is_transaction_control]
    for attempt in range(retries + 1):
        try:
            _run_once(conn, path, statements, lock_timeout_ms, record=record, forget=forget, force=force)
            return
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == retries:
                raise LockBusy(f"{path.name}: a table stayed locked through {retries} retries") from exc
            time.sleep(min(0.25 * 2**attempt, 8.0))


def _run_once(conn: psycopg.Connection, path: Path, statements: list[sqlfile.Statement], lock_timeout_ms: int,
              *, record: MigrationFile | None, forget: MigrationFile | None, force: bool) -> None:
    started = time.monotonic()
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{lock_timeout_ms}ms"])
        if force:
            conn.execute("SELECT set_config('unified_memory.allow_data_loss', 'on', true)")
        for statement in statements:
            try:
                conn.execute(statement.sql.encode())
            except psycopg.errors.LockNotAvailable:
                raise
            except psycopg.Error as exc:
                raise SchemaError(
                    f"{path.name}, line {statement.line}: [{exc.sqlstate}] {exc.diag.message_primary or exc}",
                    file=path.name, line=statement.line, sqlstate=exc.sqlstate,
                ) from exc
        conn.execute(_CREATE_TRACKING)
        if record is not None:
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name, sha256, duration_ms) VALUES (%s, %s, %s, %s)").format(
                    sql.Identifier(TRACKING_TABLE)),
                [record.version, record.name, record.sha256, int((time.monotonic() - started) * 1000)],
            )
        if forget is not None:
            conn.execute(sql.SQL("DELETE FROM {} WHERE version = %s").format(sql.Identifier(TRACKING_TABLE)),
                         [forget.version])
