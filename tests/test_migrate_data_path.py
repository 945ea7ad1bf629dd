"""Issue 10 (data path): no single row stops the tool; views and partitioned tables; raw rows quarantined once."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from unified_memory import fixtures, reconcile
from unified_memory.accounting import account
from unified_memory.errors import ShapeError
from unified_memory.health import health
from unified_memory.migrate import MigrationOptions, migrate

USER = uuid.UUID("11111111-1111-1111-1111-111111111111")
NASTY_JSON = [
    '[{"content": "before\\u0000after"}]',  # NUL escape: 22P05 on PostgreSQL 12-15
    '{"content": "an escaped backslash, then u0000: \\\\u0000"}',  # not a NUL
    '[{"content": "bad escape \\x"}]',
    '[{"content": "lone \\ud800 surrogate"}]',
    '[{"content": "huge", "importance": 1e999999}]',
    '[{"content": "big", "importance": 1e300, "created_at": "294276-12-31T23:00:00"}]',
    '[{"content": "far", "created_at": "99999-01-01"}, {"content": "bad zone", "created_at": "2024-01-01 10:00+99"}]',
    '[{"content": "inf", "created_at": "infinity"}]',
    '[null, {"content": "\\u0000"}, "x\\u0000"]',
]


@pytest.fixture
def nasty(unified: psycopg.Connection) -> psycopg.Connection:
    fixtures.create(unified, rows=0)
    unified.cursor().executemany("INSERT INTO long_term_memory (user_id, memory_json) VALUES ('u', %s)",
                                 [(j,) for j in NASTY_JSON])
    unified.execute("INSERT INTO memory_entries (id, vector_id, user_id, content, ttl, last_accessed, created_at) "
                    "VALUES (%s, 'v', %s, 'edge of time', '294276-12-31 23:00:00', '4713-01-02 BC', "
                    "'294276-12-31 22:00:00'), (%s, 'v', %s, 'fine', NULL, NULL, '2024-01-01')",
                    [uuid.UUID(int=1), USER, uuid.UUID(int=2), USER])
    return unified


def test_no_single_row_stops_any_statement_that_reads_legacy_data(nasty: psycopg.Connection) -> None:
    opts = MigrationOptions(batch_size=3, source_timezone="America/New_York")
    plan = migrate(nasty, MigrationOptions(batch_size=3, source_timezone="America/New_York", dry_run=True))
    run = migrate(nasty, opts)
    assert run.status == "succeeded" and run.unaccounted == 0
    assert {t: a.to_dict() for t, a in plan.accounts.items()} == {t: a.to_dict() for t, a in run.accounts.items()}
    nul = nasty.execute("SELECT text, meta -> 'legacy' ->> 'json_nul_replaced' FROM memories "
                        "WHERE source_key = '(0,1)#0'").fetchone()
    assert nul == ("before\ufffdafter", "true")
    escaped = nasty.execute("SELECT text, meta -> 'legacy' ? 'json_nul_replaced' FROM memories "
                            "WHERE source_key = '(0,2)#0'").fetchone()
    assert escaped == ("an escaped backslash, then u0000: \\u0000", False)
    reasons = dict(nasty.execute("SELECT source_key, reason FROM memory_migration_quarantine "
                                 "WHERE source_table = 'long_term_memory'").fetchall())
    assert reasons["(0,3)"] == reasons["(0,4)"] == reasons["(0,5)"] == "invalid_json"
    assert reasons["(0,9)#0"] == "item_null"
    assert nasty.execute("SELECT count(*) FROM memories WHERE source_key IN ('(0,9)#1', '(0,9)#2', '(0,6)#0', "
                         "'(0,7)#0', '(0,7)#1', '(0,8)#0')").fetchone() == (6,)
    edge = nasty.execute("SELECT reason, sqlstate FROM memory_migration_quarantine WHERE source_key = %s",
                         [str(uuid.UUID(int=1))]).fetchone()
    assert edge == ("rejected_by_database", "22008")  # the ttl leaves the timestamp range in the source zone
    # accounting, the validator's reconciliation and health read the same rows without an error
    assert account(nasty, "long_term_memory", "L1").unaccounted == 0
    for table, shape in (("long_term_memory", "L1"), ("memory_entries", "E1")):
        assert reconcile.content(nasty, table, shape, source_timezone="America/New_York").equal
    assert health(nasty).quarantined >= 5


def test_the_cli_exits_0_on_nasty_rows(nasty: psycopg.Connection, dsn: str, home: object) -> None:
    from crash import spawn

    proc = spawn(["--dsn", dsn, "-q", "migrate", "--no-backup", "--source-timezone", "America/New_York"])
    assert proc.wait(120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    proc = spawn(["--dsn", dsn, "-q", "migrate", "--dry-run"])
    assert proc.wait(120) == 0, proc.stderr.read().decode() if proc.stderr else ""


def test_a_row_with_many_bad_items_is_stored_once(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=0)
    doc = json.dumps([None] * 100 + [{"content": "kept"}] + [7] * 50)
    unified.execute("INSERT INTO long_term_memory (user_id, memory_json) VALUES ('u', %s), ('v', '[]')", [doc])
    run = migrate(unified, MigrationOptions(batch_size=1))
    assert run.unaccounted == 0 and run.accounts["long_term_memory"].migrated == 1
    items = unified.execute("SELECT count(*), count(DISTINCT raw_key), max(pg_column_size(raw_row)) "
                            "FROM memory_migration_quarantine WHERE raw_key IS NOT NULL").fetchone()
    assert items is not None and items[:2] == (150, 1) and items[2] < 200
    raw = unified.execute("SELECT source_key, raw_row ->> 'memory_json' FROM memory_migration_quarantine_rows"
                          ).fetchall()
    assert raw == [("(0,1)", doc)]
    row_level = unified.execute("SELECT raw_row ->> 'user_id' FROM memory_migration_quarantine "
                                "WHERE source_key = '(0,2)'").fetchone()
    assert row_level == ("v",)  # a row-level outcome keeps its row itself


def test_a_view_and_a_partitioned_table_are_migrated_like_tables(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=40)
    unified.execute("ALTER TABLE memory_entries RENAME TO memory_entries_data")
    unified.execute("CREATE VIEW memory_entries AS SELECT * FROM memory_entries_data")
    unified.execute("ALTER TABLE web_ui_memory_entries RENAME TO web_ui_old")
    unified.execute("CREATE TABLE web_ui_memory_entries (LIKE web_ui_old) PARTITION BY HASH (id)")
    for i in range(2):
        unified.execute(f"CREATE TABLE web_ui_p{i} PARTITION OF web_ui_memory_entries "
                        f"FOR VALUES WITH (MODULUS 2, REMAINDER {i})")
    unified.execute("INSERT INTO web_ui_memory_entries SELECT * FROM web_ui_old")
    run = migrate(unified, MigrationOptions(batch_size=7))
    assert run.status == "succeeded" and run.unaccounted == 0
    assert run.shapes["memory_entries"] == "E1" and run.shapes["web_ui_memory_entries"] == "W1"
    assert run.accounts["memory_entries"].source_rows == 40
    assert run.accounts["web_ui_memory_entries"].source_rows == 40
    assert run.accounts["web_ui_memory_entries"].migrated > 30


def test_a_view_with_repeated_keys_or_a_keyless_view_is_refused_by_name(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=10)
    unified.execute("ALTER TABLE memory_entries RENAME TO memory_entries_data")
    unified.execute("CREATE VIEW memory_entries AS SELECT * FROM memory_entries_data "
                    "UNION ALL SELECT * FROM memory_entries_data")
    with pytest.raises(ShapeError, match="memory_entries is a view with 10 NULL or repeated keys"):
        migrate(unified, MigrationOptions(tables=("memory_entries",)))
    unified.execute("ALTER TABLE long_term_memory RENAME TO long_term_data")
    unified.execute("CREATE VIEW long_term_memory AS SELECT * FROM long_term_data")
    with pytest.raises(ShapeError, match="long_term_memory is a view"):
        migrate(unified, MigrationOptions(tables=("long_term_memory",)))
    assert unified.execute("SELECT count(*) FROM memories").fetchone() == (0,)


def test_jobs_out_of_range_is_a_bad_option(unified: psycopg.Connection) -> None:
    from unified_memory.errors import ConfigError

    for jobs in (-1, 17):
        with pytest.raises(ConfigError, match="--jobs"):
            migrate(unified, MigrationOptions(jobs=jobs))


def test_two_jobs_split_a_table_and_keep_the_precedence_of_shared_ids(unified: psycopg.Connection) -> None:
    fixtures.create(unified, rows=3000)
    run = migrate(unified, MigrationOptions(batch_size=250, jobs=2))
    assert run.unaccounted == 0 and all(t.ranges == 2 for t in run.tables.values())
    shared = unified.execute("SELECT count(*) FILTER (WHERE m.source_table = 'memory_items'), count(*) "
                             "FROM memory_items i JOIN memories m ON m.id = i.id").fetchone()
    dups = unified.execute("SELECT count(*) FROM memory_migration_quarantine WHERE reason = 'duplicate_id' "
                           "AND source_table IN ('memory_entries', 'web_ui_memory_entries')").fetchone()
    assert shared is not None and shared[0] == shared[1] > 0  # every id memory_items migrated is its own
    assert dups == (6,)  # rows 1000, 2000, 3000 of both later tables carry a memory_items id
