"""Migration speed and memory: the tool beside load-then-index of its own mapping SQL, same data, same run.

    python benchmarks/bench_migrate.py --rows 100000 [--dsn postgresql://...] [--jobs 1 --jobs 0]

Every measurement starts from a copy of one fixture database. The baseline is how a database engineer loads
a table fast: the secondary indexes of the empty ``memories`` dropped, one ``INSERT ... SELECT`` per legacy
table with the mapping's own expressions (the same SQL the tool runs, kept vectors included, good rows only,
no quarantine, checkpoints or ledger), the indexes rebuilt, ``ANALYZE``. The tool runs as a child process
(``--jobs 0`` means its default) and its peak RSS is measured; its JSON summary carries the time per phase.
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg
from common import dbname, run_tool, scratch_database, server_dsn
from psycopg import sql

from unified_memory import batchsql, fixtures, schema
from unified_memory.mapping import mapping_for
from unified_memory.shapes import detect_all


def load_table(conn: psycopg.Connection, table: str, shape: str) -> int:
    """One statement: the mapping over the whole table, memories and kept vectors, good rows only."""
    m = mapping_for(table, shape)
    return int(conn.execute(batchsql.whole_table_load(m), {"tz": "UTC", "expiry": "arrival"}).rowcount)


def load_then_index(conn: psycopg.Connection, shapes: dict[str, str]) -> dict[str, float]:
    """The baseline; seconds per phase."""
    times: dict[str, float] = {}
    started = time.monotonic()
    indexes = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'memories' "
                           "AND left(indexname, 13) = 'idx_memories_'").fetchall()
    for name, _ in indexes:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    times["drop_indexes"] = time.monotonic() - started
    # As an engineer loading by hand would: the tool's work_mem, and no nested loop for the kept vectors' join
    # with the INSERT's RETURNING set (a CTE without statistics: a nested loop there is quadratic in the table).
    conn.execute("SET work_mem = '64MB'")
    conn.execute("SET enable_nestloop = off")
    for table, shape in shapes.items():
        mark = time.monotonic()
        load_table(conn, table, shape)
        times[f"load {table}"] = time.monotonic() - mark
    mark = time.monotonic()
    conn.execute("SET maintenance_work_mem = '256MB'")
    for _, definition in indexes:
        conn.execute(definition.encode())  # pg_get_indexdef output of the fixture database, not input
    times["rebuild_indexes"] = time.monotonic() - mark
    mark = time.monotonic()
    conn.execute("ANALYZE memories")
    times["analyze"] = time.monotonic() - mark
    times["total"] = time.monotonic() - started
    return times


def measure_tool(server: str, template: str, jobs: int, batch_size: int | None) -> dict[str, object]:
    with scratch_database(server, template) as tool_db:
        args = ["--dsn", tool_db, "--json", "migrate", "--no-backup"]
        args += ["--jobs", str(jobs)] if jobs else []
        args += ["--batch-size", str(batch_size)] if batch_size else []
        tool = run_tool(args)
        summary = json.loads(tool.stdout)
    return {"jobs": summary["options"].get("jobs", jobs), "seconds": round(tool.seconds, 2),
            "memories": sum(t["migrated"] for t in summary["tables"].values()),
            "peak_rss_mb": round(tool.peak_rss_mb, 1), "unaccounted": summary["unaccounted"],
            "phases": summary.get("phases", {}),
            "tables": {t: v["this_run"]["seconds"] for t, v in summary["tables"].items()}}


def measure_baseline(server: str, template: str, shapes: dict[str, str]) -> dict[str, object]:
    with scratch_database(server, template) as base_db, psycopg.connect(base_db, autocommit=True) as conn:
        phases = load_then_index(conn, shapes)
        memories = int((conn.execute("SELECT count(*) FROM memories").fetchone() or (0,))[0])
    return {"seconds": round(phases["total"], 2), "memories": memories,
            "phases": {k: round(v, 2) for k, v in phases.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per legacy table")
    parser.add_argument("--dsn", help="server to measure on (databases are created and dropped)")
    parser.add_argument("--batch-size", type=int, help="the tool's --batch-size (default: its own)")
    parser.add_argument("--jobs", type=int, action="append", help="the tool's --jobs; 0 = its default "
                        "(repeatable; default: 1 and 0)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="measure the tool only (for the 1M-rows-per-table flatness run)")
    args = parser.parse_args()
    server = server_dsn(args.dsn)
    with scratch_database(server) as template:
        with psycopg.connect(template, autocommit=True) as conn:
            fixtures.create(conn, rows=args.rows)
            schema.up(conn)
            conn.execute("VACUUM ANALYZE")
            shapes = {t: d.shape for t, d in detect_all(conn).items() if d}
            counted = [conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()
                       for t in shapes]
            source_rows = sum(int(c[0]) for c in counted if c)
            version = str((conn.execute("SHOW server_version").fetchone() or ("?",))[0])
        baseline: dict[str, object] = {}
        if not args.no_baseline:
            baseline = measure_baseline(server, dbname(template), shapes)
        tools = [measure_tool(server, dbname(template), jobs, args.batch_size) for jobs in (args.jobs or [1, 0])]
    for t in tools:
        t["memories_per_second"] = round(float(str(t["memories"])) / float(str(t["seconds"])))
        if baseline:
            t["ratio_to_load_then_index"] = round(float(str(baseline["seconds"])) / float(str(t["seconds"])), 2)
    result = {"server": f"PostgreSQL {version}", "rows_per_table": args.rows, "source_rows": source_rows,
              "load_then_index": baseline or None, "tool": tools}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
