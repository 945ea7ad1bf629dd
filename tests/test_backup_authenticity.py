"""Issue 10: authenticity. With a key only authenticated backups are read; a forged definition never runs."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from catalog import snapshot
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.backup import backup, default_path, verify
from unified_memory.backupfile import KEY_ENV, BackupWriter, read_records
from unified_memory.cli import app
from unified_memory.errors import BackupIntegrityError, RollbackError
from unified_memory.migrate import migrate
from unified_memory.rollback import rollback

SECRET_FILE = "/etc/hostname"


def forge(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite an unauthenticated backup consistently (as anyone who can write the file could), with ``edit``
    applied to the definition of memory_items in its T record and in the manifest."""
    writer = BackupWriter(target, secret=None)
    for record in read_records(source, secret=None):
        payload = record.payload
        if record.kind in (b"T", b"M"):
            data = json.loads(payload)
            if record.kind == b"T" and data["table"] == "memory_items":
                edit(data["definition"])
            if record.kind == b"M":
                edit(data["tables"]["memory_items"]["definition"])
            payload = json.dumps(data, sort_keys=True).encode()
        writer.record(record.kind, payload)
    writer.commit()


def _check(expression: str, suffix: str = "") -> Callable[[dict[str, Any]], None]:
    def edit(definition: dict[str, Any]) -> None:
        definition["constraints"].append({"name": "forged", "type": "c",
                                          "definition": f"CHECK ({expression}){suffix}"})
    return edit


def _default(definition: dict[str, Any]) -> None:
    text_column = next(c for c in definition["columns"] if c["type"] == "text")
    text_column["default"] = f"pg_read_file('{SECRET_FILE}')"


@pytest.mark.parametrize(("rows", "edit", "reason"), [
    # rows to check: evaluated as the restore role, which may not read files
    (30, _check(f"length(pg_read_file('{SECRET_FILE}')) > 0"), "permission denied for function pg_read_file"),
    (0, _check(f"length(pg_read_file('{SECRET_FILE}')) > 0"), "permission denied for function pg_read_file"),
    # NOT VALID: never evaluated on restore, so it would run later as whoever inserts; refused before commit
    (30, _check(f"length(pg_read_file('{SECRET_FILE}')) > 0", " NOT VALID"), "calls pg_read_file(text)"),
    (30, _default, "pg_read_file"),  # refused when created as the restore role, or by the proof before commit
], ids=["check-with-rows", "check-on-empty-table", "check-not-valid", "default"])
def test_a_forged_definition_neither_executes_nor_stays(conn: psycopg.Connection, tmp_path: Path, rows: int,
                                                        edit: Callable[[dict[str, Any]], None], reason: str) -> None:
    fixtures.create(conn, rows=rows, shapes={"memory_items": "I1"})
    schema.up(conn)
    honest = backup(conn, default_path(tmp_path))
    migrate(conn)
    conn.execute("DROP TABLE memory_items CASCADE")
    forged = tmp_path / "forged.umbk"
    forge(honest.path, forged, edit)
    assert not verify(forged).authenticated  # consistent: it verifies, but nothing proves who wrote it
    before = snapshot(conn)
    memories = conn.execute("SELECT count(*) FROM memories").fetchone()
    with pytest.raises(RollbackError, match=re.escape(reason)) as info:  # exit 9: refused, nothing changed
        rollback(conn, forged, yes=True)
    assert Path(SECRET_FILE).read_text().strip() not in str(info.value)
    assert snapshot(conn) == before and conn.execute("SELECT count(*) FROM memories").fetchone() == memories
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'forged'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pg_class WHERE relowner = "
                        "(SELECT oid FROM pg_roles WHERE rolname = 'unified_memory_restore')").fetchone() == (0,)


def test_a_forged_type_is_refused(conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=5, shapes={"memory_items": "I1"})
    honest = backup(conn, default_path(tmp_path))

    def edit(definition: dict[str, Any]) -> None:
        definition["columns"][0]["type_name"] = "int, evil text DEFAULT pg_read_file('/etc/hostname')"
    forge(honest.path, tmp_path / "typed.umbk", edit)
    conn.execute("DROP TABLE memory_items CASCADE")
    with pytest.raises(RollbackError, match="not known here"):
        rollback(conn, tmp_path / "typed.umbk", yes=True)
    assert conn.execute("SELECT to_regclass('memory_items')").fetchone() == (None,)


def test_with_a_key_set_an_unauthenticated_backup_is_refused(dsn: str, home: Path, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=20)
        plain = backup(conn, default_path(tmp_path))
        sealed = backup(conn, default_path(tmp_path), secret=b"k3y")
        with pytest.raises(BackupIntegrityError, match="not authenticated"):
            verify(plain.path, secret=b"k3y")
        assert verify(sealed.path, secret=b"k3y").authenticated
    runner = CliRunner()
    shown = runner.invoke(app, ["backup", "verify", str(plain.path)], env={KEY_ENV: ""})
    assert shown.exit_code == 0 and "NOT authenticated" in shown.output
    assert json.loads(runner.invoke(app, ["--json", "backup", "verify", str(sealed.path)],
                                    env={KEY_ENV: "k3y"}).stdout)["authenticated"] is True
    for args in (["backup", "verify", str(plain.path)], ["--dsn", dsn, "rollback", "--yes", str(plain.path)]):
        refused = runner.invoke(app, args, env={KEY_ENV: "k3y"})
        assert refused.exit_code == 8 and "not authenticated" in refused.output, refused.output
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM memory_items").fetchone() == (20,)


def test_a_maintenance_login_restores_through_the_restore_role(conn: psycopg.Connection, dsn: str,
                                                                tmp_path: Path) -> None:
    fixtures.create(conn, rows=30, shapes={"memory_items": "I1"})
    schema.up(conn)
    login = f"um_operator_{uuid.uuid4().hex[:8]}"
    database = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' IN ROLE unified_memory_maintenance").format(
        sql.Identifier(login)))
    try:
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO unified_memory_maintenance").format(
            sql.Identifier(database)))
        conn.execute("GRANT CREATE ON SCHEMA public TO unified_memory_maintenance")
        conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO unified_memory_maintenance")
        manifest = backup(conn, default_path(tmp_path))
        conn.execute("DROP TABLE memory_items CASCADE")
        params = conninfo_to_dict(dsn)
        params.update(user=login, password="pw")
        with psycopg.connect(make_conninfo(**params), autocommit=True) as operator:  # type: ignore[arg-type]
            assert operator.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (
                False,)
            result = rollback(operator, manifest.path, yes=True)
        assert result.tables["memory_items"].action == "restored"
        assert conn.execute("SELECT count(*), pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = "
                            "'memory_items'::regclass)) FROM memory_items").fetchone() == (
            30, "unified_memory_maintenance")
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles "
                            "WHERE rolname = 'unified_memory_restore')").fetchone() == (0,)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(login)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))
