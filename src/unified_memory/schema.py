"""The migration manager: versioned SQL files applied in order, tracked by their content's SHA-256.

Why our own runner rather than yoyo or Alembic: the files must stay plain psql scripts (the guide applies them
with ``psql -f``), and the runner must refuse edited files by content hash, wait briefly on an advisory lock,
name the failing file *and line*, and retry DDL that hits a short ``lock_timeout``. Neither library does the
last three; wrapping one would be more code than this module.

Files live in ``migrations/postgres`` as ``NNN_name.sql`` with an optional ``NNN_name.down.sql``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from . import adopt, drift, locks, sqlfile
from .checks import SECONDS, Serialised, json_field
from .db import all_rows, check_timezone, one_row, relation_exists, scalar
from .errors import SchemaError, flag

_BACKOFF = locks.Backoff(first=0.25, most=8.0)  # DDL: the application's locks may be held for a while

TRACKING_TABLE = drift.LEDGER

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
class SchemaStatus(Serialised):
    """Applied and pending files, and applied files whose content changed since."""

    applied: list[dict[str, str]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)  # pending files whose objects exist (applied with psql)
    adoptable: str | None = None  # the first implementation's 016 found here (its variant)
    adopted: bool = False  # our 016 is recorded as an adoption of the first implementation's
    drift: list[dict[str, str]] = field(default_factory=list)  # objects of applied files missing or altered
    untracked: list[str] = field(default_factory=list)  # applied before fingerprints were recorded


@dataclass
class SchemaResult(Serialised):
    """What ``up`` or ``down`` did."""

    action: Literal["up", "down", "repair"]
    files: list[str] = field(default_factory=list)
    seconds: float = field(default=0.0, metadata=SECONDS)
    dry_run: bool = False
    adoption: dict[str, Any] | None = field(default=None, metadata=json_field(omit_if=lambda r: r.adoption is None))
    reverted: dict[str, Any] | None = field(default=None, metadata=json_field(omit_if=lambda r: r.reverted is None))


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
            if _present(conn, mf.version):
                result.unrecorded.append(mf.path.name)
            continue
        result.applied.append({"file": mf.path.name, "sha256": record[0], "applied_at": record[1]})
        if record[0] != mf.sha256:
            result.edited.append(mf.path.name)
    found = adopt.detect(conn) if "016" not in applied else None
    result.adoptable = found.variant if found else None
    result.adopted = "016" in applied and adopt.adopted(conn)
    result.drift = [d.to_dict() for d in drift.check(conn)]
    tracked = drift.tracked_versions(conn)
    result.untracked = [a["file"] for a in result.applied if a["file"][:3] not in tracked]
    return result


def _present(conn: psycopg.Connection, version: str) -> bool:
    """Whether objects of file ``version`` exist, recognised by the COMMENT every file gives its objects."""
    return bool(scalar(
        conn, "SELECT EXISTS (SELECT 1 FROM pg_description d JOIN pg_class c ON d.classoid = 'pg_class'::regclass "
        "AND d.objoid = c.oid AND d.objsubid = 0 WHERE c.relnamespace = current_schema()::regnamespace "
        "AND left(d.description, 19) = %s)", [f"unified-memory {version}:"]))


def up(conn: psycopg.Connection, *, directory: Path | None = None, target: str | None = None,
       lock_wait: float = 10.0, lock_timeout_ms: int = 2000, retries: int = 6, dry_run: bool = False,
       source_timezone: str = "UTC", adopt_first: bool = True) -> SchemaResult:
    """Apply every pending file (up to ``target``), each in its own transaction.

    A first-implementation 016 found here is adopted instead (with 017, in one transaction; see ``adopt``); its
    copies of legacy rows are read with naive TIMESTAMPs in ``source_timezone``. ``dry_run`` changes nothing:
    the adoption runs in a transaction that is rolled back, and its report says what it would change; the other
    pending files are listed.

    Raises:
        ConfigError: the server does not know ``source_timezone``.
        SchemaError: an applied file was edited, or a file failed (naming file and line).
        LockBusy: another run holds the lock, or a table stayed locked through every retry.
    """
    started = time.monotonic()
    result = SchemaResult("up", dry_run=dry_run)
    check_timezone(conn, source_timezone)
    with locks.hold(conn, "schema up", lock_wait):
        current = status(conn, directory=directory)
        if current.edited:
            raise SchemaError(f"applied files were edited since: {', '.join(current.edited)}; refusing to run")
        files = [mf for mf in discover(directory)
                 if mf.path.name in current.pending and (target is None or mf.version <= target)]
        found = adopt.detect(conn) if any(mf.version == "016" for mf in files) else None
        if found is not None and not adopt_first:
            raise SchemaError("the first implementation's 016 is here: adopt it explicitly with "
                              f"`unified-memory schema up {flag('dry_run')}`, then `unified-memory schema up`")
        if found is not None:
            by_version = {mf.version: mf for mf in discover(directory)}
            result.adoption = locks.retry_locked(
                conn, lambda: _adopt(conn, by_version, found, dry_run, source_timezone),
                lock_timeout_ms=lock_timeout_ms, attempts=retries + 1, backoff=_BACKOFF,
                busy="adoption of the first 016: a table stayed locked")
            result.files += [mf.path.name + " (adopted)" * (mf.version == "016") for mf in by_version.values()]
            files = []
        for mf in files:
            if mf.path.name in current.unrecorded:
                if not dry_run:
                    _record_outside(conn, mf)
                result.files.append(mf.path.name + " (recorded: applied outside the runner)")
                continue
            if not dry_run:
                _run_with_retries(conn, mf.path, lock_timeout_ms, retries, record=mf)
            result.files.append(mf.path.name)
    result.seconds = time.monotonic() - started
    return result


def _record_outside(conn: psycopg.Connection, mf: MigrationFile) -> None:
    """A file applied with psql (atomic: its objects exist, so all of it committed): recorded, not re-run."""
    with conn.transaction():
        _record(conn, mf, time.monotonic())
        drift.record(conn, mf.version, None, drift.snapshot(conn), file_text=mf.path.read_text(encoding="utf-8"))


def _adopt(conn: psycopg.Connection, by_version: dict[str, MigrationFile], found: adopt.Found,
           dry_run: bool, source_timezone: str) -> dict[str, Any]:
    """The adoption and every file after it in the caller's transaction (rolled back for a dry run)."""
    def run_file(version: str) -> None:
        if version == "later":
            for later in sorted(v for v in by_version if v > "016"):
                run_file(later)
            return
        mf, begun = by_version[version], time.monotonic()
        before = None if version == "016" else drift.snapshot(conn)  # 016's objects: known by their comment
        _execute(conn, mf.path, _statements(mf.path))
        after = drift.snapshot(conn)
        _record(conn, mf, begun)
        drift.record(conn, version, before, after)

    with conn.transaction(force_rollback=dry_run):
        try:
            report = adopt.adopt(conn, found, _statements(by_version["016"].path), run_file, dry_run=dry_run,
                                 source_timezone=source_timezone)
        except psycopg.errors.LockNotAvailable:
            raise
        except psycopg.Error as exc:
            raise SchemaError(f"adopting the first implementation's 016 failed, nothing was changed: "
                              f"[{exc.sqlstate}] {exc.diag.message_primary or exc}", sqlstate=exc.sqlstate) from exc
    return report.to_dict()


def down(conn: psycopg.Connection, *, directory: Path | None = None, steps: int = 1, force: bool = False,
         lock_wait: float = 10.0, lock_timeout_ms: int = 2000, retries: int = 6) -> SchemaResult:
    """Undo the last ``steps`` applied files with their down files, newest first.

    An adopted 016 is not dropped: the first implementation's shape comes back with every row (``adopt.revert``).
    """
    started = time.monotonic()
    result = SchemaResult("down")
    with locks.hold(conn, "schema down", lock_wait):
        applied = _applied(conn)
        undo = [f for f in reversed(discover(directory)) if f.version in applied][:steps]
        adopted = adopt.adopted(conn)
        if not force:
            _refuse_data_loss(conn, [f for f in undo if not (f.version == "016" and adopted)])
        for mf in undo:
            if mf.version == "016" and adopted:
                result.reverted = locks.retry_locked(
                    conn, functools.partial(_revert, conn, mf), lock_timeout_ms=lock_timeout_ms,
                    attempts=retries + 1, backoff=_BACKOFF, busy="undoing the adoption: a table stayed locked")
                result.files.append(mf.path.name + " (adoption undone)")
                continue
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
            found = one_row(conn, _RELATION, [name])
            if found is None:
                continue
            table = found["relname"]
            rows = int(scalar(conn, sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT 1000000) r").format(
                sql.Identifier(found["nspname"], table))))
            if rows:
                shown = f"{rows:,}" if rows < 1000000 else "1,000,000 or more"
                losses.append(f"{table} ({shown} rows: {_WHAT.get(table, 'data')}, by {mf.down_path.name})"
                              if mf.down_path else table)
    if losses:
        raise SchemaError("schema down would drop tables that hold rows: " + "; ".join(losses)
                          + f". Nothing was changed; back them up, or pass {flag('force')} to drop them")


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


def _revert(conn: psycopg.Connection, mf: MigrationFile) -> dict[str, Any]:
    """Undo the adoption in the caller's transaction."""
    try:
        report = adopt.revert(conn)
    except psycopg.errors.LockNotAvailable:
        raise
    except psycopg.Error as exc:
        raise SchemaError(f"undoing the adoption failed, nothing was changed: "
                          f"[{exc.sqlstate}] {exc.diag.message_primary or exc}", sqlstate=exc.sqlstate) from exc
    _forget(conn, mf)
    return report.to_dict()


def repair(conn: psycopg.Connection, *, lock_wait: float = 10.0, lock_timeout_ms: int = 2000,
           retries: int = 6) -> SchemaResult:
    """Recreate the objects of applied files that are missing or altered, in one transaction, and record it."""
    started = time.monotonic()
    result = SchemaResult("repair")

    def work() -> list[drift.Drift]:
        try:
            return drift.repair(conn)
        except psycopg.errors.LockNotAvailable:
            raise
        except psycopg.Error as exc:
            raise SchemaError(f"repair failed, nothing was changed: [{exc.sqlstate}] "
                              f"{exc.diag.message_primary or exc}", sqlstate=exc.sqlstate) from exc

    with locks.hold(conn, "schema repair", lock_wait):
        repaired = locks.retry_locked(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=retries + 1,
                                      backoff=_BACKOFF, busy="schema repair: a table stayed locked")
        result.files = [str(d) for d in repaired]
    result.seconds = time.monotonic() - started
    return result


def ensure_applied(conn: psycopg.Connection, *, directory: Path | None = None) -> SchemaResult:
    """Apply what is pending (used by stages that need the schema); a no-op when up to date.

    A first-implementation 016 is never adopted implicitly: that is ``schema up``'s, on the operator's request.
    """
    return up(conn, directory=directory, adopt_first=False)


def _applied(conn: psycopg.Connection) -> dict[str, tuple[str, str]]:
    if not relation_exists(conn, TRACKING_TABLE):
        return {}
    query = sql.SQL("SELECT version, sha256, applied_at::text AS applied_at FROM {}").format(
        sql.Identifier(TRACKING_TABLE))
    return {row["version"]: (row["sha256"], row["applied_at"]) for row in all_rows(conn, query)}


def _statements(path: Path) -> list[sqlfile.Statement]:
    return [s for s in sqlfile.split(path.read_text(encoding="utf-8")) if not s.is_transaction_control]


def _run_with_retries(conn: psycopg.Connection, path: Path, lock_timeout_ms: int, retries: int, *,
                      record: MigrationFile | None = None, forget: MigrationFile | None = None,
                      force: bool = False) -> None:
    statements = _statements(path)
    locks.retry_locked(conn, lambda: _run_once(conn, path, statements, record=record, forget=forget, force=force),
                       lock_timeout_ms=lock_timeout_ms, attempts=retries + 1, backoff=_BACKOFF,
                       busy=f"{path.name}: a table stayed locked")


def _execute(conn: psycopg.Connection, path: Path, statements: list[sqlfile.Statement]) -> None:
    """Each statement of ``path`` (in the caller's transaction); an error names the file and line."""
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


def _record(conn: psycopg.Connection, mf: MigrationFile, started: float) -> None:
    conn.execute(_CREATE_TRACKING)
    conn.execute(
        sql.SQL("INSERT INTO {} (version, name, sha256, duration_ms) VALUES (%s, %s, %s, %s)").format(
            sql.Identifier(TRACKING_TABLE)),
        [mf.version, mf.name, mf.sha256, int((time.monotonic() - started) * 1000)],
    )


def _forget(conn: psycopg.Connection, mf: MigrationFile) -> None:
    conn.execute(_CREATE_TRACKING)
    conn.execute(sql.SQL("DELETE FROM {} WHERE version = %s").format(sql.Identifier(TRACKING_TABLE)), [mf.version])


def _run_once(conn: psycopg.Connection, path: Path, statements: list[sqlfile.Statement], *,
              record: MigrationFile | None, forget: MigrationFile | None, force: bool) -> None:
    """One file in the caller's transaction, recorded (or forgotten) in the ledger with it."""
    started = time.monotonic()
    if force:
        conn.execute("SELECT set_config('unified_memory.allow_data_loss', 'on', true)")
    before = drift.snapshot(conn) if record is not None else None
    _execute(conn, path, statements)
    after = drift.snapshot(conn) if record is not None else None
    conn.execute(_CREATE_TRACKING)
    if record is not None:
        _record(conn, record, started)
        drift.record(conn, record.version, before, after or {})
    if forget is not None:
        _forget(conn, forget)
