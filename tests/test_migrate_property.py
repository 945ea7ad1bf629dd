"""Issue 12: arbitrary legacy rows always end with exactly one outcome each, and the migration succeeds."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unified_memory import fixtures
from unified_memory.migrate import MigrationOptions, migrate

# PostgreSQL text holds no NUL byte and psycopg sends no lone surrogate: those arrive as JSON escapes instead.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
FINITE = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or Infinity (they arrive as text below)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | FINITE | TEXT,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                           max_leaves=12)
ITEM = st.fixed_dictionaries({"content": TEXT | st.none() | st.integers()},
                             optional={"importance": st.integers() | st.floats(allow_nan=False) | st.just("1e999999"),
                                       "created_at": TEXT | st.sampled_from(["infinity", "294276-12-31", "2024-02-30"]),
                                       "tags": JSON_VALUES, "type": TEXT})
ESCAPES = st.sampled_from(['"\\u0000"', '"\\ud800"', '"a\\x"', "1e999999", '[{"content": "n\\u0000l"}]', "", "nul"])
MEMORY_JSON = st.none() | st.lists(ITEM | JSON_VALUES, max_size=4).map(json.dumps) | JSON_VALUES.map(json.dumps) \
    | ESCAPES | TEXT
IDS = st.sampled_from([uuid.UUID(int=i) for i in range(1, 6)])  # few ids: duplicates across tables
TIMES = st.none() | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
ENTRY = st.tuples(IDS, TEXT, st.none() | st.integers(1, 10), TIMES, TEXT | st.none())
WEB = st.tuples(IDS, TEXT, st.none() | st.uuids(), JSON_VALUES.map(json.dumps), TEXT)
LONG_TERM = st.tuples(TEXT | st.none(), MEMORY_JSON)


def _load(conn: psycopg.Connection, entries: list[Any], web: list[Any], long_term: list[Any]) -> None:
    fixtures.create(conn, rows=0, replace=True)
    conn.execute("TRUNCATE memories, memory_migration_quarantine, memory_migration_quarantine_rows, "
                 "memory_migration_checkpoints, memory_migration_ranges CASCADE")
    cur = conn.cursor()
    cur.executemany("INSERT INTO memory_entries (id, vector_id, user_id, content, importance_score, created_at, "
                    "memory_type) VALUES (%s, 'v', gen_random_uuid(), %s, %s, %s, %s) ON CONFLICT DO NOTHING", entries)
    cur.executemany("INSERT INTO web_ui_memory_entries (id, tenant_id, content, user_id, ui_source, tags, "
                    "memory_type) VALUES (%s, 't', %s, %s, 'web', %s::jsonb, %s) ON CONFLICT DO NOTHING", web)
    cur.executemany("INSERT INTO long_term_memory (user_id, memory_json) VALUES (%s, %s)", long_term)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow, HealthCheck.data_too_large])
@given(entries=st.lists(ENTRY, max_size=6), web=st.lists(WEB, max_size=6), long_term=st.lists(LONG_TERM, max_size=8))
def test_arbitrary_rows_end_with_exactly_one_outcome(unified: psycopg.Connection, entries: list[Any],
                                                     web: list[Any], long_term: list[Any]) -> None:
    _load(unified, entries, web, long_term)
    run = migrate(unified, MigrationOptions(batch_size=3, source_timezone="America/New_York"))
    assert run.status in ("succeeded", "nothing_to_do") and run.unaccounted == 0
    both = unified.execute("SELECT count(*) FROM memories m JOIN memory_migration_quarantine q "
                           "USING (source_table, source_key)").fetchone()
    assert both == (0,)
    for table in ("memory_entries", "web_ui_memory_entries"):
        outcomes = unified.execute(
            "SELECT count(*) FILTER (WHERE n <> 1), count(*) FROM (SELECT s.id, (SELECT count(*) FROM memories m "
            "WHERE m.source_table = %(t)s AND m.source_key = s.id::text) + (SELECT count(*) FROM "
            "memory_migration_quarantine q WHERE q.source_table = %(t)s AND q.source_key = s.id::text) AS n "
            "FROM (SELECT id FROM memory_entries WHERE %(t)s = 'memory_entries' UNION ALL "
            "SELECT id FROM web_ui_memory_entries WHERE %(t)s = 'web_ui_memory_entries') s) o", {"t": table}
        ).fetchone()
        assert outcomes is not None and outcomes[0] == 0
    lt = run.accounts["long_term_memory"]
    assert lt.source_rows == len(long_term)
