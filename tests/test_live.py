"""Issue 13: migrate while the application writes; catch up, cut over, clean up, roll back."""

from __future__ import annotations

from pathlib import Path

import psycopg
from livewriter import Writer, checksums, exactness_problems

from unified_memory import fixtures, live
from unified_memory.backup import backup
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.rollback import rollback


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
