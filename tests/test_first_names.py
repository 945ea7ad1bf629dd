"""Issue 14: the first implementation's index and trigger names exist (025), on a fresh and on an adopted database,
without a duplicate index or a second trigger, writes behave as before, and ``schema down`` puts our names back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from roles import APP_ROLE, login_roles
from test_adopt import build_first_implementation

from unified_memory import drift, fixtures, schema
from unified_memory.migrate import MigrationOptions, migrate, rebuild_deferred_indexes

# original-016-in-the-field.md, "Its names"
THEIR_INDEXES = {
    "idx_memories_tenant", "idx_memories_user", "idx_memories_org", "idx_memories_created", "idx_memories_updated",
    "idx_memories_expires", "idx_memories_deleted", "idx_memories_decay_tier", "idx_memories_importance",
    "idx_memories_importance_decay", "idx_memories_tags", "idx_memories_meta", "idx_memories_embedding",
    "idx_memories_session", "idx_memories_conversation", "idx_memories_ui_source", "idx_memories_memory_type",
    "idx_memories_neuro_type", "idx_memories_access_count", "idx_memories_last_accessed", "idx_memories_tenant_type",
    "idx_memories_tenant_importance", "idx_memories_decay_cleanup",
    "idx_memory_access_log_memory", "idx_memory_access_log_user", "idx_memory_access_log_org",
    "idx_memory_access_log_correlation", "idx_memory_access_log_type", "idx_memory_access_log_accessed",
    "idx_memory_relationships_source", "idx_memory_relationships_derived", "idx_memory_relationships_type",
    "idx_memory_relationships_created",
}
THEIR_TRIGGERS = {("memories", "set_memory_defaults_trigger", "set_memory_defaults"),
                  ("memories", "update_memories_updated_at", "memories_before_update"),
                  ("memory_relationships", "update_memory_relationships_updated_at", "update_updated_at_column")}
OUR_016_NAMES = {"idx_memories_user_org", "idx_memories_created_at", "idx_memories_tier_expires",
                 "idx_memories_user_org_type_created", "idx_memory_access_log_time"}
TABLES = ("memories", "memory_access_log", "memory_relationships")


def index_names(conn: psycopg.Connection) -> set[str]:
    with conn.cursor(row_factory=dict_row) as cur:
        return {r["indexname"] for r in cur.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = ANY(%s)",
            [list(TABLES)])}


def triggers(conn: psycopg.Connection) -> set[tuple[str, str, str]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return {(r["table"], r["name"], r["function"]) for r in cur.execute(
            "SELECT c.relname AS table, t.tgname AS name, p.proname AS function FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE NOT t.tgisinternal AND c.relname = ANY(%s) AND c.relnamespace = current_schema()::regnamespace",
            [list(TABLES)])}


def duplicate_indexes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Indexes of one table whose definitions are identical but for the name."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT tablename, array_agg(indexname) AS names FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = ANY(%s) "
            "GROUP BY tablename, regexp_replace(indexdef, '^CREATE (UNIQUE )?INDEX \\S+ ON ', '') "
            "HAVING count(*) > 1", [list(TABLES)]).fetchall()


def function_exists(conn: psycopg.Connection, signature: str) -> bool:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT to_regprocedure(%s) IS NOT NULL AS present", [signature]).fetchone()
    return bool(row and row["present"])


@pytest.fixture
def logins(server_dsn: str) -> Iterator[Callable[[str, str], str]]:
    with login_roles(server_dsn) as make:
        yield make


@pytest.fixture(params=["fresh", "adopted"])
def applied(conn: psycopg.Connection, request: pytest.FixtureRequest) -> psycopg.Connection:
    if request.param == "adopted":
        build_first_implementation(conn, "with_streamlit")
    schema.up(conn)
    return conn


def test_every_name_of_the_first_implementation_exists_once(applied: psycopg.Connection) -> None:
    names = index_names(applied)
    assert names >= THEIR_INDEXES, sorted(THEIR_INDEXES - names)
    assert not names & OUR_016_NAMES  # renamed, not copied
    assert duplicate_indexes(applied) == []
    found = triggers(applied)
    assert found >= THEIR_TRIGGERS
    assert {name for table, name, _ in found if table == "memories"} >= {"set_memory_defaults_trigger",
                                                                         "update_memories_updated_at"}
    assert not {name for _, name, _ in found} & {"memories_before_insert", "memories_before_update"}
    assert function_exists(applied, "set_memory_defaults()") and function_exists(applied, "update_updated_at_column()")
    assert drift.check(applied) == []
    assert schema.up(applied).files == []  # idempotent: nothing pending, nothing changed


def _writes(conn: psycopg.Connection, user: str) -> dict[str, Any]:
    """An insert and updates through the application role; what the triggers did, free of clock values."""
    def step(statement: str, params: list[Any]) -> dict[str, Any]:
        returning = sql.SQL(" RETURNING id, version, decay_lambda, "
                            "round(extract(epoch FROM expires_at - created_at)) AS expiry, updated_at")
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT set_config('app.user_id', %s, true), set_config('app.org_id', '', true)", [user])
            row = cur.execute(sql.SQL(statement) + returning, params).fetchone()
            assert row is not None
            return row

    first = step("INSERT INTO memories (user_id, text, decay_tier, neuro_type) VALUES (%s, 'tea', 'short', "
                 "'semantic')", [user])
    edited = step("UPDATE memories SET text = 'green tea' WHERE id = %s", [first["id"]])
    counted = step("UPDATE memories SET access_count = access_count + 1 WHERE id = %s", [first["id"]])
    tiered = step("UPDATE memories SET decay_tier = 'pinned' WHERE id = %s", [first["id"]])
    return {
        "insert": (first["version"], first["decay_lambda"], first["expiry"]),
        "edit": (edited["version"], edited["updated_at"] is not None
                 and (first["updated_at"] is None or edited["updated_at"] > first["updated_at"])),
        "count": (counted["version"], counted["updated_at"] == edited["updated_at"]),
        "pin": (tiered["version"], tiered["expiry"]),
    }


EXPECTED_WRITES = {"insert": (1, pytest.approx(0.04), 7 * 86400), "edit": (2, True), "count": (2, True),
                   "pin": (3, None)}


def test_writes_through_the_application_role_behave_as_before(conn: psycopg.Connection, dsn: str,
                                                             logins: Callable[[str, str], str]) -> None:
    schema.up(conn, target="024")
    with psycopg.connect(logins(dsn, APP_ROLE), autocommit=True) as app:
        before = _writes(app, "alice")
        schema.up(conn)
        assert "update_memories_updated_at" in {name for _, name, _ in triggers(conn)}
        after = _writes(app, "alice")
    assert before == after == EXPECTED_WRITES


def test_writes_on_an_adopted_database(conn: psycopg.Connection, dsn: str,
                                       logins: Callable[[str, str], str]) -> None:
    build_first_implementation(conn, "without_streamlit")
    schema.up(conn)
    with psycopg.connect(logins(dsn, APP_ROLE), autocommit=True) as app:
        assert _writes(app, "alice") == EXPECTED_WRITES


def test_down_past_025_restores_our_names_and_up_gives_theirs_again(unified: psycopg.Connection) -> None:
    down = schema.down(unified, steps=2)  # 026, then 025
    assert down.files == ["026_inline_legacy_ids.down.sql", "025_first_implementation_names.down.sql"]
    names = index_names(unified)
    assert names >= OUR_016_NAMES and not names & (THEIR_INDEXES - {
        "idx_memories_user", "idx_memories_org", "idx_memories_importance_decay", "idx_memories_tags",
        "idx_memories_meta", "idx_memories_last_accessed", "idx_memories_decay_cleanup",
        "idx_memory_access_log_memory", "idx_memory_access_log_user", "idx_memory_access_log_org",
        "idx_memory_access_log_correlation", "idx_memory_relationships_source", "idx_memory_relationships_derived",
        "idx_memory_relationships_type", "idx_memory_relationships_created"})  # the names 016 shares with it
    assert triggers(unified) >= {("memories", "memories_before_insert", "memories_before_insert"),
                                 ("memories", "memories_before_update", "memories_before_update")}
    assert not function_exists(unified, "set_memory_defaults()")
    assert drift.check(unified) == []
    assert schema.up(unified).files == ["025_first_implementation_names.sql", "026_inline_legacy_ids.sql"]
    assert index_names(unified) >= THEIR_INDEXES and drift.check(unified) == []
    schema.down(unified, steps=20, force=True)  # every down file, in reverse order, with 025's names
    assert index_names(unified) == set() and not function_exists(unified, "memories_before_insert()")


def test_a_load_on_an_empty_memories_rebuilds_the_indexes_under_their_names(conn: psycopg.Connection) -> None:
    fixtures.create(conn, rows=30)
    schema.up(conn)
    run = migrate(conn, MigrationOptions())
    assert run.status == "succeeded" and run.rebuilt_indexes > 0  # the deferred-index path ran
    assert index_names(conn) >= THEIR_INDEXES and not index_names(conn) & OUR_016_NAMES
    assert duplicate_indexes(conn) == [] and drift.check(conn) == []


def test_025_applied_while_a_load_has_deferred_the_indexes(conn: psycopg.Connection) -> None:
    """A load that dropped the indexes under 016's names, interrupted; 025 applied; the load's rebuild."""
    schema.up(conn, target="024")
    conn.execute("INSERT INTO memory_migration_deferred_indexes (index_name, definition) SELECT indexname, indexdef "
                 "FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'memories' "
                 "AND left(indexname, 13) = 'idx_memories_'")
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute("SELECT index_name FROM memory_migration_deferred_indexes").fetchall():
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(row["index_name"])))
    assert drift.check(conn) == []  # deferred by a load: not drift
    schema.up(conn)
    assert drift.check(conn) == []
    with conn.cursor(row_factory=dict_row) as cur:
        deferred = {r["index_name"] for r in cur.execute("SELECT index_name FROM memory_migration_deferred_indexes")}
    assert "idx_memories_tenant" in deferred and not deferred & OUR_016_NAMES
    assert rebuild_deferred_indexes(conn) == len(deferred)
    assert index_names(conn) >= THEIR_INDEXES and not index_names(conn) & OUR_016_NAMES
    assert duplicate_indexes(conn) == [] and drift.check(conn) == []


def test_025_applied_with_psql_is_recorded_without_drift_and_repaired_under_its_names(
        conn: psycopg.Connection) -> None:
    schema.up(conn, target="024")
    file = next(mf for mf in schema.discover() if mf.version == "025")
    conn.execute(file.path.read_text(encoding="utf-8"))  # as `psql -f` would: outside the runner
    assert "025_first_implementation_names.sql (recorded: applied outside the runner)" in schema.up(conn).files
    assert drift.check(conn) == []  # the renamed objects are 025's; 016's names it replaced are not expected
    conn.execute("DROP INDEX idx_memories_tenant")
    conn.execute("DROP TRIGGER update_memories_updated_at ON memories")
    assert {(d.kind, d.name, d.version) for d in drift.check(conn)} == {
        ("index", "idx_memories_tenant", "025"), ("trigger", "memories.update_memories_updated_at", "025")}
    with conn.transaction():
        drift.repair(conn)
    assert index_names(conn) >= THEIR_INDEXES and triggers(conn) >= THEIR_TRIGGERS
    assert duplicate_indexes(conn) == [] and drift.check(conn) == []
    assert not {"idx_memories_user_org", "idx_memories_created_at"} & index_names(conn)
