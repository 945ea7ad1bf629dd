"""Issue 4: backup and rollback, against a real PostgreSQL. Content is compared with SQL written here."""

from __future__ import annotations

import os
import re
import stat
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from catalog import snapshot
from crash import kill_when, spawn

from unified_memory import fixtures, schema
from unified_memory.backup import backup, copy_digest, default_path, tables_data, verify
from unified_memory.backupfile import FORMAT_VERSION
from unified_memory.errors import BackupIntegrityError, BackupKeyError, RollbackError
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.rollback import rollback
from unified_memory.shapes import LEGACY_TABLES

# order-independent content of a table: md5 of the sorted md5s of its rows (all columns)
CONTENT = "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h), '')) FROM (SELECT md5(t::text) AS h FROM {} t) x"
ROUND_TRIPS = [  # (shapes, COPY format of the backup)
    ({"memory_items": "I1", "memory_entries": "E1"}, "binary"),
    ({"memory_items": "I2", "memory_entries": "E2"}, "binary"),
    ({"memory_items": "I3", "memory_entries": "E1"}, "binary"),
    ({"memory_items": "I2", "memory_entries": "E1"}, "text"),
]


def content(conn: psycopg.Connection) -> dict[str, tuple[object, ...]]:
    """Per legacy table present: (rows, order-independent hash of all columns)."""
    out = {}
    for table in LEGACY_TABLES:
        if conn.execute("SELECT to_regclass(%s)", [table]).fetchone() != (None,):
            row = conn.execute(CONTENT.format(table)).fetchone()  # noqa: S608 - table names are constants
            assert row is not None
            out[table] = tuple(row)
    return out


def legacy_catalog(conn: psycopg.Connection) -> dict[str, list[tuple[object, ...]]]:
    snap = snapshot(conn)
    keep = set(LEGACY_TABLES)
    return {"columns": [r for r in snap["columns"] if r[1] in keep],
            "indexes": [r for r in snap["indexes"] if r[1] in keep],
            "constraints": [r for r in snap["constraints"] if str(r[0]) in keep]}


def add_odd_rows(conn: psycopg.Connection) -> None:
    """Unicode, a 2 MB text, NULLs and odd JSON beside the generated fixture rows."""
    big = "ü€𝄞" * (2 * 1024 * 1024 // 9)
    conn.execute("INSERT INTO long_term_memory VALUES (NULL, NULL), ('ü', ''), ('tab\tnew\nline', %s), "
                 "('back\\slash', '[{\"content\": \"\\\\N\"}]')", [big])
    conn.execute("INSERT INTO web_ui_memory_entries (tenant_id, content, user_id, ui_source, memory_type, tags, "
                 "metadata) VALUES ('t', %s, NULL, 'web', 'fact', 'null', '{\"a\": [1, {\"b\": null}]}')",
                 ["\\N literally"])


@pytest.mark.parametrize(("shapes", "copy_format"), ROUND_TRIPS,
                         ids=["-".join(s.values()) + "-" + f for s, f in ROUND_TRIPS])
def test_round_trip_backup_migrate_drop_rollback(conn: psycopg.Connection, tmp_path: Path,
                                                 shapes: dict[str, str], copy_format: str) -> None:
    fixtures.create(conn, rows=300, shapes=shapes)
    add_odd_rows(conn)
    schema.up(conn)
    before, before_catalog = content(conn), legacy_catalog(conn)
    path = default_path(tmp_path)
    manifest = backup(conn, path, copy_format=copy_format)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert {b.copy_format for b in manifest.tables.values()} == {copy_format}
    assert verify(path).to_dict()["format_version"] == FORMAT_VERSION
    assert {t: b.rows for t, b in manifest.tables.items()} == {t: c[0] for t, c in before.items()}
    run = migrate(conn, MigrationOptions(batch_size=128))
    assert run.status == "succeeded"
    for table in LEGACY_TABLES:  # the guide's step 5
        conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")  # noqa: S608 - constant names
    result = rollback(conn, path, yes=True)
    assert {r.action for r in result.tables.values()} == {"restored"}
    assert result.memories_removed == run.accounts["memory_items"].migrated + sum(
        a.migrated for t, a in run.accounts.items() if t != "memory_items")
    assert content(conn) == before
    assert legacy_catalog(conn) == before_catalog
    assert conn.execute("SELECT count(*) FROM memories WHERE source_table IS NOT NULL").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM memory_migration_quarantine").fetchone() == (0,)
    again = migrate(conn, MigrationOptions(batch_size=128))  # the restored tables migrate again, the same way
    assert again.status == "succeeded" and {t: a.migrated for t, a in again.accounts.items()} == {
        t: a.migrated for t, a in run.accounts.items()}


def test_encrypted_backup_round_trip_and_refusals(conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=2000)
    schema.up(conn)
    path = tmp_path / "enc.umbk"
    backup(conn, path, secret=b"correct horse")
    assert b"memory item" not in path.read_bytes()
    assert verify(path, secret=b"correct horse").tables["memory_items"].rows == 2000
    with pytest.raises(BackupKeyError, match="wrong key"):
        verify(path, secret=b"battery staple")
    with pytest.raises(BackupKeyError, match="encrypted"):
        verify(path, secret=None)
    before = content(conn)
    damaged = _flip_middle_byte(path, tmp_path / "flipped.umbk")
    with pytest.raises(BackupIntegrityError, match="altered"):
        rollback(conn, damaged, secret=b"correct horse", yes=True)
    truncated = tmp_path / "truncated.umbk"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(BackupIntegrityError, match="truncated"):
        rollback(conn, truncated, secret=b"correct horse", yes=True)
    assert content(conn) == before


@pytest.mark.parametrize("cut", ["flip", "truncate", "no-manifest"])
def test_plain_backup_damage_is_refused_and_the_database_is_unchanged(conn: psycopg.Connection, tmp_path: Path,
                                                                      cut: str) -> None:
    fixtures.create(conn, rows=3000)
    schema.up(conn)
    path = tmp_path / "plain.umbk"
    backup(conn, path)
    conn.execute("DROP TABLE memory_items CASCADE")
    before = content(conn)
    data = path.read_bytes()
    bad = tmp_path / "bad.umbk"
    if cut == "flip":
        bad = _flip_middle_byte(path, bad)
    elif cut == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(data[:-40])
    with pytest.raises(BackupIntegrityError):
        rollback(conn, bad, yes=True)
    assert content(conn) == before and "memory_items" not in before


def test_rollback_refuses_without_yes_and_dry_run_changes_nothing(conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=200)
    schema.up(conn)
    path = tmp_path / "b.umbk"
    backup(conn, path)
    migrate(conn)
    conn.execute("DROP TABLE memory_entries")
    with pytest.raises(RollbackError, match="--yes"):
        rollback(conn, path)
    memories = conn.execute("SELECT count(*) FROM memories").fetchone()
    plan = rollback(conn, path, dry_run=True)
    assert plan.tables["memory_entries"].action == "restored" and plan.tables["memory_items"].action == "kept"
    assert plan.memories_removed == memories[0] if memories else False
    assert conn.execute("SELECT count(*) FROM memories").fetchone() == memories
    assert conn.execute("SELECT to_regclass('memory_entries')").fetchone() == (None,)


def test_rows_added_since_are_kept_and_changed_memories_are_kept_unless_forced(
        conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=100)
    schema.up(conn)
    path = tmp_path / "b.umbk"
    before = content(conn)
    backup(conn, path)
    migrate(conn)
    conn.execute("INSERT INTO long_term_memory VALUES ('late', '[{\"content\": \"added after\"}]')")
    changed = conn.execute("UPDATE memories SET text = 'edited by the app' WHERE id = "
                           "(SELECT id FROM memories WHERE source_table = 'memory_items' LIMIT 1) RETURNING id"
                           ).fetchone()
    result = rollback(conn, path, yes=True, replace_tables=True)
    lt = result.tables["long_term_memory"]
    assert (lt.action, lt.rows_added_since, lt.kept_new_rows) == ("replaced", 1, 1)
    assert lt.saved_as == "unified_memory_rollback_saved.long_term_memory"
    assert result.memories_kept_changed == 1
    assert conn.execute("SELECT id FROM memories WHERE source_table IS NOT NULL").fetchall() == [changed]
    assert content(conn)["memory_items"] == before["memory_items"]
    assert conn.execute("SELECT count(*) FROM long_term_memory").fetchone() == (before["long_term_memory"][0] + 1,)
    assert conn.execute("SELECT count(*) FROM unified_memory_rollback_saved.long_term_memory").fetchone() == (
        before["long_term_memory"][0] + 1,)


@pytest.mark.slow
def test_sigkill_during_rollback_then_rollback_again(new_database: Callable[[], str], tmp_path: Path) -> None:
    dsn = new_database()
    path = tmp_path / "b.umbk"
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=20000)
        schema.up(conn)
        before = content(conn)
        backup(conn, path)
        migrate(conn, MigrationOptions(batch_size=5000))
        for table in LEGACY_TABLES:
            conn.execute(f"DROP TABLE {table} CASCADE")  # noqa: S608 - constant names
    proc = spawn(["--dsn", dsn, "-q", "rollback", "--yes", str(path)])
    assert kill_when(proc, dsn, state="active", query_prefix="COPY", nth=2), "the kill should land mid-restore"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('memory_items'), to_regnamespace('unified_memory_rollback_stage')"
                            ).fetchone() == (None, None)
        assert conn.execute("SELECT count(*) FROM memories").fetchone() != (0,)
    final = spawn(["--dsn", dsn, "-q", "rollback", "--yes", str(path)])
    assert final.wait(120) == 0, final.stderr.read().decode() if final.stderr else ""
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert content(conn) == before
        assert conn.execute("SELECT count(*) FROM memories").fetchone() == (0,)


def _flip_middle_byte(path: Path, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    out.write_bytes(bytes(data))
    return out


def test_reading_stays_flat_however_well_the_data_compresses(conn: psycopg.Connection, tmp_path: Path) -> None:
    """Identical rows compress over 1000x: a whole table must not come out of one compressed chunk at once."""
    conn.execute("CREATE TABLE long_term_memory (user_id VARCHAR, memory_json TEXT)")
    conn.execute("INSERT INTO long_term_memory SELECT 'same user', repeat('[{\"content\": \"same\"}]', 20) "
                 "FROM generate_series(1, 250000)")
    path = tmp_path / "flat.umbk"
    manifest = backup(conn, path)
    assert manifest.tables["long_term_memory"].bytes > 100_000_000
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        assert verify(path).tables["long_term_memory"].rows == 250000
        blocks = max(len(block) for _, data in tables_data(path, secret=None) for block in data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blocks <= 2 * 1024 * 1024
    assert peak < 32 * 1024 * 1024, f"reading a 100 MB table peaked at {peak / 1e6:.0f} MB"


def test_read_back_digest_is_the_backups_and_sees_one_changed_value(conn: psycopg.Connection,
                                                                     tmp_path: Path) -> None:
    """The rollback's proof: a table reads back to the manifest's SHA-256 only if every value is the same."""
    fixtures.create(conn, rows=500)
    path = tmp_path / "b.umbk"
    entry = backup(conn, path).tables["memory_items"]
    columns = entry.column_names
    table = psycopg.sql.Identifier("memory_items")
    assert copy_digest(conn, table, columns, "binary") == (entry.rows, entry.bytes, entry.sha256)
    conn.execute("UPDATE memory_items SET importance_decay = 1.0000001 WHERE ctid = '(0,1)'")
    assert copy_digest(conn, table, columns, "binary")[2] != entry.sha256


def test_default_name_follows_the_guide(tmp_path: Path) -> None:
    name = default_path(tmp_path / "backups").name
    assert re.fullmatch(r"memory_migration_backup_\d{8}_\d{6}_\d{6}_[0-9a-f]{8}\.umbk", name), name
