"""The cost of one metrics refresh (one snapshot) on a store of about a million memories.

    python benchmarks/bench_metrics.py --memories 1000000 [--dsn postgresql://...]

Fills ``memories`` directly with SQL (not through the migration, to keep the set-up short): ``--tenants``
tenants, every decay tier and memory type, 3% soft-deleted, 2% expired, created over two years (so many are
decay-cleanup candidates), a migration run that wrote them, 1% quarantined rows, an hour and a half of access
log (1 in 20 an error), then VACUUM ANALYZE as a live database would be. Timed: ``metrics.snapshot`` in-process
(``--repeat`` times; the median and the worst), and ``unified-memory metrics`` as a child process (wall time
with the interpreter's start-up, peak RSS). Baselines in the same run: one ``SELECT count(*) FROM memories``
(the least a figure over memories can cost) and the existing ``health`` command's queries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psycopg
from common import run_tool, scratch_database, server_dsn

from unified_memory import metrics, schema
from unified_memory.health import health

FILL = """
INSERT INTO memories (user_id, org_id, text, importance, decay_tier, memory_type, neuro_type, created_at,
                      deleted_at, expires_at, embedding_id, source_table, source_key, migrated_at, access_count)
SELECT 'user-' || (n %% %(tenants)s), CASE WHEN n %% 4 = 0 THEN 'org-' || (n %% 211) END,
       'a memory about the weekly project review number ' || n, 1 + n %% 10,
       (ARRAY['short', 'medium', 'long', 'pinned'])[1 + n %% 4],
       (ARRAY['general', 'fact', 'preference', 'context', 'conversation', 'insight', 'episodic', 'semantic',
              'procedural'])[1 + n %% 9],
       (ARRAY['episodic', 'semantic', 'procedural'])[1 + n %% 3],
       now() - (n %% 730) * interval '1 day',
       CASE WHEN n %% 33 = 0 THEN now() END,
       CASE WHEN n %% 50 = 0 THEN now() - interval '1 hour' END,
       CASE WHEN n %% 10 <> 0 THEN 'vec-' || n END,
       'memory_entries', n::text, now(), n %% 7
FROM generate_series(1, %(memories)s) AS n
"""
RUN = ("INSERT INTO memory_migration_runs (started_at, finished_at, status) "
       "VALUES (now() - interval '10 minutes', now(), 'succeeded')")
QUARANTINE = ("INSERT INTO memory_migration_quarantine (source_table, source_key, reason, run_id) "
              "SELECT 'memory_items', n::text, (ARRAY['missing_owner', 'empty_text', 'duplicate_id'])[1 + n %% 3], 1 "
              "FROM generate_series(1, %(rows)s) AS n")
ACCESS = ("INSERT INTO memory_access_log (user_id, access_type, response_status, accessed_at) "
          "SELECT 'user-' || (n %% 1000), (ARRAY['read', 'write', 'update', 'delete', 'search'])[1 + n %% 5], "
          "CASE WHEN n %% 20 = 0 THEN 500 ELSE 200 END, now() - (n %% 5400) * interval '1 second' "
          "FROM generate_series(1, %(rows)s) AS n")


def fill(conn: psycopg.Connection, memories: int, tenants: int) -> float:
    started = time.monotonic()
    schema.up(conn)
    conn.execute(RUN)
    conn.execute(FILL, {"memories": memories, "tenants": tenants})
    conn.execute(QUARANTINE, {"rows": memories // 100})
    conn.execute(ACCESS, {"rows": memories // 10})
    conn.execute("VACUUM ANALYZE")
    return time.monotonic() - started


def timed(work: object, repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        started = time.monotonic()
        work()  # type: ignore[operator]
        seconds.append(time.monotonic() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memories", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dsn", help="server to measure on (a database is created and dropped)")
    args = parser.parse_args()
    with scratch_database(server_dsn(args.dsn)) as db:
        with psycopg.connect(db, autocommit=True) as conn:
            setup = fill(conn, args.memories, args.tenants)
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            count = timed(lambda: conn.execute("SELECT count(*) FROM memories").fetchone(), args.repeat)
            health_s = timed(lambda: health(conn), args.repeat)
            snap = timed(lambda: metrics.snapshot(conn), args.repeat)
            families = metrics.snapshot(conn).to_dict()
        child = run_tool(["--dsn", db, "metrics"])
    print(json.dumps({
        "server": f"PostgreSQL {version}", "memories": args.memories, "tenants": args.tenants,
        "setup_seconds": round(setup, 1), "snapshot": families,
        "refresh_seconds": {"median": round(statistics.median(snap), 3), "max": round(max(snap), 3)},
        "cli_metrics_once": {"seconds": round(child.seconds, 2), "peak_rss_mb": round(child.peak_rss_mb, 1),
                             "lines": len(child.stdout.splitlines())},
        "baseline_count_seconds": {"median": round(statistics.median(count), 3), "max": round(max(count), 3)},
        "baseline_health_seconds": {"median": round(statistics.median(health_s), 3), "max": round(max(health_s), 3)},
    }, indent=2))


if __name__ == "__main__":
    main()
