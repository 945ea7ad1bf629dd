"""Issue 11: provenance and migration ids belong to the migration; impossible legacy times are normalised."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from unified_memory import fixtures, schema
from unified_memory.backup import backup
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.rollback import rollback
from unified_memory.validate import validate

NS = uuid.UUID("3334e2db-51f2-5d45-9545-6fec3e93dfe0")


def _items_i3(conn: psycopg.Connection) -> None:
    fixtures.create(conn, rows=0, shapes={"memory_items": "I3"})
    conn.execute("INSERT INTO memory_items (memory_id, user_id, scope, kind, content, metadata) VALUES "
                 "('mem-1', 'bob', 'user:bob', 'fact', 'bob fact', '{}'), "
                 "('mem-2', 'mallory', 'user:mallory', 'fact', 'her own', '{}')")
    conn.execute("INSERT INTO long_term_memory (user_id, memory_json) VALUES ('bob', '[{\"content\": \"lt\"}]')")


def test_an_id_squatted_by_another_tenant_neither_blocks_nor_quarantines(unified: psycopg.Connection,
                                                                          tmp_path: Path) -> None:
    """Rows an application wrote before 018 at the deterministic ids of bob's legacy rows (018 refuses new ones)."""
    _items_i3(unified)
    squatted_item = uuid.uuid3(NS, "memory_items:mem-1")
    squatted_lt = uuid.uuid3(NS, "long_term_memory:(0,1)#0")
    own = uuid.uuid3(NS, "memory_items:mem-2")
    unified.execute("INSERT INTO memories (id, user_id, text) VALUES (%s, 'mallory', 'squat'), "
                    "(%s, 'mallory', 'squat'), (%s, 'mallory', 'first implementation copy')",
                    [squatted_item, squatted_lt, own])
    path = tmp_path / "before.umbk"
    backup(unified, path)
    migrate(unified, MigrationOptions(tables=("memory_items", "long_term_memory")))
    cur = unified.cursor(row_factory=dict_row)
    bob = cur.execute("SELECT id, user_id, meta -> 'legacy' ->> 'id_in_use' AS taken FROM memories "
                      "WHERE source_table = 'memory_items' AND source_key = 'mem-1'").fetchone()
    assert bob is not None and bob["user_id"] == "bob" and bob["id"] != squatted_item
    assert bob["taken"] == str(squatted_item)
    lt = cur.execute("SELECT id FROM memories WHERE source_table = 'long_term_memory'").fetchone()
    assert lt is not None and lt["id"] != squatted_lt
    quarantined = cur.execute("SELECT source_key, reason FROM memory_migration_quarantine").fetchall()
    assert quarantined == [{"source_key": "mem-2", "reason": "duplicate_id"}]  # her own id: hers to resolve
    report = validate(unified)
    assert [c.name for c in report.failed() if c.name.startswith("reconciliation")] == []
    rollback(unified, path, yes=True)
    left = cur.execute("SELECT count(*) AS n FROM memories WHERE user_id = 'mallory'").fetchone()
    assert left == {"n": 3}
    assert cur.execute("SELECT count(*) AS n FROM memories WHERE user_id = 'bob'").fetchone() == {"n": 0}


def test_infinite_and_absurd_legacy_times_are_normalised_with_the_original_kept(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=0, shapes={"memory_items": "I1"})
    unified.execute("INSERT INTO memory_entries (id, vector_id, user_id, content, created_at, last_accessed) VALUES "
                    "(%s, 'v', %s, 'inf', 'infinity', '-infinity'), (%s, 'v', %s, 'minf', '-infinity', NULL), "
                    "(%s, 'v', %s, 'far', '20000-01-01', NULL), (%s, 'v', %s, 'fine', '2024-01-01', NULL)",
                    [x for i in range(1, 5) for x in (uuid.UUID(int=i), uuid.UUID(int=99))])
    unified.execute("INSERT INTO web_ui_memory_entries (tenant_id, content, user_id, ui_source, memory_type, "
                    "created_at) VALUES ('acme', 'web inf', %s, 'web', 'fact', 'infinity')", [uuid.UUID(int=99)])
    unified.execute("INSERT INTO long_term_memory VALUES ('u', '[{\"content\": \"x\", \"created_at\": \"infinity\"}]')")
    migrate(unified, MigrationOptions())
    rows = unified.cursor(row_factory=dict_row).execute(
        "SELECT text, isfinite(created_at) AS finite, created_at > now() - interval '1 hour' AS now_ish, "
        "meta -> 'legacy' ->> 'created_at_out_of_range' AS original, last_accessed, "
        "meta -> 'legacy' ->> 'last_accessed_out_of_range' AS la FROM memories ORDER BY text").fetchall()
    by_text = {r["text"]: r for r in rows}
    assert all(r["finite"] for r in rows)
    assert by_text["inf"]["original"] == "infinity" and by_text["inf"]["now_ish"]
    assert by_text["inf"]["la"] == "-infinity" and by_text["inf"]["last_accessed"] is None
    assert by_text["minf"]["original"] == "-infinity"
    assert by_text["far"]["original"].startswith("20000-01-01")
    assert by_text["fine"]["original"] is None and not by_text["fine"]["now_ish"]
    assert by_text["web inf"]["original"] == "infinity"
    assert by_text["x"]["now_ish"]
    report = validate(unified)
    assert [c.name for c in report.failed() if not c.name.startswith("indexes.")] == []  # tiny table: plans vary


def test_provenance_written_before_018_by_anyone_but_the_migration_is_not_believed(conn: psycopg.Connection,
                                                                                   tmp_path: Path) -> None:
    schema.up(conn, target="017")
    _items_i3(conn)
    conn.execute("INSERT INTO memories (user_id, text, source_table, source_key, migrated_at) VALUES "
                 "('mallory', 'squat', 'memory_items', 'mem-1', now())")
    schema.up(conn)
    cur = conn.cursor(row_factory=dict_row)
    squat = cur.execute("SELECT source_table, meta -> 'legacy' -> 'forged_provenance' ->> 'source_key' AS key "
                        "FROM memories WHERE user_id = 'mallory'").fetchone()
    assert squat == {"source_table": None, "key": "mem-1"}
    path = tmp_path / "before.umbk"
    backup(conn, path)
    migrate(conn, MigrationOptions(tables=("memory_items",)))
    bob = cur.execute("SELECT user_id FROM memories WHERE source_table = 'memory_items' AND source_key = 'mem-1'")
    assert bob.fetchone() == {"user_id": "bob"}
    rollback(conn, path, yes=True)
    assert cur.execute("SELECT count(*) AS n FROM memories WHERE user_id = 'mallory'").fetchone() == {"n": 1}
