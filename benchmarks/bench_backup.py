"""Backup and restore speed: the tool beside pg_dump -Fc / pg_restore of the same tables, in the same run.

    python benchmarks/bench_backup.py --rows 100000 [--realistic-rows 100000] [--vector-share 0.9] [--dsn ...]

Two payloads, each measured in full: ``synthetic`` is the fixture as generated (short numbered texts, one value
repeated across each vector: compresses about 9x, cheap for any compressor); ``realistic`` is the same rows
with prose texts and random-valued embeddings on 90% of memory_items, as memories and embeddings are in the
field. Backup: ``unified-memory backup`` (binary COPY + zstd, one snapshot) against ``pg_dump -Fc -t <legacy
tables>``. Restore: ``unified-memory rollback --yes`` (verify the file, stage, read back to the SHA-256,
switch) against ``pg_restore`` of the dump, each into a copy of the database with the legacy tables dropped.
Both tools run as child processes; the tool's peak RSS is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from common import dbname, make_realistic, run_tool, scratch_database, server_dsn

from unified_memory import fixtures
from unified_memory.shapes import LEGACY_TABLES


def client_binary(conn: psycopg.Connection, name: str) -> str:
    """pg_dump / pg_restore of the server's major version (Debian's layout, else pgserver's, else PATH)."""
    major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000  # type: ignore[index]
    for candidate in (Path(f"/usr/lib/postgresql/{major}/bin/{name}"), _pgserver_bin(name)):
        if candidate is not None and candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found")
    return found


def _pgserver_bin(name: str) -> Path | None:
    try:
        import pgserver._commands as commands
    except ImportError:
        return None
    return Path(commands.POSTGRES_BIN_PATH) / name


def timed(args: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(args, check=True, capture_output=True)
    return time.monotonic() - started


def drop_legacy(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in LEGACY_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")  # noqa: S608 - constant names


def measure(server: str, rows: int, *, realistic: bool, work: Path, vector_share: float = 0.9) -> dict[str, object]:
    """One payload: build it, then backup / restore with both tools."""
    with scratch_database(server) as source:
        with psycopg.connect(source, autocommit=True) as conn:
            fixtures.create(conn, rows=rows)
            if realistic:
                make_realistic(conn, dim=fixtures.VECTOR_DIM, with_vector=vector_share)
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            size = conn.execute("SELECT sum(pg_total_relation_size(c)) FROM unnest(%s::regclass[]) c",
                                [list(LEGACY_TABLES)]).fetchone()[0]  # type: ignore[index]
            pg_dump, pg_restore = client_binary(conn, "pg_dump"), client_binary(conn, "pg_restore")
        dump = work / "legacy.dump"
        tables = [a for t in LEGACY_TABLES for a in ("-t", t)]
        dump_seconds = timed([pg_dump, "-Fc", "-f", str(dump), *tables, "-d", source])
        ours = work / "legacy.umbk"
        tool = run_tool(["--dsn", source, "-q", "--data-dir", str(work / "home"), "backup", "--out", str(ours)])
        with scratch_database(server, dbname(source)) as restore_db:
            drop_legacy(restore_db)
            restore_seconds = timed([pg_restore, "-d", restore_db, str(dump)])
        with scratch_database(server, dbname(source)) as rollback_db:
            drop_legacy(rollback_db)
            rolled = run_tool(["--dsn", rollback_db, "-q", "--data-dir", str(work / "home"), "rollback", "--yes",
                               str(ours)])
    result = {
        "payload": f"realistic, {vector_share:.0%} of memory_items with vectors" if realistic else "synthetic",
        "server": f"PostgreSQL {version}",
        "rows_per_table": rows, "legacy_tables_bytes": int(size),
        "backup": {"tool_seconds": round(tool.seconds, 2), "pg_dump_Fc_seconds": round(dump_seconds, 2),
                   "speedup": round(dump_seconds / tool.seconds, 2), "tool_peak_rss_mb": round(tool.peak_rss_mb, 1),
                   "tool_file_bytes": ours.stat().st_size, "pg_dump_file_bytes": dump.stat().st_size},
        "restore": {"tool_rollback_seconds": round(rolled.seconds, 2),
                    "pg_restore_seconds": round(restore_seconds, 2),
                    "ratio_pg_restore_to_tool": round(restore_seconds / rolled.seconds, 2),
                    "tool_peak_rss_mb": round(rolled.peak_rss_mb, 1)},
    }
    dump.unlink()
    ours.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000,
                        help="rows per legacy table, synthetic payload (0 skips it)")
    parser.add_argument("--realistic-rows", type=int, default=100_000,
                        help="rows per legacy table, realistic payload (0 skips it)")
    parser.add_argument("--vector-share", type=float, default=0.9,
                        help="share of memory_items rows given a random embedding in the realistic payload")
    parser.add_argument("--dsn", help="server to measure on (databases are created and dropped)")
    args = parser.parse_args()
    server = server_dsn(args.dsn)
    work = Path(tempfile.mkdtemp(prefix="um-bench-backup-"))
    try:
        results = [measure(server, args.rows, realistic=False, work=work)] if args.rows else []
        if args.realistic_rows:
            results.append(measure(server, args.realistic_rows, realistic=True, work=work,
                                   vector_share=args.vector_share))
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
