"""Issue 10: exit codes and redaction. Bad values exit 2 before anything runs; lost backends are transient (3);
disk full is one FAILED line; no memory text in the ledger or a traceback; log and report files end 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.cli import Options, app, failures
from unified_memory.errors import describe, translate

SECRET = "my bank pin is 4921"


@pytest.mark.parametrize("args", [
    ["migrate", "--pause-ms", "-100"], ["migrate", "--batch-size", "1e20"],
    ["migrate", "--batch-size", "100000000000000000000"], ["migrate", "--batch-size", "0"],
    ["migrate", "--max-batch-bytes", "-1"], ["--lock-wait", "-1", "migrate"], ["schema", "down", "--steps", "0"],
    ["vectors", "sync", "--batch-size", "-5"], ["legacy", "create", "--rows", "-1"],
], ids=lambda a: " ".join(a))
def test_bad_option_values_exit_2_before_anything_runs(dsn: str, home: Path, args: list[str]) -> None:
    result = CliRunner().invoke(app, ["--dsn", dsn, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('memory_migration_runs')").fetchone() == (None,)


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "99999999999"])
def test_a_bad_connect_timeout_exits_2(dsn: str, home: Path, value: str) -> None:
    params = conninfo_to_dict(dsn)
    params["connect_timeout"] = value
    result = CliRunner().invoke(app, ["--dsn", make_conninfo(**params), "schema", "status"])  # type: ignore[arg-type]
    assert result.exit_code == 2 and "connect_timeout" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_terminated_backend_is_transient_exit_3(dsn: str, home: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=400)
        schema.up(conn)
        proc = subprocess.Popen([sys.executable, "-m", "unified_memory.cli", "--dsn", dsn, "--quiet", "migrate",
                                 "--no-backup", "--batch-size", "10", "--pause-ms", "100"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
        deadline = time.monotonic() + 60
        killed = 0
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'unified-memory migrate%' AND pid <> pg_backend_pid()").fetchone()[0]
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    assert killed, "the migration was never seen running"
    assert proc.returncode == 3, err.decode()
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("FAILED:") and "Traceback" not in err.decode()


def test_disk_full_is_one_failed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = Options(None, tmp_path, False, False, False)
    with pytest.raises(BaseException) as info, failures(opts), open("/dev/full", "wb") as full:
        full.write(b"x" * 65536)
        full.flush()  # a real ENOSPC from the kernel
    assert getattr(info.value, "exit_code", None) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("FAILED: disk full writing")


def test_data_in_errors_never_reaches_messages(conn: psycopg.Connection) -> None:
    for query in (f"SELECT '{{\"text\": \"{SECRET}\", \"x\": \"\\u0000\"}}'::jsonb ->> 'text'",
                  f"SELECT '{SECRET}'::uuid", f"SELECT '{{\"text\": \"{SECRET}\"'::jsonb"):
        with pytest.raises(psycopg.Error) as info:
            conn.execute(query)
        assert SECRET in str(info.value)  # PostgreSQL quotes it (CONTEXT, or the primary message)
        assert SECRET not in describe(info.value) and SECRET not in str(translate(info.value, "reading"))


def test_no_memory_text_in_the_ledger_or_the_traceback(dsn: str, home: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=20)
        schema.up(conn)
        conn.execute("INSERT INTO memory_items (id, content, scope, kind) VALUES (gen_random_uuid(), %s, "
                     "'user:u1', 'fact')", [SECRET])
        conn.execute("""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.text LIKE '%%bank pin%%' THEN
                    RAISE EXCEPTION USING ERRCODE = 'XX000', MESSAGE = 'trigger refused a row',
                                          DETAIL = NEW.text, HINT = NEW.text;
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON memories FOR EACH ROW EXECUTE FUNCTION refuse()")
        result = CliRunner().invoke(app, ["--dsn", dsn, "--traceback", "migrate", "--no-backup"])
        assert result.exit_code == 1 and "trigger refused a row" in result.output, result.output
        assert SECRET not in result.output
        (error,) = conn.execute("SELECT error FROM memory_migration_runs WHERE status = 'failed'").fetchone()
        assert "trigger refused a row" in error and SECRET not in error
    assert SECRET not in (home / "memory_migration.log").read_text()


def test_log_and_report_files_are_0600_even_when_they_existed(dsn: str, home: Path, tmp_path: Path) -> None:
    home.mkdir(parents=True, mode=0o700)
    log, report = home / "memory_migration.log", tmp_path / "report.md"
    for path in (log, report):
        path.write_text("old\n")
        path.chmod(0o644)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.up(conn)
    CliRunner().invoke(app, ["--dsn", dsn, "validate", "--report", str(report)])
    CliRunner().invoke(app, ["--dsn", dsn, "migrate", "--dry-run"])
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and stat.S_IMODE(report.stat().st_mode) == 0o600
