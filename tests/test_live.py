"""Issue 13: migrate while the application writes; catch up, cut over, clean up, roll back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psycopg
import pytest
from livewriter import TABLES, Writer, checksums, exactness_problems

from unified_memory import fixtures, live
from unified_memory.backup import backup, verify
from unified_memory.cutover import CleanupRefused, cleanup, cutover
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.rollback import rollback
from unified_memory.validate import validate


def _outcomes(run: object) -> dict[str, int]:
    return {t: a.unaccounted for t, a in run.accounts.items()}  # type: ignore[attr-defined]


def test_changes_during_migrate_reach_memories_exactly_then_rollback_keeps_the_apps_rows(
        dsn: str, unified: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(unified, rows=1500)
    path = tmp_path / "before.umbk"
    writer = Writer(dsn, rate=300)
    writer.start()
    try:
        first = migrate(unified, MigrationOptions(batch_size=100, pause_ms=20),
                        before_first_write=lambda c: backup(c, path))
    finally:
        writer.stop()
    assert first.status == "succeeded" and first.catch_up is not None and first.catch_up.changes > 0
    assert all(n >= 0 for a in first.accounts.values() for n in (a.unaccounted, a.migrated, a.retired))
    assert min(writer.counts[op] for op in "IUD") > 20, writer.counts
    assert not writer.errors
    second = migrate(unified, MigrationOptions(batch_size=100))  # catches up what came after the first one
    assert second.unaccounted == 0 and live.lag(unified).waiting == 0
    assert exactness_problems(unified) == {}
    assert {a.waiting for a in second.accounts.values()} == {0}
    app_left = checksums(unified)
    result = rollback(unified, path, yes=True)
    assert {r.action for r in result.tables.values()} == {"kept"}
    assert checksums(unified) == app_left
    assert unified.execute("SELECT count(*) FROM memories WHERE source_table IS NOT NULL").fetchone() == (0,)
    assert live.lag(unified).capturing == () and unified.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'memory_migration%'").fetchone() == (0,)


def test_cutover_makes_legacy_read_only_then_cleanup_and_a_rollback_of_its_backup(
        dsn: str, unified: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(unified, rows=600)
    writer = Writer(dsn, rate=200, seed=3)
    writer.start()
    try:
        migrate(unified, MigrationOptions(batch_size=100, pause_ms=10))
        migrate(unified, MigrationOptions(batch_size=100))
        result = cutover(unified)
        time.sleep(0.3)
    finally:
        writer.stop()
    assert result.tables and set(result.tables) == set(checksums(unified))
    assert writer.errors and {e.split()[0] for e in writer.errors} == {"25006"}, writer.errors[:3]
    assert exactness_problems(unified) == {}
    assert live.lag(unified) == live.Lag(0, None, 0, (), tuple(sorted(result.tables)))
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        unified.execute("DELETE FROM memory_entries")
    at_cutover = checksums(unified)
    final = tmp_path / "final.umbk"
    with pytest.raises(CleanupRefused, match="--yes"):
        cleanup(unified, final)
    with pytest.raises(CleanupRefused, match="last validation"):  # 023 records validations: one must pass first
        cleanup(unified, final, yes=True)
    assert validate(unified).status == "pass"
    unified.execute("CREATE VIEW app_view AS SELECT id FROM memory_items")
    with pytest.raises(CleanupRefused, match="app_view"):
        cleanup(unified, final, yes=True)
    unified.execute("DROP VIEW app_view")
    done = cleanup(unified, final, yes=True)
    assert set(done.tables) == set(at_cutover) and checksums(unified) == {}
    report = validate(unified, manifest=verify(final))  # outcomes of the dropped tables against the final backup
    assert [c.name for c in report.failed() if c.name.startswith("reconciliation")] == []
    restored = rollback(unified, final, yes=True)
    assert {r.action for r in restored.tables.values()} == {"restored"}
    assert checksums(unified) == at_cutover
    assert unified.execute("SELECT count(*) FROM memories WHERE source_table IS NOT NULL").fetchone() == (0,)
    unified.execute("DELETE FROM memory_entries")  # the restored tables are writable again


def test_cleanup_refuses_before_cutover(unified: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(unified, rows=50)
    migrate(unified)
    with pytest.raises(CleanupRefused, match="not cut over"):
        cleanup(unified, tmp_path / "final.umbk", yes=True)
    assert not (tmp_path / "final.umbk").exists()


def test_a_memory_changed_in_the_unified_store_is_never_overwritten(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=50)
    migrate(unified)
    key = unified.execute("SELECT id::text FROM memory_entries ORDER BY id LIMIT 1").fetchone()
    assert key is not None
    unified.execute("UPDATE memories SET text = 'the app edited this' WHERE source_table = 'memory_entries' "
                    "AND source_key = %s", key)
    unified.execute("UPDATE memory_entries SET content = 'an older legacy edit' WHERE id::text = %s", key)
    run = migrate(unified)
    assert run.catch_up is not None and run.catch_up.conflicts == 1 and run.unaccounted == 0
    assert unified.execute("SELECT text FROM memories WHERE source_key = %s", key).fetchone() == (
        "the app edited this",)
    assert unified.execute("SELECT source_key, op FROM memory_migration_conflicts").fetchall() == [(key[0], "U")]
    assert live.lag(unified).conflicts == 1


def test_cli_follow_until_idle_then_health_shows_the_lag_then_cutover(
        dsn: str, unified: psycopg.Connection, home: Path) -> None:
    from typer.testing import CliRunner

    from unified_memory.cli import app

    fixtures.create(unified, rows=100)
    runner = CliRunner()
    writer = Writer(dsn, rate=100, seed=5)
    writer.start()
    stopper = threading.Timer(3.0, writer.stop)  # the application pauses: --until-idle ends the follow
    stopper.start()
    try:
        follow = runner.invoke(app, ["--dsn", dsn, "migrate", "--no-backup", "--follow", "--until-idle", "1"])
        assert follow.exit_code == 0, follow.output
        assert "lag: " in follow.output and "catch-up:" in follow.output
    finally:
        stopper.cancel()
        writer.stop()
    assert writer.counts["I"] > 10
    health = runner.invoke(app, ["--dsn", dsn, "--json", "health"])
    assert json.loads(health.stdout)["live"]["waiting"] == 0
    assert exactness_problems(unified) == {}
    late = Writer(dsn, seed=6)
    for n in range(1, 41):  # the application writes on after the follow stopped
        late.write(unified, TABLES[n % 4], "IUD"[(n // 4) % 3], n)
    health = runner.invoke(app, ["--dsn", dsn, "--json", "health"])
    waiting = json.loads(health.stdout)["live"]["waiting"]
    assert waiting == sum(late.counts[op] for op in "IUD") > 10 and json.loads(health.stdout)["live"]["capturing"]
    done = runner.invoke(app, ["--dsn", dsn, "--json", "cutover"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["catch_up_before_lock"]["changes"] == waiting
    assert exactness_problems(unified) == {}
    health = runner.invoke(app, ["--dsn", dsn, "--json", "health"])
    assert json.loads(health.stdout)["live"] == {"waiting": 0, "oldest_seconds": None, "conflicts": 0,
                                                  "capturing": [], "cut_over": sorted(checksums(unified))}
    refused = runner.invoke(app, ["--dsn", dsn, "cleanup"])
    assert refused.exit_code == 9 and "--yes" in refused.output


def test_truncate_of_a_captured_table_retires_its_memories(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=60)
    migrate(unified)
    unified.execute("TRUNCATE memory_entries, long_term_memory")
    run = migrate(unified)
    assert run.unaccounted == 0 and exactness_problems(unified) == {}
    assert unified.execute("SELECT count(*) FROM memories WHERE source_table IN ('memory_entries', "
                           "'long_term_memory') AND deleted_at IS NULL").fetchone() == (0,)
