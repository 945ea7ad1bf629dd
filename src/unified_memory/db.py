"""Opening connections: to a configured server, or to the embedded pgserver (PostgreSQL 16 + pgvector).

Stage functions never connect on their own; the CLI opens one connection here and passes it in.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql
from psycopg.abc import Params
from psycopg.rows import dict_row, scalar_row

from .errors import ConfigError, DatabaseUnavailable, UnifiedMemoryError
from .settings import check_dsn, private_dir, redact

EMBEDDED_DATABASE = "unified_memory"
DEMO_DATABASE = "unified_memory_demo"


@dataclass(frozen=True)
class Target:
    """Where a connection goes: a DSN and how to describe it without secrets."""

    dsn: str
    description: str
    embedded: bool = False


def start_embedded(data_dir: Path, *, quiet: bool = False) -> Target:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir/pgdata``; it stops when its last user exits.

    Safe to call from several processes at once: a file lock in the data directory serialises the start and
    the creation of the database. Users are counted in pgserver's ``.handle_pids.json``; users that died
    without cleaning up (kill -9) are dropped from it here and again at exit, so the last live user stops the
    server. A ``postmaster.pid`` naming no running postgres of this data directory is removed before starting.
    """
    import pgserver  # heavy import, only when the embedded server is really used

    pgdata = private_dir(data_dir) / "pgdata"
    with _file_lock(data_dir / ".embedded.lock"):
        _forget_dead_users(pgdata)
        _clear_stale_pid_file(pgdata)
        try:
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
            admin = server.get_uri()
        except Exception as exc:  # pgserver raises subprocess, OS and assertion errors of several kinds
            raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: "
                                      f"{type(exc).__name__}: {exc}") from None
        _KEEP_ALIVE.append(server)
        atexit.register(_forget_dead_users, pgdata)  # runs before pgserver's own exit handler (LIFO)
        _create_database(admin, EMBEDDED_DATABASE)
    if not quiet:
        print(f"started the embedded PostgreSQL (pgserver) in {pgdata}", file=sys.stderr)
    return Target(server.get_uri(EMBEDDED_DATABASE), f"embedded PostgreSQL in {pgdata}", embedded=True)


_KEEP_ALIVE: list[object] = []
LOCK_WAIT_SECONDS = 120.0


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created 0600), waited for at most LOCK_WAIT_SECONDS."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DatabaseUnavailable(f"another process holds {path} (starting the embedded "
                                              "PostgreSQL) for too long") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _forget_dead_users(pgdata: Path) -> None:
    """Drop pids of processes that no longer exist from pgserver's list of the server's users."""
    from pgserver.postgres_server import PostgresServer

    users = pgdata / ".handle_pids.json"
    with PostgresServer._lock:  # the lock pgserver itself holds while it reads and writes the list
        try:
            pids = json.loads(users.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
        if alive != pids:
            users.write_text(json.dumps(alive))


def _clear_stale_pid_file(pgdata: Path) -> None:
    """Remove a ``postmaster.pid`` whose pid is not a running postgres serving ``pgdata`` (kill -9, reboot)."""
    pid_file = pgdata / "postmaster.pid"
    try:
        first = pid_file.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        first = ""
    if not pid_file.exists():
        return
    try:
        process = psutil.Process(int(first))
        if process.name().startswith("postgres") and str(pgdata) in " ".join(process.cmdline()):
            return
    except (ValueError, psutil.Error):
        pass
    pid_file.unlink(missing_ok=True)


def _create_database(admin: str, name: str) -> None:
    """``CREATE DATABASE name`` unless it exists; a concurrent creation by another process is not an error."""
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                return
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
        return
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"the embedded PostgreSQL does not answer: {exc}") from None


def target_for(dsn: str | None, data_dir: Path, *, quiet: bool = False) -> Target:
    """The configured server, or the embedded one when nothing is configured."""
    if dsn is None:
        return start_embedded(data_dir, quiet=quiet)
    check_dsn(dsn)
    return Target(dsn, redact(dsn))


@contextmanager
def connect(target: Target, *, autocommit: bool = True) -> Iterator[psycopg.Connection]:
    """A connection to ``target``; errors name the server without its password."""
    try:
        conn = psycopg.connect(target.dsn, autocommit=autocommit, application_name="unified-memory")
    except psycopg.OperationalError as exc:
        reason = _without_secret(str(exc).strip().splitlines()[0] if str(exc).strip() else "", target.dsn)
        raise DatabaseUnavailable(f"cannot connect to {target.description}: {reason}") from None
    try:
        yield conn
    finally:
        conn.close()


def _without_secret(message: str, dsn: str) -> str:
    try:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        return "(details hidden)"
    return message.replace(str(password), "***") if password else message


def server_version(conn: psycopg.Connection) -> int:
    """``server_version_num`` as an int, e.g. 150020."""
    return int(scalar(conn, "SELECT current_setting('server_version_num')::int"))


def has_extension_available(conn: psycopg.Connection, name: str) -> bool:
    """Whether the server can ``CREATE EXTENSION name`` (pgvector on pgserver; not on the system PG 15)."""
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", [name]).fetchone()
    return row is not None


def scalar(conn: psycopg.Connection, query: str | bytes | sql.SQL | sql.Composed,
           params: Params | None = None) -> Any:
    """The first column of the first row of ``query`` (None when it returns no row)."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query, params).fetchone()


def first_column(conn: psycopg.Connection, query: str | bytes | sql.SQL | sql.Composed,
           params: Params | None = None) -> list[Any]:
    """The first column of every row of ``query``."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query, params).fetchall()


def all_rows(conn: psycopg.Connection, query: str | bytes | sql.SQL | sql.Composed,
            params: Params | None = None) -> list[dict[str, Any]]:
    """Every row of ``query``, each a dict by column name."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def one_row(conn: psycopg.Connection, query: str | bytes | sql.SQL | sql.Composed,
           params: Params | None = None) -> dict[str, Any] | None:
    """The first row of ``query`` as a dict by column name (None when it returns no row)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchone()


def relation_exists(conn: psycopg.Connection, name: str) -> bool:
    """Whether ``name`` (a table or view, quoted and qualified as needed) exists on the search path."""
    return scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", [name]) is True


@contextmanager
def custom_plans(conn: psycopg.Connection) -> Iterator[None]:
    """Never prepare statements on ``conn`` while inside: keyset batches need a plan per key range.

    psycopg prepares a statement after five executions; the generic plan of ``($1 IS NULL OR id > $1)``
    cannot use the key's index, so every batch from the sixth on would scan the whole table.
    """
    saved = conn.prepare_threshold
    conn.prepare_threshold = None
    try:
        yield
    finally:
        conn.prepare_threshold = saved


@contextmanager
def maintenance(conn: psycopg.Connection) -> Iterator[None]:
    """Run the tool's own work with row-level security bypassed on purpose, never filtered by accident.

    ``row_security = off`` makes PostgreSQL raise an error instead of silently filtering rows when the
    role cannot bypass RLS; a role that is neither superuser nor BYPASSRLS switches to the
    ``unified_memory_maintenance`` role (BYPASSRLS) when it is a member of it.
    """
    bypass = bool(scalar(conn, "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"))
    member = bool(scalar(conn, "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles "
                               "WHERE rolname = 'unified_memory_maintenance'"))
    if not bypass and not member:
        raise UnifiedMemoryError(
            "this role cannot bypass row-level security: connect as a role with BYPASSRLS or grant it "
            "unified_memory_maintenance, so that counts are never silently filtered"
        )
    conn.execute("SET row_security = off")
    if not bypass:
        conn.execute("SET ROLE unified_memory_maintenance")
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("RESET ROLE")
            conn.execute("RESET row_security")


def analyze(conn: psycopg.Connection) -> None:
    """ANALYZE memories and the quarantine: as their owner directly, else through 018's owner function.

    Before PostgreSQL 17 only a table's owner may analyze it; a maintenance login would be skipped (a warning)
    and leave the planner with the statistics of an empty table.
    """
    owner = scalar(conn, "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
                         "WHERE oid = to_regclass('memories')")
    function = scalar(conn, "SELECT has_function_privilege(p.oid, 'EXECUTE') FROM pg_proc p "
                            "WHERE p.proname = 'memory_migration_analyze' "
                            "AND p.pronamespace = current_schema()::regnamespace")
    if not owner and function:
        conn.execute("SELECT memory_migration_analyze()")
    else:
        conn.execute("ANALYZE memories, memory_migration_quarantine")


def fresh_database(target: Target, name: str) -> Target:
    """Drop and create database ``name`` on ``target``'s server; a target for it (the demo's sandbox)."""
    with connect(target) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return on_database(target, name)


def on_database(target: Target, name: str) -> Target:
    """``target``'s server, database ``name`` (the demo's sandbox, or ``metrics --database``)."""
    params = psycopg.conninfo.conninfo_to_dict(target.dsn)
    params["dbname"] = name
    dsn = psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    return Target(dsn, redact(dsn) if not target.embedded else f"{name} on {target.description}", target.embedded)


def check_timezone(conn: psycopg.Connection, source_timezone: str) -> None:
    """Refuse a time zone the server does not know (``--source-timezone`` of migrate and schema up).

    Raises:
        ConfigError: the server does not know ``source_timezone``.
    """
    try:
        with conn.transaction():
            conn.execute("SELECT now() AT TIME ZONE %s", [source_timezone])
    except psycopg.errors.InvalidParameterValue as exc:
        raise ConfigError(f"unknown time zone {source_timezone!r}") from exc
