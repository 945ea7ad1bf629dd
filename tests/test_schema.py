"""Issue 2: the unified schema (016) and the migration manager, against a real PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from catalog import snapshot
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.cli import app
from unified_memory.errors import LockBusy, SchemaError

SHAPES = [
    {"memory_items": "I1"}, {"memory_items": "I2"}, {"memory_items": "I3"},
    {"memory_entries": "E1"}, {"memory_entries": "E2"},
]


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    import pgserver._commands as commands

    return str(commands.POSTGRES_BIN_PATH / "psql")


def _psql_apply(dsn: str, path: Path) -> None:
    done = subprocess.run([_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_applies_on_an_empty_database_twice_and_the_second_time_changes_nothing(
        dsn: str, conn: psycopg.Connection) -> None:
    first = schema.up(conn)
    assert first.files[:2] == ["016_unified_memory_schema.sql", "017_memory_migration_bookkeeping.sql"]
    assert first.files == [f.path.name for f in schema.discover()]
    before = snapshot(conn)
    assert schema.up(conn).files == []
    for mf in schema.discover():
        if mf.version in _RENAMED_BY_018:
            continue
        _psql_apply(dsn, mf.path)  # by hand, with psql, over the tool's run
    assert snapshot(conn) == before
    assert any(r[1] == "memories" for r in before["relations"])


# 018 renames the parameters of three functions 016 creates (the first implementation's names), and a
# parameter cannot be renamed by CREATE OR REPLACE: 016 re-run by hand over 018 stops there and changes nothing.
_RENAMED_BY_018 = ("016",)


def test_016_run_again_by_hand_over_018_is_refused_and_changes_nothing(dsn: str, unified: psycopg.Connection) -> None:
    before = snapshot(unified)
    done = subprocess.run([_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f",
                           str(schema.discover()[0].path)], capture_output=True, text=True)
    assert done.returncode != 0 and "cannot change name of input parameter" in done.stderr
    assert snapshot(unified) == before


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "-".join(s.values()))
def test_applies_over_every_legacy_shape_by_tool_and_by_psql(new_database: Callable[[], str],
                                                             shapes: dict[str, str]) -> None:
    by_psql, by_tool = new_database(), new_database()
    with psycopg.connect(by_psql, autocommit=True) as conn, psycopg.connect(by_tool, autocommit=True) as tool:
        fixtures.create(conn, rows=50, shapes=shapes)
        fixtures.create(tool, rows=50, shapes=shapes)
        for mf in schema.discover():
            _psql_apply(by_psql, mf.path)
            _psql_apply(by_psql, mf.path)
        after_psql = snapshot(conn)
        schema.up(tool)
        assert snapshot(tool) == after_psql
        assert conn.execute("SELECT count(*) FROM memory_items").fetchone() == (50,)


def test_i2_conflicting_objects_are_displaced_with_their_data_and_the_result_works(
        conn: psycopg.Connection) -> None:
    fixtures.create(conn, rows=20, shapes={"memory_items": "I2"})
    conn.execute("INSERT INTO memory_relationships (source_memory_id, derived_memory_id, relationship_type) "
                 "SELECT a.id, b.id, 'reflection' FROM memory_items a, memory_items b WHERE a.id < b.id LIMIT 3")
    schema.up(conn)
    displaced = conn.execute("SELECT count(*) FROM unified_memory_displaced.memory_relationships").fetchone()
    assert displaced == (3,)
    a, b = (conn.execute("INSERT INTO memories (user_id, text) VALUES ('u1', 'x'), ('u1', 'y') RETURNING id")
            .fetchall())
    conn.execute("SELECT create_memory_relationship(%s, %s, 'reflection')", [a[0], b[0]])
    conn.execute("SELECT update_memory_access(%s)", [a[0]])  # one argument: not ambiguous any more
    assert conn.execute("SELECT access_count FROM memories WHERE id = %s", [a[0]]).fetchone() == (1,)
    view_sources = conn.execute(
        "SELECT DISTINCT v.relname, t.relname FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid "
        "JOIN pg_class v ON v.oid = r.ev_class JOIN pg_class t ON t.oid = d.refobjid "
        "WHERE v.relname IN ('active_memories_with_decay', 'memory_relationship_details') "
        "AND v.relnamespace = 'public'::regnamespace AND t.relkind = 'r'").fetchall()
    assert {t for _, t in view_sources} == {"memories", "memory_relationships"}


@pytest.mark.parametrize("shapes", [{}, {"memory_items": "I2"}], ids=["empty", "I2"])
def test_up_then_down_leaves_the_catalog_as_it_was(conn: psycopg.Connection, shapes: dict[str, str]) -> None:
    if shapes:
        fixtures.create(conn, rows=10, shapes=shapes)
    before = snapshot(conn)
    schema.up(conn)
    assert snapshot(conn) != before
    schema.down(conn, steps=len(schema.discover()))
    assert snapshot(conn) == before


def test_down_refuses_to_drop_memories_with_rows_unless_forced(unified: psycopg.Connection) -> None:
    unified.execute("INSERT INTO memories (user_id, text) VALUES ('u', 'keep me')")
    schema.down(unified, steps=len(schema.discover()) - 1)  # every file after 016: no memories dropped
    with pytest.raises(SchemaError, match=r"memories \(1 rows: memories"):
        schema.down(unified, steps=1)
    assert unified.execute("SELECT count(*) FROM memories").fetchone() == (1,)
    schema.down(unified, steps=1, force=True)
    assert unified.execute("SELECT to_regclass('memories')").fetchone() == (None,)


def test_decay_score_never_overflows_and_views_still_answer(unified: psycopg.Connection) -> None:
    unified.execute(
        "INSERT INTO memories (user_id, text, neuro_type, importance, access_count, created_at, decay_tier) VALUES "
        "('u', 'old and loved', 'episodic', 10, 50, now() - interval '365 days', 'pinned'),"
        "('u', 'ancient', 'semantic', 1, 0, now() - interval '40 years', 'pinned'),"
        "('u', 'fresh', 'procedural', 5, 0, now(), 'short')")
    scores = [r[0] for r in unified.execute(
        "SELECT calculate_decay_score(created_at, neuro_type, importance, access_count) FROM memories ORDER BY text")]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert unified.execute("SELECT count(*) FROM active_memories_with_decay").fetchone() == (3,)
    assert unified.execute("SELECT sum(memory_count) FROM memory_analytics_by_tenant").fetchone() == (3,)
    volatility = unified.execute(
        "SELECT proname, provolatile FROM pg_proc WHERE proname IN ('calculate_decay_score', 'calculate_expires_at') "
        "AND pronamespace = 'public'::regnamespace").fetchall()
    assert {v for _, v in volatility} == {"s"}  # STABLE, never IMMUTABLE


def test_triggers_lambda_expiry_version_and_audit_survival(unified: psycopg.Connection) -> None:
    row = unified.execute(
        "INSERT INTO memories (user_id, text, neuro_type, decay_tier) VALUES ('u', 't', 'semantic', 'short') "
        "RETURNING id, decay_lambda, expires_at - created_at, version").fetchone()
    assert row is not None
    mid = row[0]
    assert row[1] == pytest.approx(0.04) and str(row[2]) == "7 days, 0:00:00" and row[3] == 1
    moved = unified.execute("UPDATE memories SET decay_tier = 'long' WHERE id = %s "
                            "RETURNING expires_at > now() + interval '179 days', version", [mid]).fetchone()
    assert moved == (True, 2)
    assert unified.execute("UPDATE memories SET decay_tier = 'pinned' WHERE id = %s RETURNING expires_at, version",
                           [mid]).fetchone() == (None, 3)
    assert unified.execute("UPDATE memories SET neuro_type = 'procedural' WHERE id = %s RETURNING decay_lambda",
                           [mid]).fetchone() == (pytest.approx(0.02),)
    unified.execute("SELECT update_memory_access(%s, 'u', NULL, 'read')", [mid])
    assert unified.execute("SELECT version, access_count FROM memories WHERE id = %s", [mid]).fetchone() == (4, 1)
    assert unified.execute("SELECT soft_delete_memory(%s, 'u')", [mid]).fetchone() == (True,)
    assert unified.execute("SELECT soft_delete_memory(%s, 'u')", [mid]).fetchone() == (False,)
    unified.execute("DELETE FROM memories WHERE id = %s", [mid])
    trail = unified.execute("SELECT access_type FROM memory_access_log WHERE memory_id = %s ORDER BY accessed_at",
                            [mid]).fetchall()
    assert sorted(t[0] for t in trail) == ["delete", "read"]


def test_relationship_function_links_both_sides(unified: psycopg.Connection) -> None:
    a, b = unified.execute("INSERT INTO memories (user_id, text) VALUES ('u', 'a'), ('u', 'b') RETURNING id").fetchall()
    rid = unified.execute("SELECT create_memory_relationship(%s, %s, 'consolidation', 0.5)", [a[0], b[0]]).fetchone()
    again = unified.execute("SELECT create_memory_relationship(%s, %s, 'consolidation', 0.7)", [a[0], b[0]]).fetchone()
    assert rid == again
    assert unified.execute("SELECT derived_memories FROM memories WHERE id = %s", [a[0]]).fetchone() == ([str(b[0])],)
    assert unified.execute("SELECT source_memories FROM memories WHERE id = %s", [b[0]]).fetchone() == ([str(a[0])],)
    with pytest.raises(psycopg.errors.CheckViolation):
        unified.execute("SELECT create_memory_relationship(%s, %s, 'reflection')", [a[0], a[0]])
    details = unified.execute("SELECT source_text, derived_text FROM memory_relationship_details").fetchall()
    assert details == [("a", "b")]


def test_row_level_security_isolates_tenants(unified: psycopg.Connection) -> None:
    unified.execute("INSERT INTO memories (user_id, org_id, text) VALUES ('A', NULL, 'a1'), ('A', 'acme', 'a2'), "
                    "('B', NULL, 'b1')")
    unified.execute("SELECT update_memory_access(id) FROM memories")
    with unified.transaction(force_rollback=True):
        unified.execute("SET LOCAL ROLE unified_memory_app")
        assert unified.execute("SELECT count(*) FROM memories").fetchone() == (0,)  # unset: fails closed
        unified.execute("SELECT set_config('app.user_id', 'A', true)")
        assert [r[0] for r in unified.execute("SELECT text FROM memories")] == ["a1"]
        assert unified.execute("SELECT count(*) FROM memory_access_log").fetchone() == (1,)
        assert unified.execute("SELECT count(*) FROM active_memories_with_decay WHERE user_id = 'B'").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), unified.transaction():
            unified.execute("INSERT INTO memories (user_id, text) VALUES ('B', 'forged')")
        assert unified.execute("UPDATE memories SET text = 'x' WHERE user_id = 'B'").rowcount == 0
        unified.execute("SELECT set_config('app.org_id', 'acme', true)")
        assert [r[0] for r in unified.execute("SELECT text FROM memories")] == ["a2"]
    flags = unified.execute("SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
                            "WHERE relname IN ('memories', 'memory_access_log') ORDER BY 1").fetchall()
    assert flags == [("memories", True, True), ("memory_access_log", True, True)]


def test_edited_applied_file_is_refused(conn: psycopg.Connection, tmp_path: Path) -> None:
    for mf in schema.discover():
        shutil.copy(mf.path, tmp_path / mf.path.name)
    schema.up(conn, directory=tmp_path)
    target = tmp_path / "017_memory_migration_bookkeeping.sql"
    target.write_text(target.read_text() + "\n-- edited\n")
    with pytest.raises(SchemaError, match="edited"):
        schema.up(conn, directory=tmp_path)
    assert schema.status(conn, directory=tmp_path).edited == ["017_memory_migration_bookkeeping.sql"]


def test_broken_file_names_file_and_line_and_leaves_nothing(conn: psycopg.Connection, tmp_path: Path) -> None:
    (tmp_path / "001_good.sql").write_text("BEGIN;\nCREATE TABLE good (id int);\nCOMMIT;\n")
    (tmp_path / "002_broken.sql").write_text(
        "BEGIN;\nCREATE TABLE half (id int);\n-- a comment; with a semicolon\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\nSELEC oops;\nCOMMIT;\n")
    with pytest.raises(SchemaError) as info:
        schema.up(conn, directory=tmp_path)
    assert info.value.file == "002_broken.sql" and info.value.line == 5
    state = conn.execute("SELECT to_regclass('good') IS NOT NULL, to_regclass('half') IS NULL").fetchone()
    assert state == (True, True)
    assert schema.status(conn, directory=tmp_path).pending == ["002_broken.sql"]


def test_concurrent_runs_never_both_apply(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "001_slow.sql").write_text("CREATE TABLE slow (id int);\nSELECT pg_sleep(1.5);\n")
    results: list[object] = []

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            try:
                results.append(schema.up(c, directory=tmp_path, lock_wait=0.3).files)
            except LockBusy as exc:
                results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) == sorted([str(["001_slow.sql"]), str(next(r for r in results
                                                                                   if isinstance(r, LockBusy)))])


def test_lock_timeout_is_retried_then_reported(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "001_alter.sql").write_text("ALTER TABLE busy ADD COLUMN extra int;\n")
    with psycopg.connect(dsn, autocommit=True) as holder, psycopg.connect(dsn, autocommit=True) as runner:
        holder.execute("CREATE TABLE busy (id int)")
        with holder.transaction():
            holder.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(LockBusy, match="stayed locked"):
                schema.up(runner, directory=tmp_path, lock_timeout_ms=50, retries=2)
        assert schema.up(runner, directory=tmp_path, lock_timeout_ms=50, retries=2).files == ["001_alter.sql"]


def test_down_refuses_to_drop_the_migrations_bookkeeping_with_rows_naming_what_would_be_lost(
        dsn: str, unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=60)
    unified.execute("INSERT INTO memory_items (id, content, scope, kind) VALUES (gen_random_uuid(), 'x', 'convo:1', "
                    "'fact')")  # no owner: quarantined
    from unified_memory.migrate import migrate

    migrate(unified)
    before = snapshot(unified)
    result = CliRunner().invoke(app, ["--dsn", dsn, "schema", "down", "--steps", str(len(schema.discover()) - 1)])
    assert result.exit_code == 5, result.output
    for table, what in [("memory_migration_quarantine", "quarantined legacy rows"),
                        ("memory_migration_runs", "the migration's run ledger"),
                        ("memory_legacy_embeddings", "kept legacy vectors")]:
        assert f"{table} (" in result.output and what in result.output
    assert snapshot(unified) == before
    forced = CliRunner().invoke(app, ["--dsn", dsn, "schema", "down", "--force", "--steps",
                                      str(len(schema.discover()) - 1)])
    assert forced.exit_code == 0, forced.output
    assert unified.execute("SELECT to_regclass('memory_migration_runs')").fetchone() == (None,)
