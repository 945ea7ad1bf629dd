"""Issue 10: backup files that cannot collide or be hijacked; ``migrate`` reads its backup back before writing."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from crash import kill_when, spawn
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.backup import BACKUP_PREFIX, BackupManifest, backup, default_path, read_back, verify
from unified_memory.backupfile import SETTLED_SECONDS, BackupWriter, clean_leftovers
from unified_memory.cli import app
from unified_memory.errors import BackupIntegrityError, ConfigError


def test_names_are_unique_and_sort_by_time(tmp_path: Path) -> None:
    names = [default_path(tmp_path).name for _ in range(200)]
    assert len(set(names)) == 200
    stamps = [n.rsplit("_", 1)[0] for n in names]
    assert stamps == sorted(stamps)


def test_two_backups_started_together_each_verify(conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    fixtures.create(conn, rows=400)
    results: list[BackupManifest | BaseException] = []
    gate = threading.Barrier(2)

    def one() -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            gate.wait()
            try:
                results.append(backup(own, default_path(tmp_path), lock_wait=0))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifests = [r for r in results if isinstance(r, BackupManifest)]
    assert len(manifests) == 2, results
    assert manifests[0].path != manifests[1].path
    for m in manifests:
        assert {t: b.sha256 for t, b in verify(m.path).tables.items()} == {t: b.sha256 for t, b in m.tables.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(m.path.name for m in manifests)  # no .partial left


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "unified_memory.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **env})


def test_backup_and_migrate_started_together_both_succeed_with_their_own_verified_files(
        conn: psycopg.Connection, dsn: str, home: Path) -> None:
    fixtures.create(conn, rows=400)
    schema.up(conn)
    env = {"UNIFIED_MEMORY_HOME": str(home)}
    procs = [_cli("--dsn", dsn, "--quiet", "backup", env=env), _cli("--dsn", dsn, "--quiet", "migrate", env=env)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    files = sorted((home / "backups").glob("memory_migration_backup_*.umbk"))
    assert len(files) == 2 and not list((home / "backups").glob(".*"))
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert verify(path).tables["memory_items"].rows == 400


def test_a_planted_symlink_is_never_written_through(conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=50)
    backups, outside = tmp_path / "backups", tmp_path / "stolen"
    backups.mkdir(mode=0o700)
    outside.write_bytes(b"")
    target = backups / "memory_migration_backup_planted.umbk"
    (backups / f".{target.name}.partial").symlink_to(outside)
    with pytest.raises(ConfigError, match="exclusively"):  # planted after the clean-up: the open refuses it
        BackupWriter(target, secret=None)
    assert outside.read_bytes() == b"" and not target.exists()
    # planted before: a leftover for the clean-up, which removes the link (never its target), then writes its own
    manifest = backup(conn, target)
    assert outside.exists() and outside.read_bytes() == b""
    assert sorted(p.name for p in backups.iterdir()) == [target.name] and verify(manifest.path).tables


def test_an_existing_file_is_never_overwritten(conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=5)
    target = tmp_path / "mine.umbk"
    target.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="never overwrites"):
        backup(conn, target)
    assert target.read_bytes() == b"precious"


def test_leftovers_of_killed_writers_are_removed_but_a_live_writers_file_stays(
        conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=5)
    dead, live = tmp_path / ".memory_migration_backup_dead.umbk.partial", tmp_path / \
        ".memory_migration_backup_live.umbk.partial"
    dead.write_bytes(b"half")
    live.write_bytes(b"writing")
    long_ago = time.time() - 2 * SETTLED_SECONDS
    for path in (dead, live):  # both settled: the live one is known by its lock alone
        os.utime(path, (long_ago, long_ago))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        manifest = backup(conn, default_path(tmp_path))
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)
    assert verify(manifest.path).tables["memory_items"].rows == 5


def test_a_writer_between_creating_and_locking_its_file_keeps_it(tmp_path: Path) -> None:
    """A writer creates its partial file, then locks it. A second backup's clean-up in between used to see an
    unlocked file, remove it, and make the first backup fail at its end (seen in CI as FileNotFoundError)."""
    just_created = tmp_path / ".memory_migration_backup_new.umbk.partial"
    just_created.write_bytes(b"")
    assert clean_leftovers(tmp_path, BACKUP_PREFIX) == [] and just_created.exists()
    long_ago = time.time() - 2 * SETTLED_SECONDS
    os.utime(just_created, (long_ago, long_ago))  # a writer killed long ago: unlocked and settled
    assert clean_leftovers(tmp_path, BACKUP_PREFIX) == [just_created.name] and not just_created.exists()


@pytest.mark.parametrize("problem", ["group-writable", "world-writable", "someone else's"])
def test_an_unsafe_backup_directory_is_refused_with_exit_2(dsn: str, home: Path, tmp_path: Path,
                                                           problem: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=5)
    shared = tmp_path / "shared"
    shared.mkdir()
    if problem == "someone else's":
        shared.chmod(0o700)
        if os.geteuid() != 0:
            pytest.skip("changing a directory's owner needs root")
        os.chown(shared, 65534, 65534)
    else:
        shared.chmod(0o770 if problem == "group-writable" else 0o777)
    result = CliRunner().invoke(app, ["--dsn", dsn, "backup"], env={"UNIFIED_MEMORY_BACKUP_DIR": str(shared)})
    assert result.exit_code == 2, result.output
    assert ("writable" if "writable" in problem else "owned by uid 65534") in result.output
    assert list(shared.iterdir()) == []


def test_read_back_refuses_a_backup_that_does_not_verify(conn: psycopg.Connection, tmp_path: Path) -> None:
    fixtures.create(conn, rows=100)
    manifest = backup(conn, default_path(tmp_path))
    assert read_back(manifest, secret=None).tables.keys() == manifest.tables.keys()
    data = bytearray(manifest.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    manifest.path.write_bytes(bytes(data))
    with pytest.raises(BackupIntegrityError):
        read_back(manifest, secret=None)


def test_a_backup_killed_mid_copy_leaves_nothing_trusted_and_the_next_one_cleans_up(dsn: str, home: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=3000)
    backups = home / "backups"
    proc = spawn(["--dsn", dsn, "-q", "backup", "--copy-format", "text"], env={"UNIFIED_MEMORY_HOME": str(home)})
    assert kill_when(proc, dsn, state="active", query_prefix="COPY", nth=2), "the kill should land mid-backup"
    left = sorted(p.name for p in backups.iterdir())
    assert left and all(n.startswith(".memory_migration_backup_") and n.endswith(".partial") for n in left)
    long_ago = time.time() - 2 * SETTLED_SECONDS  # the leftover has settled: no writer is between create and lock
    for name in left:
        os.utime(backups / name, (long_ago, long_ago))
    done = CliRunner().invoke(app, ["--dsn", dsn, "--json", "backup"], env={"UNIFIED_MEMORY_HOME": str(home)})
    assert done.exit_code == 0, done.output
    (final,) = sorted(backups.iterdir())  # the leftover is gone; only the new, complete file is there
    assert verify(final).tables["memory_items"].rows == 3000
