"""Issue 5: the validator passes a correct migration, and each way of breaking it fails exactly the right checks."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.backup import backup
from unified_memory.cli import app
from unified_memory.errors import SchemaError
from unified_memory.health import health
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.validate import validate

ONE_ENTRY = "(SELECT id FROM memories WHERE source_table = 'memory_entries' ORDER BY id LIMIT 1)"

# how to break a migrated database -> the checks that must fail (and no other)
BREAKAGES: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "migrated_row_deleted": (("DELETE FROM memories WHERE id = (SELECT id FROM memories "
                              "WHERE source_table = 'memory_items' ORDER BY id LIMIT 1)",),
                             {"reconciliation.counts.memory_items"}),
    "text_altered": (("UPDATE memories SET text = 'tampered' WHERE id = "
                      "(SELECT id FROM memories WHERE source_table = 'memory_entries' ORDER BY id LIMIT 1)",),
                     {"reconciliation.content.memory_entries"}),
    "moved_to_another_tenant": (("UPDATE memories SET user_id = 'intruder' WHERE id = (SELECT id FROM memories "
                                 "WHERE source_table = 'web_ui_memory_entries' ORDER BY id LIMIT 1)",),
                                {"reconciliation.content.web_ui_memory_entries"}),
    "long_term_item_importance_changed": (("UPDATE memories SET importance = 1 + importance % 10 WHERE id = "
                                           "(SELECT id FROM memories WHERE source_table = 'long_term_memory' "
                                           "ORDER BY id LIMIT 1)",),
                                          {"reconciliation.content.long_term_memory"}),
    "rls_not_forced": (("ALTER TABLE memories NO FORCE ROW LEVEL SECURITY",), {"isolation.rls", "schema.drift"}),
    "rls_disabled": (("ALTER TABLE memory_access_log DISABLE ROW LEVEL SECURITY",),
                     {"isolation.rls", "isolation.sessions", "isolation.probes", "schema.drift"}),
    "index_dropped": (("DROP INDEX idx_memories_importance_decay",), {"schema.indexes", "schema.drift"}),
    "function_replaced": (("CREATE OR REPLACE FUNCTION calculate_decay_score(memory_created_at TIMESTAMPTZ, "
                           "memory_neuro_type TEXT DEFAULT 'episodic', memory_importance_score INTEGER DEFAULT 5, "
                           "memory_access_count INTEGER DEFAULT 0) "
                           "RETURNS REAL LANGUAGE sql STABLE AS $$ SELECT 2.0::real $$",),
                          {"functions.decay_score", "schema.drift"}),
    "column_missing": (("ALTER TABLE memory_access_log DROP COLUMN meta",), {"schema.columns", "schema.drift"}),
    "legacy_row_added_after_migration": (("INSERT INTO long_term_memory VALUES ('late', '[{\"content\": \"x\"}]')",),
                                         {"reconciliation.counts.long_term_memory"}),
    "legacy_overload_left": (("CREATE FUNCTION update_memory_access(p_id UUID) RETURNS VOID LANGUAGE sql "
                              "AS $$ SELECT 1 $$",), {"schema.functions"}),
    "check_dropped_then_bad_data": (("ALTER TABLE memories DROP CONSTRAINT memories_importance_range",
                                     "UPDATE memories SET importance = 11 WHERE id = "
                                     "(SELECT id FROM memories WHERE source_table = 'memory_entries' "
                                     "ORDER BY id LIMIT 1)"),
                                    {"schema.constraints", "integrity.importance_range", "schema.drift",
                                     "reconciliation.content.memory_entries"}),
    "expired_on_arrival": (("UPDATE memories SET expires_at = migrated_at - interval '1 day' WHERE id = "
                            "(SELECT id FROM memories WHERE source_table = 'memory_entries' ORDER BY id LIMIT 1)",),
                           {"integrity.expired_on_arrival"}),
    "trigger_disabled": (("ALTER TABLE memories DISABLE TRIGGER update_memories_updated_at",),
                         {"schema.triggers", "functions.version_and_expiry", "schema.drift"}),
    "owner_blanked": (("ALTER TABLE memories DROP CONSTRAINT memories_user_id_not_blank",
                       "UPDATE memories SET user_id = ' ' WHERE id = "
                       "(SELECT id FROM memories WHERE source_table = 'memory_entries' ORDER BY id LIMIT 1)"),
                      {"isolation.owners", "reconciliation.content.memory_entries", "isolation.probes",
                       "schema.drift"}),
}


@pytest.fixture
def migrated(unified: psycopg.Connection) -> psycopg.Connection:
    fixtures.create(unified, rows=400)
    migrate(unified, MigrationOptions(batch_size=150))
    return unified


def test_a_correct_migration_passes_every_check(migrated: psycopg.Connection) -> None:
    report = validate(migrated)
    assert [(c.name, c.message) for c in report.checks if c.status != "pass"] == []
    names = {c.name for c in report.checks}
    assert {"schema.columns", "reconciliation.content.long_term_memory", "isolation.sessions", "indexes.by_user",
            "functions.views", "integrity.expired_on_arrival"} <= names
    assert report.totals["total_memories"] == migrated.execute("SELECT count(*) FROM memories").fetchone()[0]


@pytest.mark.parametrize("breakage", list(BREAKAGES), ids=list(BREAKAGES))
def test_each_breakage_fails_exactly_the_right_checks(migrated: psycopg.Connection, breakage: str) -> None:
    statements, expected = BREAKAGES[breakage]
    for statement in statements:
        migrated.execute(statement)  # type: ignore[call-overload]
    report = validate(migrated)
    failed = {c.name for c in report.failed()}
    assert failed == expected, [(c.name, c.message) for c in report.failed()]
    assert report.status == "fail"
    for check in report.failed():
        assert check.message and "tampered" not in json.dumps(check.to_dict())  # evidence, never memory text


def test_content_difference_is_narrowed_to_the_offending_key(migrated: psycopg.Connection) -> None:
    key = migrated.execute(f"UPDATE memories SET text = 'tampered' WHERE id = {ONE_ENTRY} "  # noqa: S608
                           "RETURNING source_key").fetchone()
    check = next(c for c in validate(migrated).checks if c.name == "reconciliation.content.memory_entries")
    assert key is not None and check.evidence["differing_keys"] == [key[0]]
    assert len(check.evidence["differing_tenants"]) == 1


def test_gone_legacy_tables_reconcile_against_the_backup_manifest(migrated: psycopg.Connection,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "b.umbk"
    manifest = backup(migrated, path)
    migrated.execute("DROP TABLE memory_items CASCADE")
    checks = {c.name: c for c in validate(migrated, manifest=manifest).checks}
    assert checks["reconciliation.counts.memory_items"].status == "pass"
    migrated.execute("DELETE FROM memories WHERE id = (SELECT id FROM memories WHERE source_table = 'memory_items' "
                     "ORDER BY id LIMIT 1)")
    checks = {c.name: c for c in validate(migrated, manifest=manifest).checks}
    assert checks["reconciliation.counts.memory_items"].status == "fail"
    assert checks["reconciliation.counts.memory_items"].evidence == {"manifest_rows": 400, "outcomes": 399}


def test_validate_cli_writes_reports_and_exits_non_zero_on_failure(migrated: psycopg.Connection, dsn: str,
                                                                   tmp_path: Path, home: Path) -> None:
    runner = CliRunner()
    html, md = tmp_path / "report.html", tmp_path / "report.md"
    ok = runner.invoke(app, ["--dsn", dsn, "validate", "--report", str(html)])
    assert ok.exit_code == 0, ok.output
    assert "validation PASS" in ok.output and "<h2>decay tier</h2>" in html.read_text()
    assert (html.stat().st_mode & 0o777) == 0o600
    migrated.execute("ALTER TABLE memories NO FORCE ROW LEVEL SECURITY")
    bad = runner.invoke(app, ["--dsn", dsn, "validate", "--report", str(md), "--format", "markdown"])
    assert bad.exit_code == 10
    assert "| FAIL | `isolation.rls` |" in md.read_text()
    machine = runner.invoke(app, ["--dsn", dsn, "--json", "validate"])
    data = json.loads(machine.stdout.split("\n{\"status\": \"failed\"")[0])
    assert data["status"] == "fail" and data["counts"]["fail"] == 2  # isolation.rls and schema.drift


def test_health_reports_the_guides_queries_and_the_last_run(migrated: psycopg.Connection) -> None:
    result = health(migrated)
    assert result.healthy and result.last_run is not None and result.last_run["status"] == "succeeded"
    assert result.counts["total_memories"] > 0 and result.quality["expired_on_arrival"] == 0
    assert result.quarantined == migrated.execute("SELECT count(*) FROM memory_migration_quarantine").fetchone()[0]
    migrated.execute(f"UPDATE memories SET expires_at = migrated_at WHERE id = {ONE_ENTRY}")  # noqa: S608
    assert not health(migrated).healthy


def test_without_the_schema_validation_fails_clearly_and_health_says_why(conn: psycopg.Connection,
                                                                         tmp_path: Path) -> None:
    fixtures.create(conn, rows=10)
    report = validate(conn)
    assert report.status == "fail" and [c.name for c in report.failed()] == ["schema.tables", "schema.bookkeeping"]
    with pytest.raises(SchemaError, match="schema up"):
        health(conn)
    for mf in schema.discover()[:1]:  # 016 alone: the unified tables, without the migration's bookkeeping
        schema.up(conn, target=mf.version)
    # and without 018's isolation (the access log's non-blank user check and the relationships' policy) and 025's
    # first-implementation index and trigger names
    assert [c.name for c in validate(conn).failed()] == ["schema.constraints", "schema.indexes", "schema.triggers",
                                                         "schema.policies", "schema.bookkeeping"]
