"""Issues 14 and 17: the first implementation's interface on our schema (022), functions and views that never
raise, and a 016 applied by hand with psql that ``schema status`` sees and ``schema up`` records."""

from __future__ import annotations

import shutil
import subprocess

import psycopg
import pytest
from psycopg.rows import dict_row

from unified_memory import schema

EXTREME_TIMES = ("infinity", "-infinity", "294276-12-31 23:59:59+00", "4713-01-01 00:00:00+00 BC",
                 "1900-01-01 00:00:00+00")


def test_named_calls_and_view_columns_of_the_first_implementation(unified: psycopg.Connection) -> None:
    a, b = unified.execute("INSERT INTO memories (user_id, text, importance, ai_generated) VALUES "
                           "('u', 'tea', 7, true), ('u', 'coffee', 3, false) RETURNING id").fetchall()
    unified.execute("SELECT create_memory_relationship(%s, %s, 'semantic_link')", [a[0], b[0]])
    unified.execute("INSERT INTO memory_access_log (memory_id, user_id, access_type, processing_time_ms) "
                    "VALUES (%s, 'u', 'read', 12)", [a[0]])
    score = unified.execute(
        "SELECT calculate_decay_score(memory_created_at => now() - interval '10 days', "
        "memory_neuro_type => 'semantic', memory_importance_score => 5, memory_access_count => 0)").fetchone()
    assert score is not None and abs(score[0] - 0.6703) < 1e-3  # exp(-0.04 * 10)
    assert unified.execute("SELECT calculate_decay_score(memory_created_at => now())").fetchone() == (1.0,)
    assert unified.execute("SELECT calculate_decay_score(now() - interval '10 days', 'semantic', 5, 0)"
                           ).fetchone() == score  # positional callers unchanged
    expiry = unified.execute("SELECT calculate_expires_at(decay_tier => 'short', created_at => '2024-01-01+00') "
                             "= '2024-01-08+00'::timestamptz, calculate_expires_at(decay_tier => 'pinned')").fetchone()
    assert expiry == (True, None)
    with unified.cursor(row_factory=dict_row) as cur:
        active = cur.execute("SELECT current_decay_score, decay_score, should_cleanup FROM active_memories_with_decay"
                             " WHERE id = %s", [a[0]]).fetchone()
        assert active is not None and active["current_decay_score"] == active["decay_score"]
        stats = cur.execute("SELECT total_count, memory_count, ai_generated_count, user_confirmed_count, "
                            "avg_access_count, latest_created >= earliest_created AS ordered "
                            "FROM memory_analytics_by_tenant WHERE user_id = 'u' AND memory_type = 'general'"
                            ).fetchone()
        assert stats is not None and stats["total_count"] == stats["memory_count"] == 2
        assert stats["ai_generated_count"] == 1 and stats["ordered"]
        audit = cur.execute("SELECT access_date, unique_memories_accessed, avg_processing_time_ms "
                            "FROM memory_audit_summary WHERE user_id = 'u'").fetchone()
        assert audit is not None and audit["unique_memories_accessed"] == 1
        details = cur.execute("SELECT source_content, derived_content, source_type, derived_type, source_text, "
                              "source_created_at, derived_created_at FROM memory_relationship_details").fetchone()
        assert details is not None and (details["source_content"], details["derived_content"]) == ("tea", "coffee")
        assert details["source_text"] == "tea"
    before = unified.execute("SELECT updated_at FROM memory_relationships").fetchone()
    unified.execute("UPDATE memory_relationships SET confidence_score = 0.5")
    after = unified.execute("SELECT updated_at FROM memory_relationships").fetchone()
    assert before is not None and after is not None and after[0] > before[0]


@pytest.mark.parametrize("when", EXTREME_TIMES)
def test_decay_functions_and_views_never_raise(unified: psycopg.Connection, when: str) -> None:
    unified.execute(
        "INSERT INTO memories (user_id, text, created_at, expires_at, importance, access_count, decay_tier) "
        "VALUES ('x', 'extreme', %s, %s, 10, 2147483647, 'short'), ('x', 'low', %s, NULL, 1, 0, 'long')",
        [when, when, when])
    unified.execute("INSERT INTO memory_access_log (user_id, access_type, accessed_at, processing_time_ms) "
                    "VALUES ('x', 'read', %s, 2147483647), ('x', 'read', %s, 2147483647)", [when, when])
    scores = unified.execute("SELECT calculate_decay_score(created_at, neuro_type, importance, access_count), "
                             "calculate_decay_score(%s::timestamptz, 'unknown', -2147483648, -5), "
                             "calculate_expires_at(decay_tier, created_at)::text FROM memories", [when]).fetchall()
    assert all(0.0 <= s <= 1.0 and 0.0 <= t <= 1.0 for s, t, _ in scores)
    for view in ("active_memories_with_decay", "memory_analytics_by_tenant", "memory_audit_summary",
                 "memory_relationship_details"):
        # every column computed, read as text (Python's datetime cannot hold infinity or year 294276)
        unified.execute(f"SELECT to_jsonb(v)::text FROM {view} v").fetchall()  # noqa: S608 - fixed view names


def test_views_keep_security_invoker(unified: psycopg.Connection) -> None:
    if unified.info.server_version < 150000:
        pytest.skip("security_invoker exists from PostgreSQL 15")
    options = unified.execute("SELECT relname, reloptions FROM pg_class WHERE relkind = 'v' AND relname IN "
                              "('active_memories_with_decay', 'memory_relationship_details', "
                              "'memory_analytics_by_tenant', 'memory_audit_summary')").fetchall()
    assert len(options) == 4 and all(o == ["security_invoker=true"] for _, o in options)


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    import pgserver._commands as commands

    return str(commands.POSTGRES_BIN_PATH / "psql")


def test_a_016_applied_with_psql_is_seen_and_recorded(dsn: str, conn: psycopg.Connection) -> None:
    sixteen = schema.discover()[0]
    done = subprocess.run([_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(sixteen.path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    status = schema.status(conn)
    assert status.unrecorded == [sixteen.path.name] and status.adoptable is None
    result = schema.up(conn)
    assert result.files[0] == sixteen.path.name + " (recorded: applied outside the runner)"
    status = schema.status(conn)
    assert [a["file"] for a in status.applied][0] == sixteen.path.name and not status.unrecorded
    assert not status.pending
