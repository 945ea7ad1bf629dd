"""Issue 13: SIGKILL during catch-up and during cutover, then a re-run, ends as an uninterrupted run."""

from __future__ import annotations

import random
from collections.abc import Callable

import psycopg
import pytest
from crash import kill_when, spawn
from livewriter import TABLES, Writer, checksums
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from unified_memory import fixtures, schema
from unified_memory.cutover import cutover
from unified_memory.migrate import MigrationOptions, migrate

STATE = (
    "SELECT (SELECT md5(string_agg(row(m.id, m.user_id, m.org_id, m.text, m.importance, m.tags, m.meta, m.memory_type, "
    "m.source_table, m.source_key, m.deleted_at IS NULL, m.version)::text, '|' ORDER BY m.id)) FROM memories m), "
    "(SELECT md5(string_agg(row(q.source_table, q.source_key, q.reason, q.duplicate_of, q.raw_row)::text, "
    "'|' ORDER BY q.source_table, q.source_key)) FROM memory_migration_quarantine q), "
    "(SELECT md5(string_agg(row(s.memory_id, s.version)::text, '|' ORDER BY s.memory_id)) "
    "FROM memory_migration_synced s), "
    "(SELECT count(*) FILTER (WHERE applied_at IS NULL) FROM memory_migration_changes), "
    "(SELECT count(*) FROM memory_access_log WHERE access_type = 'delete'), "
    "(SELECT string_agg(c.relname || ':' || t.tgname, ',' ORDER BY 1) FROM pg_trigger t "
    " JOIN pg_class c ON c.oid = t.tgrelid WHERE t.tgname LIKE 'memory_migration%%'), "
    "(SELECT string_agg(source_table, ',' ORDER BY 1) FROM memory_migration_live WHERE cutover_at IS NOT NULL)"
)


def _copy(server_dsn: str, source: str) -> str:
    """A physical copy of ``source`` (same ctids), made with CREATE DATABASE ... TEMPLATE."""
    name = conninfo_to_dict(source)["dbname"] + "_copy"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(str(name)), sql.Identifier(str(conninfo_to_dict(source)["dbname"]))))
    params = conninfo_to_dict(source)
    params["dbname"] = name
    return make_conninfo(**params)  # type: ignore[arg-type]


def _waiting_changes(dsn: str, n: int) -> None:
    """Migrated tables, then ``n`` application writes captured and waiting for catch-up."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=1500)
        schema.up(conn)
        for table in TABLES:
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(sql.Identifier(table)))
        migrate(conn, MigrationOptions(batch_size=500))
        app = Writer(dsn, seed=11)
        app.rng = random.Random(11)
        for i in range(1, n + 1):
            app.write(conn, TABLES[i % 4], "IUD"[(i // 4) % 3], i)
        assert conn.execute("SELECT count(*) FROM memory_migration_changes WHERE applied_at IS NULL").fetchone()[0] > 0


@pytest.mark.slow
def test_sigkill_during_catch_up_then_rerun(server_dsn: str, new_database: Callable[[], str]) -> None:
    reference = new_database()
    _waiting_changes(reference, 2400)
    crashed = _copy(server_dsn, reference)
    try:
        with psycopg.connect(reference, autocommit=True) as conn:
            migrate(conn, MigrationOptions(batch_size=100))
            expected = conn.execute(STATE).fetchone()
            legacy = checksums(conn)
        args = ["--dsn", crashed, "-q", "migrate", "--no-backup", "--batch-size", "100"]
        killed = 0
        for nth in (3, 5):
            killed += kill_when(spawn([*args, "--pause-ms", "30"]), crashed, state="active",
                                query_prefix="WITH cur AS", nth=nth)
        assert killed == 2, "the kills should land inside catch-up batches"
        with psycopg.connect(crashed, autocommit=True) as conn:
            waiting = conn.execute("SELECT count(*) FROM memory_migration_changes WHERE applied_at IS NULL").fetchone()
            assert waiting is not None and waiting[0] > 0
        final = spawn(args)
        assert final.wait(120) == 0, final.stderr.read().decode() if final.stderr else ""
        with psycopg.connect(crashed, autocommit=True) as conn:
            assert conn.execute(STATE).fetchone() == expected
            assert checksums(conn) == legacy
    finally:
        _drop(server_dsn, crashed)


@pytest.mark.slow
def test_sigkill_during_cutover_then_rerun(server_dsn: str, new_database: Callable[[], str]) -> None:
    reference = new_database()
    _waiting_changes(reference, 1200)
    crashed = _copy(server_dsn, reference)
    try:
        with psycopg.connect(reference, autocommit=True) as conn:
            cutover(conn)
            expected = conn.execute(STATE).fetchone()
        args = ["--dsn", crashed, "-q", "cutover", "--lock-timeout-ms", "3000"]
        assert kill_when(spawn(args), crashed, state="active", query_prefix="WITH cur AS", nth=2)
        with psycopg.connect(crashed, autocommit=True) as blocker:  # the application holds a table lock
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE memory_entries IN ROW EXCLUSIVE MODE")
            assert kill_when(spawn(args), crashed, state="active", query_prefix="LOCK TABLE", nth=1)
            blocker.execute("ROLLBACK")
        with psycopg.connect(crashed, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM memory_migration_live WHERE cutover_at IS NOT NULL"
                                ).fetchone() == (0,)
        final = spawn(args)
        assert final.wait(120) == 0, final.stderr.read().decode() if final.stderr else ""
        with psycopg.connect(crashed, autocommit=True) as conn:
            assert conn.execute(STATE).fetchone() == expected
    finally:
        _drop(server_dsn, crashed)


def _drop(server_dsn: str, dsn: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(str(conninfo_to_dict(dsn)["dbname"]))))
