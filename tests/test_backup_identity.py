"""Issue 10: a backup knows the database it came from; rollback refuses another one (exit 9) unless told."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.backup import backup, default_path, identity, verify
from unified_memory.cli import app
from unified_memory.migrate import migrate


def _state(conn: psycopg.Connection) -> tuple[object, ...]:
    query = sql.SQL("SELECT count(*), coalesce(sum(hashtext(t::text)), 0) FROM {} t")
    return tuple(conn.execute(query.format(sql.Identifier(table))).fetchone()
                 for table in ("memory_items", "memory_entries", "memories"))


def test_a_backup_of_database_a_is_refused_in_database_b_which_stays_unchanged(
        new_database: Callable[[], str], home: Path) -> None:
    dsn_a, dsn_b = new_database(), new_database()
    with psycopg.connect(dsn_a, autocommit=True) as a, psycopg.connect(dsn_b, autocommit=True) as b:
        fixtures.create(a, rows=40)
        fixtures.create(b, rows=70)
        schema.up(b)
        migrate(b)
        path = default_path(home / "backups")
        manifest = backup(a, path)
        assert manifest.identity == identity(a) and manifest.database_oid is not None
        assert verify(path).identity == identity(a)
        before = _state(b)
        refused = CliRunner().invoke(app, ["--dsn", dsn_b, "rollback", "--yes", str(path)])
        assert refused.exit_code == 9, refused.output
        assert "another database" in refused.output and "--into-other-database" in refused.output
        assert _state(b) == before
        same = CliRunner().invoke(app, ["--dsn", dsn_a, "rollback", "--dry-run", str(path)])
        assert same.exit_code == 0, same.output
        on_purpose = CliRunner().invoke(app, ["--dsn", dsn_b, "rollback", "--yes", "--into-other-database",
                                              "--replace-tables", "--discard-new-rows", str(path)])
        assert on_purpose.exit_code == 0, on_purpose.output
        assert b.execute("SELECT count(*) FROM memory_items").fetchone() == (40,)
