"""Migration speed and memory: the tool beside a plain set-based INSERT ... SELECT of the same mapping.

    python benchmarks/bench_migrate.py --rows 100000 [--dsn postgresql://...]

Both runs start from copies of one fixture database (same data), in the same run. The baseline is one
INSERT ... SELECT per table with the mapping's expressions: no batches, no quarantine, no checkpoints, no
ledger, indexes in place (how a plain script does it). The tool runs as a child process (peak RSS measured).
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg
from common import dbname, run_tool, scratch_database, server_dsn
from psycopg import sql

from unified_memory import fixtures, schema
from unified_memory.mapping import mapping_for
from unified_memory.shapes import detect_all


def plain_insert_select(conn: psycopg.Connection, table: str, shape: str) -> int:
    """The baseline: the mapping as one set-based statement, good rows only."""
    m = mapping_for(table, shape)
    cols = m.column_sql()
    targets = sql.SQL(", ").join(sql.Identifier(n) for n, _ in cols)
    exprs = sql.SQL(", ").join(sql.SQL(e) for _, e in cols)
    if m.expands:
        source = sql.SQL(
            "FROM (SELECT o.row_key, e.idx - 1 AS item_index, e.item, o.user_id FROM (SELECT s.ctid::text AS row_key, "
            "s.user_id, memory_migration_try_jsonb(s.memory_json) AS doc FROM long_term_memory s) o "
            "CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(o.doc) WHEN 'array' THEN o.doc "
            "ELSE jsonb_build_array(o.doc) END) WITH ORDINALITY AS e(item, idx) "
            "WHERE jsonb_typeof(o.doc) IN ('array', 'object', 'string') AND o.user_id IS NOT NULL) s")
    else:
        source = sql.SQL("FROM {} s").format(sql.Identifier(table))
    query = sql.SQL("INSERT INTO memories ({}, source_table, source_key) SELECT {}, {}, {} {} WHERE {} IS NULL "
                    "ON CONFLICT DO NOTHING").format(targets, exprs, sql.Literal(table), sql.SQL(m.key), source,
                                                     sql.SQL(f"({m.reason_sql()})"))
    return conn.execute(query, {"tz": "UTC"}).rowcount


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per legacy table")
    parser.add_argument("--dsn", help="server to measure on (a database is created and dropped)")
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()
    server = server_dsn(args.dsn)
    with scratch_database(server) as template:
        with psycopg.connect(template, autocommit=True) as conn:
            made = fixtures.create(conn, rows=args.rows)
            schema.up(conn)
            shapes = {t: d.shape for t, d in detect_all(conn).items() if d}
            source_rows = sum(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0]
                              for t in shapes)
            version = conn.execute("SHOW server_version").fetchone()[0]
        with scratch_database(server, dbname(template)) as base_db, psycopg.connect(base_db, autocommit=True) as conn:
            started = time.monotonic()
            baseline_memories = sum(plain_insert_select(conn, t, s) for t, s in shapes.items())
            baseline_seconds = time.monotonic() - started
        with scratch_database(server, dbname(template)) as tool_db:
            tool = run_tool(["--dsn", tool_db, "--json", "migrate", "--no-backup", "--batch-size",
                             str(args.batch_size)])
            summary = json.loads(tool.stdout)
    tool_memories = sum(t["migrated"] for t in summary["tables"].values())
    result = {
        "server": f"PostgreSQL {version}", "rows_per_table": args.rows, "source_rows": source_rows,
        "fixture_seconds": round(made.seconds, 2),
        "baseline": {"seconds": round(baseline_seconds, 2), "memories": baseline_memories,
                     "source_rows_per_s": round(source_rows / baseline_seconds)},
        "tool": {"seconds": round(tool.seconds, 2), "memories": tool_memories,
                 "source_rows_per_s": round(source_rows / tool.seconds), "peak_rss_mb": round(tool.peak_rss_mb, 1),
                 "unaccounted": summary["unaccounted"]},
        "ratio_tool_to_baseline": round(baseline_seconds / tool.seconds, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
