"""Issue 11: the guide end to end as a non-superuser LOGIN member of unified_memory_maintenance."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from roles import MAINTENANCE_ROLE, login_roles
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.cli import app


@pytest.fixture
def maintenance_dsn(dsn: str, server_dsn: str) -> Iterator[str]:
    """Legacy tables, then the schema applied by the superuser; a fresh maintenance login to run the rest."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=300)
        schema.up(conn)
    with login_roles(server_dsn) as make:
        yield make(dsn, MAINTENANCE_ROLE)


def _run(args: list[str]) -> tuple[int, dict[str, object] | str]:
    result = CliRunner().invoke(app, args)
    try:
        return result.exit_code, json.loads(result.stdout)
    except ValueError:
        return result.exit_code, result.output


def test_the_guide_runs_end_to_end_as_a_maintenance_login(maintenance_dsn: str, dsn: str, home: Path) -> None:
    with psycopg.connect(maintenance_dsn) as conn:
        row = conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False, False)
    code, migrated = _run(["--dsn", maintenance_dsn, "--json", "migrate", "--batch-size", "200"])
    assert code == 0, migrated
    assert isinstance(migrated, dict) and migrated["status"] == "succeeded"
    code, validated = _run(["--dsn", maintenance_dsn, "--json", "validate"])
    assert isinstance(validated, dict), validated
    failed = [c["name"] for c in validated["checks"] if c["status"] == "fail"]  # type: ignore[union-attr]
    assert failed == [] and code == 0
    assert _run(["--dsn", maintenance_dsn, "--json", "vectors", "up", "--dim", "64"])[0] == 0
    code, synced = _run(["--dsn", maintenance_dsn, "--json", "vectors", "sync", "--dim", "64"])
    assert code == 0 and isinstance(synced, dict) and synced["synced"] > 0, synced
    code, taken = _run(["--dsn", maintenance_dsn, "--json", "backup"])
    assert code == 0, taken
    first = sorted((home / "backups").glob("memory_migration_backup_*.umbk"))[0]  # taken by migrate
    code, rolled = _run(["--dsn", maintenance_dsn, "--json", "rollback", str(first), "--yes"])
    assert code == 0, rolled
    with psycopg.connect(dsn) as admin:
        assert admin.execute("SELECT count(*) FROM memories WHERE source_table IS NOT NULL").fetchone() == (0,)
        assert admin.execute("SELECT count(*) FROM memory_items").fetchone() == (300,)


@pytest.mark.parametrize("command, revoke, grant", [
    (["migrate"], "REVOKE SELECT ON memory_items FROM {r}", 'GRANT SELECT ON TABLE "memory_items"'),
    (["migrate"], "REVOKE USAGE ON SEQUENCE memory_migration_runs_run_id_seq FROM {r}",
     'GRANT USAGE, SELECT, UPDATE ON SEQUENCE "memory_migration_runs_run_id_seq"'),
    (["backup"], "REVOKE SELECT ON long_term_memory FROM {r}", 'GRANT SELECT ON TABLE "long_term_memory"'),
    (["validate"], "REVOKE INSERT ON memory_migration_quarantine FROM {r}",
     'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "memory_migration_quarantine"'),
    (["vectors", "sync", "--dim", "64"], "REVOKE UPDATE ON memories FROM {r}",
     'GRANT SELECT, UPDATE ON TABLE "memories"'),
])
def test_a_missing_grant_is_named_and_nothing_is_written(maintenance_dsn: str, dsn: str, home: Path,
                                                         command: list[str], revoke: str, grant: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(revoke.format(r=MAINTENANCE_ROLE).encode())
    if command[0] == "vectors":
        assert _run(["--dsn", maintenance_dsn, "vectors", "up", "--dim", "64"])[0] == 0
    code, output = _run(["--dsn", maintenance_dsn, *command])
    assert code == 2, output
    assert f'{grant} TO "{MAINTENANCE_ROLE}";' in str(output)
    assert not list(home.glob("backups/*.umbk"))
    with psycopg.connect(dsn) as admin:
        assert admin.execute("SELECT count(*) FROM memory_migration_runs").fetchone() == (0,)
        assert admin.execute("SELECT count(*) FROM memories").fetchone() == (0,)


def test_rollback_without_create_on_the_database_is_refused_before_anything(maintenance_dsn: str, dsn: str,
                                                                           home: Path) -> None:
    assert _run(["--dsn", maintenance_dsn, "migrate"])[0] == 0
    with psycopg.connect(dsn, autocommit=True) as admin:
        database = admin.execute("SELECT current_database()").fetchone()
        assert database is not None
        admin.execute(f'REVOKE CREATE ON DATABASE "{database[0]}" FROM {MAINTENANCE_ROLE}'.encode())
    backup_file = next((home / "backups").glob("*.umbk"))
    code, output = _run(["--dsn", maintenance_dsn, "rollback", str(backup_file), "--yes"])
    assert code == 2 and f'GRANT CREATE ON DATABASE "{database[0]}"' in str(output), output
    with psycopg.connect(dsn) as admin:
        assert admin.execute("SELECT count(*) FROM memories WHERE source_table IS NOT NULL").fetchone() != (0,)


def test_a_login_allowed_one_connection_migrates_and_validates_on_it(maintenance_dsn: str, server_dsn: str,
                                                                       home: Path, caplog: pytest.LogCaptureFixture
                                                                       ) -> None:
    """The parallel work (migration ranges, reconciliation slices, validate's probes beside the scans) runs on
    the caller's connection when no second one can be opened, instead of failing."""
    login = conninfo_to_dict(maintenance_dsn)["user"]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1").format(sql.Identifier(str(login))))
        assert admin.execute("SELECT current_setting('max_parallel_workers')::int > 1").fetchone() == (True,)
    code, migrated = _run(["--dsn", maintenance_dsn, "--json", "migrate", "--batch-size", "100", "--jobs", "2"])
    assert code == 0 and isinstance(migrated, dict) and migrated["status"] == "succeeded", migrated
    code, validated = _run(["--dsn", maintenance_dsn, "--json", "validate"])
    assert isinstance(validated, dict), validated
    assert [c["name"] for c in validated["checks"] if c["status"] != "pass"] == [] and code == 0  # type: ignore[union-attr]
    assert "parallel connections opened" in caplog.text
