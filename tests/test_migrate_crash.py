"""Issue 3: SIGKILL at several points of a migration, then a re-run, ends exactly as an uninterrupted run."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from crash import kill_when, spawn

from unified_memory import fixtures, schema
from unified_memory.migrate import MigrationOptions, migrate

ROWS = 1500
STATE = (
    "SELECT (SELECT md5(string_agg(row(m.id, m.user_id, m.org_id, m.text, m.importance, m.decay_tier, m.tags, m.meta, "
    "CASE WHEN m.meta -> 'legacy' ? 'created_at_missing' THEN NULL ELSE m.created_at END, "
    "m.memory_type, m.ui_source, m.neuro_type, "
    "m.source_table, m.source_key, m.session_id)::text, "
    "'|' ORDER BY m.id)) FROM memories m), "
    "(SELECT md5(string_agg(row(q.source_table, q.source_key, q.reason, q.sqlstate, q.duplicate_of, q.raw_row)::text, "
    "'|' ORDER BY q.source_table, q.source_key)) FROM memory_migration_quarantine q), "
    "(SELECT count(*) FROM memories), (SELECT count(*) FROM memory_legacy_embeddings), "
    "(SELECT count(*) FROM pg_indexes WHERE tablename = 'memories')"
)


def _prepared(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=ROWS)
        schema.up(conn)


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_an_uninterrupted_run(new_database: Callable[[], str]) -> None:
    reference, crashed = new_database(), new_database()
    _prepared(reference)
    _prepared(crashed)
    with psycopg.connect(reference, autocommit=True) as conn:
        migrate(conn, MigrationOptions(batch_size=200))
        expected = conn.execute(STATE).fetchone()

    args = ["--dsn", crashed, "-q", "migrate", "--no-backup", "--batch-size", "200"]
    kills = [("active", "WITH", 2),  # inside a batch statement of memory_items
             ("idle", "", 3),  # between batches, during the throttle pause
             ("active", "WITH", 9),  # inside a batch of a later table
             ("active", "WITH", 4)]  # again, after a resume
    killed = 0
    for state, prefix, nth in kills:
        proc = spawn([*args, "--pause-ms", "30"])
        killed += kill_when(proc, crashed, state=state, query_prefix=prefix, nth=nth)
    assert killed >= 3, "the kills should land before the run completes"
    final = spawn(args)
    assert final.wait(120) == 0, final.stderr.read().decode() if final.stderr else ""
    with psycopg.connect(crashed, autocommit=True) as conn:
        assert conn.execute(STATE).fetchone() == expected
        statuses = [r[0] for r in conn.execute("SELECT status FROM memory_migration_runs ORDER BY run_id")]
        assert statuses[-1] == "succeeded" and statuses.count("interrupted") >= 3
        assert conn.execute("SELECT count(*) FROM memory_migration_deferred_indexes").fetchone() == (0,)


@pytest.mark.slow
def test_sigkill_with_two_jobs_then_rerun_equals_an_uninterrupted_run(new_database: Callable[[], str]) -> None:
    """Two connections migrate key ranges of each table at once; kills land inside their batches."""
    reference, crashed = new_database(), new_database()
    _prepared(reference)
    _prepared(crashed)
    with psycopg.connect(reference, autocommit=True) as conn:
        migrate(conn, MigrationOptions(batch_size=150, jobs=1))
        expected = conn.execute(STATE).fetchone()

    args = ["--dsn", crashed, "-q", "migrate", "--no-backup", "--batch-size", "150", "--jobs", "2"]
    killed = 0
    for nth in (2, 5, 3):
        proc = spawn([*args, "--pause-ms", "30"])
        killed += kill_when(proc, crashed, state="active", query_prefix="WITH", nth=nth)
    assert killed >= 2, "the kills should land before the run completes"
    with psycopg.connect(crashed, autocommit=True) as conn:
        used = conn.execute("SELECT count(*) FROM memory_migration_ranges").fetchone()
    final = spawn(args)
    assert final.wait(180) == 0, final.stderr.read().decode() if final.stderr else ""
    with psycopg.connect(crashed, autocommit=True) as conn:
        assert conn.execute(STATE).fetchone() == expected
        assert conn.execute("SELECT count(*) FROM memory_migration_ranges").fetchone() == (0,)
        statuses = [r[0] for r in conn.execute("SELECT status FROM memory_migration_runs ORDER BY run_id")]
        assert statuses[-1] == "succeeded"
    assert used is not None and used[0] >= 2, "the killed runs had split a table into ranges"
