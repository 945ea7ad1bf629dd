"""Validation speed on about a million memories with their legacy tables.

    python benchmarks/bench_validate.py --rows 160000 [--dsn postgresql://...]

``--rows`` legacy rows per table (160,000 give about a million memories, long_term_memory expanding to ~3.4
items a row). The migration and a VACUUM ANALYZE run first (not timed here), then ``unified-memory validate`` as
a child process (wall time, peak RSS; the best of ``--rounds`` runs, alternating with the compared checkout's).
Baseline in the same run: the first attempt's kind of validation, a plain count(*) of memories and of each
legacy table, which reads every table once and compares nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg
from common import run_tool, scratch_database, server_dsn
from psycopg import sql

from unified_memory import fixtures, schema
from unified_memory.migrate import migrate
from unified_memory.shapes import LEGACY_TABLES

PLAIN_COUNTS = [sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t)) for t in ("memories", *LEGACY_TABLES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=160_000, help="rows per legacy table")
    parser.add_argument("--dsn", help="server to measure on (a database is created and dropped)")
    parser.add_argument("--compare-with", help="the src/ directory of another checkout: its validate also runs, "
                                               "on the same database in the same run (e.g. before a change)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each validator, alternating (best kept)")
    args = parser.parse_args()
    with scratch_database(server_dsn(args.dsn)) as db:
        with psycopg.connect(db, autocommit=True) as conn:
            fixtures.create(conn, rows=args.rows)
            schema.up(conn)
            run = migrate(conn)
            # settle the load first (hint bits, visibility map, statistics), as autovacuum would: otherwise it
            # runs during whichever validator comes first and the comparison measures autovacuum
            conn.execute("VACUUM ANALYZE")
            memories = conn.execute("SELECT count(*) FROM memories").fetchone()[0]  # type: ignore[index]
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            started = time.monotonic()
            for query in PLAIN_COUNTS:
                conn.execute(query)
            baseline = time.monotonic() - started
        tools, others = [], []
        for _ in range(max(1, args.rounds)):  # alternating, so neither side always runs on a warmer cache
            tools.append(run_tool(["--dsn", db, "--json", "validate"]))
            if args.compare_with:
                others.append(run_tool(["--dsn", db, "--json", "validate"], env={"PYTHONPATH": args.compare_with}))
        tool = min(tools, key=lambda r: r.seconds)
        report = json.loads(tool.stdout)
        other = min(others, key=lambda r: r.seconds) if others else None
    print(json.dumps({
        "server": f"PostgreSQL {version}", "rows_per_table": args.rows, "memories": memories,
        "migration_seconds": round(run.seconds, 1),
        "validate": {"seconds": round(tool.seconds, 2), "rounds": [round(r.seconds, 2) for r in tools],
                     "peak_rss_mb": round(tool.peak_rss_mb, 1),
                     "status": report["status"], "checks": report["counts"]},
        "baseline_plain_counts_seconds": round(baseline, 2),
        "compared_checkout": {"src": args.compare_with, "seconds": round(other.seconds, 2),
                              "rounds": [round(r.seconds, 2) for r in others],
                              "status": json.loads(other.stdout)["status"]} if other else None,
    }, indent=2))


if __name__ == "__main__":
    main()
