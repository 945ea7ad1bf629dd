"""The CLI, run in-process: help and documentation for every command, exit codes, the automatic backup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from unified_memory import fixtures
from unified_memory.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
REPO = Path(__file__).resolve().parent.parent


def commands() -> list[list[str]]:
    """Every command path of the CLI, e.g. ['schema', 'up']."""
    found: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        if hasattr(command, "commands"):  # a group (typer vendors click: duck-typed)
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        if path:
            found.append(path)

    walk(get_command(app), [])
    return found


@pytest.mark.parametrize("path", commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help_and_is_documented(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    top = path[0]
    assert f"unified-memory {top}" in README, f"`unified-memory {top}` is not in the README"
    if len(path) > 1:
        assert path[-1] in README


def test_migrate_takes_a_verified_backup_before_the_first_write(dsn: str, home: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=200)
    runner = CliRunner()
    assert runner.invoke(app, ["--dsn", dsn, "schema", "up"]).exit_code == 0
    plan = runner.invoke(app, ["--dsn", dsn, "migrate", "--dry-run"])
    assert plan.exit_code == 0 and "DRY RUN" in plan.output and not (home / "backups").exists()
    done = runner.invoke(app, ["--dsn", dsn, "--json", "migrate"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["status"] == "succeeded"
    backups = list((home / "backups").glob("memory_migration_backup_*.umbk"))
    assert len(backups) == 1 and stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    verified = runner.invoke(app, ["backup", "verify", backups[0].name])  # a bare name: found in the backup dir
    assert verified.exit_code == 0 and "VERIFIED" in verified.output
    again = runner.invoke(app, ["--dsn", dsn, "migrate"])
    assert again.exit_code == 0 and "Nothing to do" in again.output
    assert len(list((home / "backups").glob("*.umbk"))) == 1  # a re-run writes no new backup
    log = (home / "memory_migration.log").read_text()
    assert "memory item" not in log and "table=memory_items" in log  # structured, without memory content


def test_backup_exit_codes_for_damage_and_keys(dsn: str, home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=300)
    runner = CliRunner()
    key = tmp_path / "key"
    key.write_text("s3cret passphrase\n")
    out = tmp_path / "b.umbk"
    made = runner.invoke(app, ["--dsn", dsn, "backup", "--out", str(out), "--key-file", str(key)])
    assert made.exit_code == 0, made.output
    assert runner.invoke(app, ["backup", "verify", str(out)]).exit_code == 12  # encrypted, no key
    monkeypatch.setenv("UNIFIED_MEMORY_BACKUP_KEY", "wrong")
    assert runner.invoke(app, ["backup", "verify", str(out)]).exit_code == 12
    assert runner.invoke(app, ["backup", "verify", str(out), "--key-file", str(key)]).exit_code == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 1
    out.write_bytes(bytes(data))
    tampered = runner.invoke(app, ["backup", "verify", str(out), "--key-file", str(key)])
    assert tampered.exit_code == 8 and "altered" in tampered.output


def test_errors_never_show_the_password(home: Path) -> None:
    result = CliRunner().invoke(app, ["--dsn", "postgresql://bob:hunter2@127.0.0.1:1/nowhere", "schema", "status"])
    assert result.exit_code == 3 and "hunter2" not in result.output and "FAILED" in result.output


def test_the_guides_script_runs_from_any_directory_with_any_python(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "validate_unified_memory_migration.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "Usage" in done.stdout
    shell = subprocess.run([str(REPO / "docker" / "database" / "scripts" / "migrate.sh"), "sideways", "postgres"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert shell.returncode == 2 and "usage: migrate.sh" in shell.stderr
