"""Issue 14: a schema that drifted after it was applied is reported by ``schema status`` and ``validate`` and
brought back by ``schema repair`` (atomic, idempotent, recorded), on a fresh and on an adopted database."""

from __future__ import annotations

import json

import psycopg
import pytest
from test_adopt import build_first_implementation
from typer.testing import CliRunner

from unified_memory import drift, schema
from unified_memory.cli import app
from unified_memory.errors import SchemaError
from unified_memory.validate import validate

# what the first implementation's later cleanup migration did, and some more
BREAK = (
    "DROP TRIGGER set_memory_defaults_trigger ON memories",
    "DROP TRIGGER update_memories_updated_at ON memories",
    "DROP INDEX idx_memories_tenant",
    "DROP INDEX idx_memory_access_log_user, idx_memory_access_log_org, idx_memory_relationships_type",
    "DROP INDEX idx_memories_tags, idx_memories_meta",
    "ALTER TABLE memories NO FORCE ROW LEVEL SECURITY",
    "CREATE OR REPLACE VIEW memory_audit_summary AS SELECT user_id, org_id, access_type, "
    "date_trunc('day', accessed_at) AS access_day, count(*) AS access_count, count(DISTINCT memory_id) AS "
    "distinct_memories, avg(processing_time_ms)::numeric(14, 2) AS avg_processing_time_ms, 0::bigint AS error_count, "
    "date_trunc('day', accessed_at)::date AS access_date, count(DISTINCT memory_id) AS unique_memories_accessed "
    "FROM memory_access_log GROUP BY 1, 2, 3, 4",
)
NAMES = {"trigger memories.set_memory_defaults_trigger", "trigger memories.update_memories_updated_at",
         "index idx_memories_tenant", "index idx_memory_access_log_user", "index idx_memory_access_log_org",
         "index idx_memories_tags", "index idx_memories_meta", "index idx_memory_relationships_type", "rls memories",
         "view memory_audit_summary"}


def _drifted(conn: psycopg.Connection) -> set[str]:
    return {f"{d['kind']} {d['name']}" for d in schema.status(conn).drift}


@pytest.fixture(params=["fresh", "adopted"])
def applied(conn: psycopg.Connection, request: pytest.FixtureRequest) -> psycopg.Connection:
    if request.param == "adopted":
        build_first_implementation(conn, "without_streamlit")
    schema.up(conn)
    return conn


def test_status_and_validate_name_what_drifted_and_repair_brings_it_back(applied: psycopg.Connection) -> None:
    assert _drifted(applied) == set() and schema.status(applied).untracked == []
    for statement in BREAK:
        applied.execute(statement.encode())
    assert _drifted(applied) == NAMES
    report = validate(applied)
    failed = {c.name: c for c in report.failed()}
    assert {"schema.drift", "schema.triggers", "schema.indexes"} <= set(failed)
    missing = "trigger update_memories_updated_at on memories is missing"
    assert missing in failed["schema.triggers"].evidence["problems"]
    assert "index idx_memories_tenant is missing" in failed["schema.indexes"].evidence["problems"]
    assert all(name in " ".join(failed["schema.drift"].evidence["problems"]) for name in NAMES)
    assert schema.up(applied).files == []  # nothing pending: up alone cannot bring them back

    repaired = schema.repair(applied)
    assert {r.split(" (")[0] for r in repaired.files} == NAMES
    assert _drifted(applied) == set()
    assert schema.repair(applied).files == []  # idempotent
    report = validate(applied)  # (the legacy rows are not migrated here: only the schema is judged)
    assert [c.name for c in report.failed() if c.name.startswith(("schema.", "isolation.", "functions."))] == []
    repairs = applied.execute("SELECT repairs FROM unified_memory_schema_migrations WHERE repairs IS NOT NULL"
                              ).fetchall()
    assert {o["name"] for (r,) in repairs for entry in r for o in entry["objects"]} == {n.split(" ")[1] for n in NAMES}
    row = applied.execute("INSERT INTO memories (user_id, text, decay_tier) VALUES ('u', 't', 'short') "
                          "RETURNING decay_lambda IS NOT NULL AND expires_at IS NOT NULL").fetchone()
    assert row == (True,)  # the insert trigger works again


def test_repair_is_atomic(unified: psycopg.Connection) -> None:
    unified.execute("DROP INDEX idx_memories_tags")
    unified.execute("ALTER TABLE memories DROP CONSTRAINT memories_text_not_empty")
    unified.execute("INSERT INTO memories (user_id, text) VALUES ('u', '')")  # the constraint cannot come back
    with pytest.raises(SchemaError, match="repair failed, nothing was changed"):
        schema.repair(unified)
    assert {f"{d.kind} {d.name}" for d in drift.check(unified)} == {"index idx_memories_tags",
                                                                   "constraint memories.memories_text_not_empty"}


def test_cli_status_and_repair(unified: psycopg.Connection, dsn: str, home: object) -> None:
    unified.execute("DROP TRIGGER update_memories_updated_at ON memories")
    unified.execute("DROP INDEX idx_memories_tenant")
    runner = CliRunner()
    status = runner.invoke(app, ["--dsn", dsn, "schema", "status"])
    assert status.exit_code == 0
    assert "DRIFT    trigger memories.update_memories_updated_at of 025 is missing" in status.output
    assert "DRIFT    index idx_memories_tenant of 025 is missing" in status.output
    repaired = runner.invoke(app, ["--dsn", dsn, "--json", "schema", "repair"])
    assert repaired.exit_code == 0, repaired.output
    assert sorted(json.loads(repaired.output)["files"]) == [
        "index idx_memories_tenant (025) is missing", "trigger memories.update_memories_updated_at (025) is missing"]
    assert drift.check(unified) == []
