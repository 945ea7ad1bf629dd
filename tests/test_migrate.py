"""Issue 3: the data migration, against a real PostgreSQL. Expectations are written out by hand."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from unified_memory import fixtures
from unified_memory.errors import LockBusy
from unified_memory.migrate import MigrationOptions, migrate

NS = uuid.UUID("3334e2db-51f2-5d45-9545-6fec3e93dfe0")
A, B, C, D, E = (uuid.UUID(int=i) for i in range(1, 6))
USER = uuid.UUID("11111111-1111-1111-1111-111111111111")
CONVO = uuid.UUID("22222222-2222-2222-2222-222222222222")


def _lt_id(key: str) -> uuid.UUID:
    return uuid.uuid3(NS, f"long_term_memory:{key}")


def memory(conn: psycopg.Connection, table: str, key: str) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM memories WHERE source_table = %s AND source_key = %s", [table, key])
    row = cur.fetchone()
    assert row is not None, f"no memory from {table} {key}"
    assert cur.description is not None
    return dict(zip([d.name for d in cur.description], row, strict=True))


def quarantine(conn: psycopg.Connection) -> dict[tuple[str, str], tuple[str, Any]]:
    rows = conn.execute("SELECT source_table, source_key, reason, duplicate_of FROM memory_migration_quarantine")
    return {(t, k): (r, d) for t, k, r, d in rows}


@pytest.fixture
def legacy(unified: psycopg.Connection) -> psycopg.Connection:
    """Empty legacy tables (I1, E1, W1, L1) holding every bad case of the lessons file."""
    fixtures.create(unified, rows=0, shapes={"memory_items": "I1"})
    c = unified
    c.execute("INSERT INTO memory_items (id, scope, kind, content, metadata, created_at) VALUES "
              "(%s, 'user:alice', 'fact', 'likes tea', '{\"a\": 1}', '2024-01-02 03:04:05'),"
              "(%s, 'global', 'task', 'water plants', '{}', '2024-01-03 00:00:00'),"
              "(%s, %s, 'context', 'in a conversation', '{}', '2024-01-04 00:00:00'),"
              "(%s, 'user:bob', 'fact', '   ', '{}', '2024-01-05 00:00:00'),"
              "(%s, 'user:bob', 'doc_chunk', 'odd meta', '[1, 2]', NULL)",
              [A, B, C, f"convo:{CONVO}", D, E])
    c.execute("INSERT INTO memory_entries (id, vector_id, user_id, content, memory_type, tags, importance_score, "
              "ui_source, created_at, memory_metadata) VALUES "
              "(%s, 'v-1', %s, 'entry one', 'todo', NULL, NULL, NULL, '2024-02-01 12:00:00', NULL),"
              "(%s, 'v-2', %s, 'dup of an item', 'fact', '{x,y}', 7, 'legacy', '2024-02-02 12:00:00', '{\"k\": null}')",
              [uuid.UUID(int=101), USER, A, USER])
    c.execute("INSERT INTO web_ui_memory_entries (id, tenant_id, content, user_id, ui_source, memory_type, tags, "
              "metadata, created_at) VALUES "
              "(%s, 'acme', 'web one', %s, 'ag-ui', 'insight', '\"single\"', '{}', '2024-03-01 00:00+00'),"
              "(%s, 'acme', 'web two', %s, 'web', 'weird', '{\"a\": 1}', '{}', '2024-03-02 00:00+00'),"
              "(%s, 'acme', 'no owner', NULL, 'web', 'fact', '[]', '{}', '2024-03-03 00:00+00')",
              [uuid.UUID(int=201), USER, uuid.UUID(int=202), USER, uuid.UUID(int=203)])
    lt_rows = [
        ("u1", '[{"content": "c1", "tags": ["t"], "importance": 11, "type": "todo", '
               '"created_at": "2024-05-01T00:00:00Z"}, "plain", null, ["n"], {"x": 1}, 42]'),
        ("u2", '[{"content": "same"}]'), ("u2", '[{"content": "same"}]'),
        ("u3", "[]"), ("u3", "{}"), ("u3", "null"), ("u3", "7"), ("u3", "nope{"), ("u3", None),
        ("u3", '"a string"'), ("u3", '{"content": "an object", "importance": "high"}'), (None, '[{"content": "x"}]'),
    ]
    c.cursor().executemany("INSERT INTO long_term_memory (user_id, memory_json) VALUES (%s, %s)", lt_rows)
    return c


def test_every_row_gets_exactly_the_expected_outcome(legacy: psycopg.Connection) -> None:
    run = migrate(legacy, MigrationOptions(batch_size=2))
    assert run.status == "succeeded" and run.unaccounted == 0
    q = quarantine(legacy)
    assert q == {
        ("memory_items", str(C)): ("missing_owner", None),
        ("memory_items", str(D)): ("empty_text", None),
        ("memory_entries", str(A)): ("duplicate_id", A),
        ("web_ui_memory_entries", str(uuid.UUID(int=203))): ("missing_owner", None),
        ("long_term_memory", "(0,1)#2"): ("item_null", None),
        ("long_term_memory", "(0,1)#3"): ("item_nested_array", None),
        ("long_term_memory", "(0,1)#4"): ("item_no_content", None),
        ("long_term_memory", "(0,1)#5"): ("item_scalar", None),
        ("long_term_memory", "(0,4)"): ("empty_array", None),
        ("long_term_memory", "(0,5)#0"): ("item_no_content", None),
        ("long_term_memory", "(0,6)"): ("json_null", None),
        ("long_term_memory", "(0,7)"): ("scalar_json", None),
        ("long_term_memory", "(0,8)"): ("invalid_json", None),
        ("long_term_memory", "(0,9)"): ("null_value", None),
        ("long_term_memory", "(0,12)"): ("missing_owner", None),
    }

    alice = memory(legacy, "memory_items", str(A))
    assert alice["id"] == A and alice["user_id"] == "alice" and alice["org_id"] is None
    assert alice["text"] == "likes tea" and alice["memory_type"] == "fact"
    assert alice["neuro_type"] == "semantic" and alice["decay_tier"] == "medium" and alice["importance"] == 5
    assert alice["meta"] == {"a": 1, "legacy": {"scope": "user:alice"}}
    assert alice["created_at"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert alice["tags"] == [] and alice["ui_source"] == "api"
    glob = memory(legacy, "memory_items", str(B))
    assert glob["user_id"] == "system:global" and glob["memory_type"] == "procedural"
    assert glob["meta"]["legacy"] == {"scope": "global", "kind": "task"}
    odd = memory(legacy, "memory_items", str(E))
    assert odd["meta"]["legacy"]["metadata"] == [1, 2] and odd["meta"]["legacy"]["created_at_missing"] is True
    assert odd["memory_type"] == "semantic"

    entry = memory(legacy, "memory_entries", str(uuid.UUID(int=101)))
    assert entry["user_id"] == str(USER) and entry["importance"] == 5 and entry["tags"] == []
    assert entry["ui_source"] == "api" and entry["memory_type"] == "procedural"
    assert entry["neuro_type"] == "episodic" and entry["decay_tier"] == "short"
    assert entry["meta"] == {"legacy": {"memory_type": "todo", "vector_id": "v-1", "timestamp": 0,
                                        "updated_at": entry["meta"]["legacy"]["updated_at"]}}
    assert entry["created_at"] == datetime(2024, 2, 1, 12, tzinfo=UTC)

    web1 = memory(legacy, "web_ui_memory_entries", str(uuid.UUID(int=201)))
    assert (web1["org_id"], web1["ui_source"], web1["memory_type"], web1["tags"]) == ("acme", "ag_ui", "insight",
                                                                                      ["single"])
    assert web1["meta"]["legacy"] == {"ui_source": "ag-ui", "tags": "single"}
    web2 = memory(legacy, "web_ui_memory_entries", str(uuid.UUID(int=202)))
    assert web2["tags"] == [] and web2["memory_type"] == "general"
    assert web2["meta"]["legacy"] == {"tags": {"a": 1}, "memory_type": "weird"}

    first = memory(legacy, "long_term_memory", "(0,1)#0")
    assert first["id"] == _lt_id("(0,1)#0") and first["user_id"] == "u1" and first["text"] == "c1"
    assert (first["importance"], first["memory_type"], first["tags"]) == (10, "procedural", ["t"])
    assert first["created_at"] == datetime(2024, 5, 1, tzinfo=UTC)
    assert (first["neuro_type"], first["decay_tier"]) == ("semantic", "long")
    assert first["meta"]["legacy"]["importance"] == 11 and first["meta"]["legacy"]["type"] == "todo"
    assert memory(legacy, "long_term_memory", "(0,1)#1")["text"] == "plain"
    assert memory(legacy, "long_term_memory", "(0,1)#1")["importance"] == 6
    same = [memory(legacy, "long_term_memory", k) for k in ("(0,2)#0", "(0,3)#0")]
    assert same[0]["id"] != same[1]["id"] and same[0]["text"] == same[1]["text"] == "same"
    assert memory(legacy, "long_term_memory", "(0,10)#0")["text"] == "a string"
    obj = memory(legacy, "long_term_memory", "(0,11)#0")
    assert obj["importance"] == 6 and obj["meta"]["legacy"]["importance"] == "high"

    counts = {t: (a.source_rows, a.migrated, a.duplicates, a.quarantined_total) for t, a in run.accounts.items()}
    assert counts == {"memory_items": (5, 3, 0, 2), "memory_entries": (2, 1, 1, 0),
                      "web_ui_memory_entries": (3, 2, 0, 1), "long_term_memory": (12, 6, 0, 11)}
    lt = run.accounts["long_term_memory"]
    assert (lt.expanded_rows, lt.items) == (6, 11)  # rows 1, 2, 3, 5, 10, 11: 6 + 1 + 1 + 1 + 1 + 1 items


def test_no_memory_arrives_expired_and_the_other_policy_is_a_flag(legacy: psycopg.Connection) -> None:
    migrate(legacy, MigrationOptions(tables=("memory_items",)))
    assert legacy.execute("SELECT count(*) FROM memories WHERE expires_at <= now()").fetchone() == (0,)
    migrate(legacy, MigrationOptions(tables=("memory_entries",), expiry="created"))
    expired = legacy.execute("SELECT count(*) FROM memories WHERE source_table = 'memory_entries' "
                             "AND expires_at <= now()").fetchone()
    assert expired == (1,)  # created 2024-02-01 + 7 days: long gone


def test_naive_timestamps_are_read_in_the_source_time_zone(legacy: psycopg.Connection) -> None:
    migrate(legacy, MigrationOptions(tables=("memory_items",), source_timezone="America/New_York"))
    assert memory(legacy, "memory_items", str(A))["created_at"] == datetime(2024, 1, 2, 8, 4, 5, tzinfo=UTC)


def test_dry_run_counts_equal_the_real_run_and_write_nothing(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=600)
    plan = migrate(unified, MigrationOptions(dry_run=True, batch_size=97))
    assert plan.status == "planned"
    empty = unified.execute("SELECT (SELECT count(*) FROM memories), (SELECT count(*) FROM memory_migration_runs), "
                            "(SELECT count(*) FROM memory_migration_checkpoints), "
                            "(SELECT count(*) FROM memory_migration_quarantine)").fetchone()
    assert empty == (0, 0, 0, 0)
    real = migrate(unified, MigrationOptions(batch_size=97))
    assert {t: a.to_dict() for t, a in plan.accounts.items()} == {t: a.to_dict() for t, a in real.accounts.items()}
    assert real.unaccounted == 0 and real.accounts["long_term_memory"].items


def test_rerun_after_success_changes_nothing_and_says_so(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=300)
    migrate(unified, MigrationOptions(batch_size=100))
    before = unified.execute("SELECT md5(string_agg(m::text, '' ORDER BY id)) FROM memories m").fetchone()
    again = migrate(unified, MigrationOptions(batch_size=100))
    assert again.status == "nothing_to_do"
    assert unified.execute("SELECT md5(string_agg(m::text, '' ORDER BY id)) FROM memories m").fetchone() == before
    assert unified.execute("SELECT count(*) FROM memory_migration_runs").fetchone() == (1,)


def test_a_legacy_row_added_after_the_migration_is_caught_up(legacy: psycopg.Connection) -> None:
    migrate(legacy)
    legacy.execute("INSERT INTO memory_items (id, scope, kind, content) VALUES (%s, 'user:late', 'fact', 'late')",
                   [uuid.UUID(int=0)])
    again = migrate(legacy)
    assert again.status == "succeeded" and again.tables["memory_items"].migrated == 1
    assert memory(legacy, "memory_items", str(uuid.UUID(int=0)))["user_id"] == "late"


def test_a_row_the_database_rejects_costs_only_that_row(legacy: psycopg.Connection) -> None:
    long_owner = "x" * 300  # longer than memories.user_id VARCHAR(255): only the database notices
    legacy.execute("INSERT INTO memory_items (id, scope, kind, content) VALUES (%s, %s, 'fact', 'too long')",
                   [uuid.UUID(int=7), f"user:{long_owner}"])
    run = migrate(legacy, MigrationOptions(batch_size=50, tables=("memory_items",)))
    assert run.tables["memory_items"].isolated == 1
    row = legacy.execute("SELECT reason, sqlstate, raw_row ->> 'content' FROM memory_migration_quarantine "
                         "WHERE source_key = %s", [str(uuid.UUID(int=7))]).fetchone()
    assert row == ("rejected_by_database", "22001", "too long")
    assert run.accounts["memory_items"].migrated == 3 and run.unaccounted == 0


def test_a_large_text_is_bounded_by_bytes(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=0)
    big = "é" * (2 * 1024 * 1024)
    unified.execute("INSERT INTO web_ui_memory_entries (tenant_id, content, user_id, ui_source, memory_type) "
                    "SELECT 't', %s || i, %s, 'web', 'fact' FROM generate_series(1, 3) i", [big, USER])
    run = migrate(unified, MigrationOptions(max_batch_bytes=1024 * 1024))
    assert run.tables["web_ui_memory_entries"].batches == 3
    assert unified.execute("SELECT count(*), min(length(text)) FROM memories").fetchone() == (3, 2 * 1024 * 1024 + 1)


def test_vectors_of_memory_items_are_kept_for_the_vectors_step(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=40, shapes={"memory_items": "I1"})
    migrate(unified, MigrationOptions(tables=("memory_items",)))
    kept = unified.execute("SELECT count(*), min(dimension), max(dimension) FROM memory_legacy_embeddings").fetchone()
    source = unified.execute("SELECT count(*) FROM memory_items WHERE embedding IS NOT NULL AND scope <> 'convo:' "
                             "AND left(scope, 6) <> 'convo:'").fetchone()
    assert kept == (source[0] if source else -1, 768, 768)


def test_every_shape_migrates_with_nothing_unaccounted(unified: psycopg.Connection) -> None:
    for shapes in ({"memory_items": "I2", "memory_entries": "E2"}, {"memory_items": "I3", "memory_entries": "E1"}):
        fixtures.create(unified, rows=250, shapes=shapes, replace=True)
        unified.execute("TRUNCATE memories, memory_migration_quarantine, memory_migration_checkpoints CASCADE")
        run = migrate(unified, MigrationOptions(batch_size=64))
        assert run.status == "succeeded" and run.unaccounted == 0
        assert run.shapes["memory_items"] == shapes["memory_items"]
        assert all(a.migrated > 0 for a in run.accounts.values())


def test_i3_text_ids_become_deterministic_uuids(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=0, shapes={"memory_items": "I3"})
    unified.execute("INSERT INTO memory_items (memory_id, user_id, scope, kind, content, metadata) VALUES "
                    "('mem-1', 'carol', 'user:carol', 'fact', 'text id', '{}')")
    migrate(unified, MigrationOptions(tables=("memory_items",)))
    assert memory(unified, "memory_items", "mem-1")["id"] == uuid.uuid3(NS, "memory_items:mem-1")


def test_a_concurrent_second_run_is_refused(unified: psycopg.Connection, dsn: str) -> None:
    fixtures.create(unified, rows=300)
    started = threading.Event()
    errors: list[BaseException] = []

    def slow_run() -> None:
        with psycopg.connect(dsn, autocommit=True) as other:
            try:
                migrate(other, MigrationOptions(batch_size=20, pause_ms=40),
                        progress=lambda *_: started.set())
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

    thread = threading.Thread(target=slow_run)
    thread.start()
    assert started.wait(30)
    with pytest.raises(LockBusy, match="another migration is running"):
        migrate(unified, lock_wait=0)
    thread.join()
    assert errors == []


def test_unknown_shape_names_the_unexpected_columns(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=0, shapes={"memory_items": "I1"})
    unified.execute("ALTER TABLE memory_items ADD COLUMN surprise int")
    from unified_memory.errors import ShapeError

    with pytest.raises(ShapeError, match="surprise"):
        migrate(unified, MigrationOptions(dry_run=True))


def test_missing_tables_are_skipped_and_reported(unified: psycopg.Connection) -> None:
    unified.execute("CREATE TABLE long_term_memory (user_id VARCHAR, memory_json TEXT)")
    unified.execute("INSERT INTO long_term_memory VALUES ('u', %s)", [Jsonb([{"content": "only me"}]).obj.__repr__()
                                                                     .replace("'", '"')])
    run = migrate(unified)
    assert run.shapes == {"memory_items": None, "memory_entries": None, "web_ui_memory_entries": None,
                          "long_term_memory": "L1"}
    assert run.accounts["long_term_memory"].migrated == 1


def test_legacy_time_text_is_read_with_its_offset_or_in_the_source_zone(unified: psycopg.Connection) -> None:
    unified.execute("SET TimeZone = 'Asia/Tokyo'")  # the session's zone must not matter
    cases = {
        "2024-05-01": datetime(2024, 5, 1, 4, tzinfo=UTC),  # a date alone: midnight in the source zone
        "2024-05-01T10:00:00Z": datetime(2024, 5, 1, 10, tzinfo=UTC),
        "2024-05-01 10:00:00+02": datetime(2024, 5, 1, 8, tzinfo=UTC),
        "2024-05-01T10:00": datetime(2024, 5, 1, 14, tzinfo=UTC),
        "2024-05-01T10:00:00.5-0330": datetime(2024, 5, 1, 13, 30, 0, 500000, tzinfo=UTC),
        "2024-02-30T10:00": None,
        "nonsense": None,
    }
    for text, expected in cases.items():
        got = unified.execute("SELECT memory_migration_parse_time(%s, 'America/New_York')", [text]).fetchone()
        assert got == (expected,), text
