"""Issue 10: one lock protocol. Commands that change state never interleave; a second one waits, then exits 4."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from unified_memory import fixtures, locks, schema
from unified_memory.backup import backup, default_path, verify
from unified_memory.cli import app
from unified_memory.errors import LockBusy
from unified_memory.migrate import MigrationOptions, MigrationRun, migrate


def _slow_migration(dsn: str, started: threading.Event, outcome: list[object]) -> threading.Thread:
    def work() -> None:
        with psycopg.connect(dsn, autocommit=True) as other:
            try:
                outcome.append(migrate(other, MigrationOptions(batch_size=25, pause_ms=60),
                                       progress=lambda *_: started.set()))
            except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
                outcome.append(exc)
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_rollback_during_a_migration_exits_4_and_the_migration_accounts_for_every_row(
        unified: psycopg.Connection, dsn: str, home: Path) -> None:
    fixtures.create(unified, rows=150)
    path = default_path(home / "backups")
    backup(unified, path)
    started, outcome = threading.Event(), list[object]()
    thread = _slow_migration(dsn, started, outcome)
    assert started.wait(60)
    refused = CliRunner().invoke(app, ["--dsn", dsn, "--lock-wait", "0.5", "rollback", "--yes", str(path)])
    thread.join()
    assert refused.exit_code == 4, refused.output
    assert "another migration is running" in refused.output and "unified-memory migrate" in refused.output
    assert "client pid" in refused.output and "since 20" in refused.output
    (run,) = outcome
    assert isinstance(run, MigrationRun), run
    assert run.status == "succeeded" and run.unaccounted == 0
    ledger = unified.execute("SELECT status FROM memory_migration_runs ORDER BY run_id").fetchall()
    assert ledger == [("succeeded",)]
    assert unified.execute("SELECT count(*) FROM memories").fetchone()[0] > 0  # type: ignore[index]


def test_backups_run_beside_a_migration_but_schema_changes_wait_for_it(
        unified: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    fixtures.create(unified, rows=150)
    started, outcome = threading.Event(), list[object]()
    thread = _slow_migration(dsn, started, outcome)
    assert started.wait(60)
    with psycopg.connect(dsn, autocommit=True) as second:
        manifest = backup(second, default_path(tmp_path), lock_wait=0)
        with pytest.raises(LockBusy, match="another migration is running") as info:
            schema.down(second, lock_wait=0.3)
    thread.join()
    assert "waited 0.3 s" in str(info.value)
    assert verify(manifest.path).tables.keys() == manifest.tables.keys()
    assert not isinstance(outcome[0], BaseException), outcome


def test_a_lock_is_released_and_reentrant(unified: psycopg.Connection, dsn: str) -> None:
    with locks.hold(unified, "rollback", 0), locks.hold(unified, "backup", 0):
        name = unified.execute("SELECT current_setting('application_name')").fetchone()
        assert name is not None and str(name[0]).startswith("unified-memory rollback pid=")
        with psycopg.connect(dsn, autocommit=True) as other, pytest.raises(LockBusy, match="another rollback"), \
                locks.hold(other, "backup", 0):
            pass
    with psycopg.connect(dsn, autocommit=True) as other, locks.hold(other, "schema up", 0):
        pass
    assert unified.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                           ).fetchone() == (0,)


def test_vectors_sync_waits_for_a_rollback_then_exits_4(unified: psycopg.Connection, dsn: str, home: Path) -> None:
    with locks.hold(unified, "rollback", 0):
        result = CliRunner().invoke(app, ["--dsn", dsn, "--lock-wait", "0.3", "vectors", "sync", "--dim", "8"])
    assert result.exit_code == 4, result.output
    assert "another rollback is running" in result.output and "vectors sync waited 0.3 s" in result.output


def test_a_runs_rolled_back_status_is_never_overwritten(unified: psycopg.Connection, dsn: str) -> None:
    fixtures.create(unified, rows=100)
    marked = threading.Event()

    def mark_rolled_back(*_: object) -> None:  # an operator marks the ledger by hand while the run goes on
        if not marked.is_set():
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute("UPDATE memory_migration_runs SET status = 'rolled_back' WHERE status = 'running'")
            marked.set()

    with psycopg.connect(dsn, autocommit=True) as runner:
        run = migrate(runner, MigrationOptions(batch_size=30), progress=mark_rolled_back)
    assert run.status == "succeeded" and marked.is_set()
    assert unified.execute("SELECT status FROM memory_migration_runs").fetchall() == [("rolled_back",)]
