"""Issue 14: a database where the first implementation's 016 already ran is adopted, migrated, validated, undone.

The first implementation's schema is built from the facts of ``original-016-in-the-field.md`` by our own SQL
(``tests/fixtures/first_implementation_016.sql``), with application rows and the first migration's copies of
legacy rows (some with NULLs) already in it.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from typer.testing import CliRunner

from unified_memory import adopt, fixtures, schema
from unified_memory.cli import app
from unified_memory.errors import SchemaError
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.validate import validate

FIRST_016 = Path(__file__).parent / "fixtures" / "first_implementation_016.sql"
APP_COLUMNS = ("id", "user_id", "org_id", "text", "importance", "decay_tier", "tags", "meta", "created_at",
               "memory_type", "ui_source", "neuro_type", "access_count", "session_id", "expires_at")
NS = uuid.UUID("3334e2db-51f2-5d45-9545-6fec3e93dfe0")


def build_first_implementation(conn: psycopg.Connection, variant: str) -> None:
    """Legacy tables, the first implementation's 016, its application rows and its copies of legacy rows."""
    fixtures.create(conn, rows=40, shapes={"memory_items": "I1"})
    marker = "'streamlit'," if variant == "with_streamlit" else ""
    conn.execute(FIRST_016.read_text(encoding="utf-8").replace("STREAMLIT_VARIANT", marker).encode())
    # the application's own memories (a chat handler's facts), one with an audit trail and a relationship
    conn.execute(
        "INSERT INTO memories (user_id, text, memory_type, importance, decay_tier, meta, ui_source) VALUES "
        "('alice', 'likes green tea', 'fact', 7, 'long', '{\"type\": \"fact\"}', 'web'), "
        "('alice', 'speaks like a pirate', 'general', 5, 'pinned', '{\"type\": \"persona\"}', 'desktop'), "
        "('bob', 'prefers mornings', 'preference', 3, 'medium', '{\"type\": \"fact\"}', 'api')")
    conn.execute("SELECT update_memory_access(id, 'alice', NULL, 'read') FROM memories WHERE text = 'likes green tea'")
    conn.execute("SELECT create_memory_relationship(a.id, b.id, 'semantic_link') FROM memories a, memories b "
                 "WHERE a.text = 'likes green tea' AND b.text = 'speaks like a pirate'")
    # rows that cannot meet our constraints: kept aside, never dropped
    conn.execute("INSERT INTO memories (user_id, text, tags) VALUES ('carol', '', '[]'), "
                 "('carol', 'tags as a string', '\"one\"')")
    # the first migration's copies: same ids for keyed rows (NULLs where it wrote none), random ids for items
    conn.execute("INSERT INTO memories (id, user_id, text, importance, tags, meta, created_at, memory_type) "
                 "SELECT id, scope, content, NULL, NULL, NULL, created_at, NULL FROM memory_items "
                 "WHERE scope LIKE 'user:%' ORDER BY id LIMIT 15")
    conn.execute("INSERT INTO memories (id, user_id, text, tags, ui_source) "
                 "SELECT id, user_id::text, content, NULL, NULL FROM memory_entries ORDER BY id LIMIT 10")
    conn.execute("INSERT INTO memories (id, user_id, text, tags) SELECT id, user_id::text, content, 'null' "
                 "FROM web_ui_memory_entries WHERE user_id IS NOT NULL ORDER BY id LIMIT 10")
    conn.execute("INSERT INTO memories (user_id, text, decay_tier) "
                 "SELECT user_id, e.item ->> 'content', 'long' FROM long_term_memory, "
                 "jsonb_array_elements(memory_json::jsonb) AS e(item) "
                 "WHERE memory_json LIKE '[{%%' AND user_id IS NOT NULL AND e.item ? 'content' LIMIT 12")


def rows(conn: psycopg.Connection, table: str, columns: tuple[str, ...] | None = None) -> dict[Any, dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 - fixed test table names
    return {r["id"]: {k: v for k, v in r.items() if columns is None or k in columns} for r in found}


def shape(conn: psycopg.Connection) -> dict[str, Any]:
    """The catalog adoption saves; a CHECK read back re-parses with other casts, so they are left out."""
    found = adopt.catalog(conn)
    for c in found["constraints"]:
        c["def"] = re.sub(r"::[a-z ]+(\[\])?|[() ]", "", c["def"].replace(" NOT VALID", ""))
    return found


@pytest.fixture(params=["with_streamlit", "without_streamlit"])
def first(conn: psycopg.Connection, request: pytest.FixtureRequest) -> psycopg.Connection:
    build_first_implementation(conn, request.param)
    return conn


def test_status_recognises_it_and_dry_run_changes_nothing(first: psycopg.Connection) -> None:
    variant = schema.status(first).adoptable
    assert variant in ("with_streamlit", "without_streamlit")
    before_shape, before_rows = shape(first), rows(first, "memories")
    result = schema.up(first, dry_run=True)
    assert result.dry_run and result.adoption is not None
    assert result.adoption["set_aside"] == {"memories: empty_text": 1, "memories: tags_not_array": 1}
    assert result.adoption["claimed"]["memory_items"] == 15
    assert result.adoption["filled"]["memories.importance"] == 15
    assert shape(first) == before_shape and rows(first, "memories") == before_rows
    assert schema.status(first).applied == []


def test_adopt_migrate_validate_and_down(first: psycopg.Connection) -> None:
    found_shape = shape(first)
    found_rows = {t: rows(first, t) for t in adopt.TABLES}
    app_ids = {i for i, r in found_rows["memories"].items() if r["user_id"] in ("alice", "bob")}
    app_before = {i: {k: r[k] for k in APP_COLUMNS} for i, r in found_rows["memories"].items() if i in app_ids}

    result = schema.up(first)
    assert result.adoption is not None and not result.adoption["dry_run"]
    assert [f.split(" ")[0] for f in result.files][:2] == ["016_unified_memory_schema.sql",
                                                            "017_memory_migration_bookkeeping.sql"]
    assert result.adoption["claimed"] == {"memory_items": 15, "memory_entries": 10, "web_ui_memory_entries": 10,
                                          "long_term_memory": 12}
    status = schema.status(first)
    assert status.adopted and not status.pending and status.adoptable is None
    aside = first.execute("SELECT reason, row_image ->> 'text' FROM unified_memory_adoption_aside "
                          "ORDER BY reason").fetchall()
    assert aside == [("empty_text", ""), ("tags_not_array", "tags as a string")]

    run = migrate(first, MigrationOptions())
    assert run.status == "succeeded"
    assert all(acc.unaccounted == 0 for acc in run.accounts.values())
    assert all(acc.duplicates == 0 for acc in run.accounts.values())
    doubled = first.execute("SELECT user_id, text, count(*) FROM memories GROUP BY 1, 2 HAVING count(*) > 1").fetchall()
    assert doubled == []
    legacy_items = first.execute("SELECT count(*) FROM memories WHERE source_table = 'long_term_memory'").fetchone()
    assert legacy_items == (run.accounts["long_term_memory"].migrated,)

    report = validate(first)
    assert report.status == "pass", [(c.name, c.message) for c in report.failed()]

    app_after = {i: {k: r[k] for k in APP_COLUMNS} for i, r in rows(first, "memories").items() if i in app_ids}
    assert app_after == app_before
    assert first.execute("SELECT count(*) FROM memory_access_log").fetchone() == (1,)

    down = schema.down(first, steps=20, force=True)  # the bookkeeping holds rows; 016 is reverted, not dropped
    assert down.reverted is not None
    assert shape(first) == found_shape
    after = {t: rows(first, t) for t in adopt.TABLES}
    for table in adopt.TABLES:
        for key, row in found_rows[table].items():
            assert after[table][key] == row, (table, key)
    assert first.execute("SELECT to_regclass('unified_memory_adoption_aside') IS NULL").fetchone() == (True,)
    assert schema.status(first).adoptable is not None


def test_adoption_is_atomic(first: psycopg.Connection) -> None:
    """A failure inside the conversion leaves the first implementation's schema exactly as it was."""
    found_shape, found_rows = shape(first), rows(first, "memories")
    first.execute("CREATE VIEW app_report AS SELECT calculate_decay_score(created_at) AS s FROM memories")
    with pytest.raises(Exception, match="adopting the first implementation's 016 failed"):
        schema.up(first)
    first.execute("DROP VIEW app_report")
    assert shape(first) == found_shape and rows(first, "memories") == found_rows
    assert schema.status(first).applied == []


def test_the_whole_guide_works_on_an_adopted_database(conn: psycopg.Connection, dsn: str, home: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """schema up (adoption), migrate with its backup, backup verify, validate with vectors, rollback, down."""
    build_first_implementation(conn, "with_streamlit")
    app_ids = {r[0] for r in conn.execute("SELECT id FROM memories WHERE user_id IN ('alice', 'bob')")}
    monkeypatch.setenv("MILVUS_URI", str(tmp_path / "adopted.db"))
    runner = CliRunner()
    plan = runner.invoke(app, ["--dsn", dsn, "schema", "up", "--dry-run"])
    assert plan.exit_code == 0 and "first implementation's 016 found (with_streamlit)" in plan.output, plan.output
    assert schema.status(conn).applied == []
    up = runner.invoke(app, ["--dsn", dsn, "schema", "up"])
    assert up.exit_code == 0 and "016_unified_memory_schema.sql (adopted)" in up.output, up.output
    done = runner.invoke(app, ["--dsn", dsn, "--json", "migrate"])
    assert done.exit_code == 0, done.output
    backups = list((home / "backups").glob("memory_migration_backup_*.umbk"))
    assert len(backups) == 1
    assert runner.invoke(app, ["backup", "verify", backups[0].name]).exit_code == 0
    for command in (["vectors", "up"], ["vectors", "sync"]):
        assert runner.invoke(app, ["--dsn", dsn, "-q", *command]).exit_code == 0
    checked = runner.invoke(app, ["--dsn", dsn, "validate", "--backup", str(backups[0])])
    assert checked.exit_code == 0 and "PASS  vectors.tenant_counts" in checked.output, checked.output
    rolled = runner.invoke(app, ["--dsn", dsn, "rollback", backups[0].name, "--yes"])
    assert rolled.exit_code == 0, rolled.output
    assert conn.execute("SELECT count(*) FROM memories WHERE source_table IS NOT NULL").fetchone() == (0,)
    assert {r[0] for r in conn.execute("SELECT id FROM memories")} >= app_ids  # the application's own stay
    again = runner.invoke(app, ["--dsn", dsn, "migrate", "--no-backup"])
    assert again.exit_code == 0, again.output
    down = runner.invoke(app, ["--dsn", dsn, "schema", "down", "--steps", "20", "--force"])
    assert down.exit_code == 0 and "(adoption undone)" in down.output, down.output


def test_recognised_by_shape_after_its_cleanup_migration_and_an_unknown_table_still_refused(
        conn: psycopg.Connection, new_database: Any) -> None:
    build_first_implementation(conn, "without_streamlit")
    for statement in ("DROP TRIGGER update_memories_updated_at ON memories",
                      "DROP TRIGGER set_memory_defaults_trigger ON memories",
                      "DROP INDEX idx_memory_access_log_user, idx_memory_access_log_type",
                      "DROP INDEX idx_memory_relationships_type",
                      "ALTER TABLE memories DROP CONSTRAINT memories_ui_source_check"):
        conn.execute(statement.encode())
    found_shape, found_rows = shape(conn), rows(conn, "memories")
    assert schema.status(conn).adoptable == "no_ui_source_check"
    assert schema.up(conn).adoption is not None
    assert [c.name for c in validate(conn).failed() if c.name.startswith("schema.")] == []
    schema.down(conn, steps=20, force=True)  # the bookkeeping holds rows; 016 is reverted, not dropped
    assert shape(conn) == found_shape
    after = rows(conn, "memories")
    assert all(after[k] == v for k, v in found_rows.items())

    with psycopg.connect(new_database(), autocommit=True) as other:
        other.execute("CREATE TABLE memories (id uuid PRIMARY KEY, body text)")
        assert schema.status(other).adoptable is None
        with pytest.raises(SchemaError, match="not created by 016"):
            schema.up(other)


def test_source_timezone_reads_the_copies_naive_times_in_that_zone(conn: psycopg.Connection, dsn: str,
                                                                    home: Path) -> None:
    """Legacy copies whose naive TIMESTAMPs were written in New York are claimed with New York times, so the
    migration and validation (in that zone too) reconcile them."""
    zone = "America/New_York"
    build_first_implementation(conn, "without_streamlit")
    runner = CliRunner()
    bad = runner.invoke(app, ["--dsn", dsn, "schema", "up", "--source-timezone", "Mars/Olympus_Mons"])
    assert bad.exit_code == 2 and "unknown time zone" in bad.output, bad.output
    plan = runner.invoke(app, ["--dsn", dsn, "--json", "schema", "up", "--dry-run", "--source-timezone", zone])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["adoption"]["claimed"]["memory_items"] == 15
    assert schema.status(conn).applied == []
    up = runner.invoke(app, ["--dsn", dsn, "schema", "up", "--source-timezone", zone])
    assert up.exit_code == 0 and "016_unified_memory_schema.sql (adopted)" in up.output, up.output
    with conn.cursor(row_factory=dict_row) as cur:
        times = cur.execute(
            "SELECT count(*) FILTER (WHERE m.created_at = s.created_at AT TIME ZONE %(zone)s) AS in_zone, "
            "count(*) FILTER (WHERE m.created_at = s.created_at AT TIME ZONE 'UTC') AS in_utc, count(*) AS copies "
            "FROM memories m JOIN memory_items s ON s.id = m.id WHERE m.source_table = 'memory_items'",
            {"zone": zone}).fetchone()
    assert times == {"in_zone": 15, "in_utc": 0, "copies": 15}
    run = migrate(conn, MigrationOptions(source_timezone=zone))
    assert run.status == "succeeded" and all(acc.duplicates == 0 for acc in run.accounts.values())
    report = validate(conn)
    assert report.status == "pass", [(c.name, c.message) for c in report.failed()]
