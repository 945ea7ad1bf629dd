"""Change capture's cost on the application's writes, and the catch-up rate.

    python benchmarks/bench_live.py --rows 20000 --writes 2000 [--synchronous-commit off] [--dsn postgresql://...]

One migrated fixture database. The application's workload (single-row INSERT, UPDATE by key, DELETE by key on
each of the four legacy tables in turn, autocommit, one connection: what the assistant does) runs alternately
without capture (trigger dropped) and with capture, twice each, in the same run; then ``catch_up`` applies
the changes the captured rounds left waiting, timed in-process.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid

import psycopg
from common import scratch_database, server_dsn

from unified_memory import fixtures, live, schema
from unified_memory.db import maintenance
from unified_memory.migrate import MigrationOptions, migrate

USER = "11111111-2222-3333-4444-555555555555"
KEYED = ("memory_items", "memory_entries", "web_ui_memory_entries")


class Workload:
    """Keys to update and delete, drawn once (each used at most once, so every statement finds its row)."""

    def __init__(self, conn: psycopg.Connection, seed: int) -> None:
        rng = random.Random(seed)
        self.keys = {t: [r[0] for r in conn.execute(f"SELECT id FROM {t}")] for t in KEYED}  # noqa: S608
        self.keys["long_term_memory"] = [r[0] for r in conn.execute("SELECT ctid::text FROM long_term_memory")]
        for keys in self.keys.values():
            rng.shuffle(keys)

    def run(self, conn: psycopg.Connection, writes: int) -> float:
        """Writes per second over ``writes`` single-row statements."""
        started = time.perf_counter()
        for n in range(writes):
            table, op = ("memory_items", "memory_entries", "web_ui_memory_entries", "long_term_memory")[n % 4], n // 4
            getattr(self, ("_insert", "_update", "_delete")[op % 3])(conn, table, n)
        return writes / (time.perf_counter() - started)

    def _insert(self, conn: psycopg.Connection, table: str, n: int) -> None:
        text = f"bench insert {n}"
        if table == "memory_items":
            conn.execute("INSERT INTO memory_items (id, scope, kind, content, created_at) VALUES (%s, %s, 'fact', %s, "
                         "now())", [uuid.uuid4(), f"user:{USER}", text])
        elif table == "memory_entries":
            conn.execute("INSERT INTO memory_entries (id, vector_id, user_id, content) VALUES (%s, 'v', %s, %s)",
                         [uuid.uuid4(), USER, text])
        elif table == "web_ui_memory_entries":
            conn.execute("INSERT INTO web_ui_memory_entries (id, tenant_id, content, user_id, ui_source, memory_type) "
                         "VALUES (%s, 'acme', %s, %s, 'web', 'fact')", [uuid.uuid4(), text, USER])
        else:
            conn.execute("INSERT INTO long_term_memory VALUES (%s, %s)", [USER, f'[{{"content": "{text}"}}]'])

    def _update(self, conn: psycopg.Connection, table: str, n: int) -> None:
        key = self.keys[table].pop()
        if table == "long_term_memory":
            conn.execute("UPDATE long_term_memory SET memory_json = %s WHERE ctid = %s::tid",
                         [f'[{{"content": "bench edit {n}"}}]', key])
        else:
            conn.execute(f"UPDATE {table} SET content = %s WHERE id = %s", [f"bench edit {n}", key])  # noqa: S608

    def _delete(self, conn: psycopg.Connection, table: str, n: int) -> None:
        key = self.keys[table].pop()
        if table == "long_term_memory":
            conn.execute("DELETE FROM long_term_memory WHERE ctid = %s::tid", [key])
        else:
            conn.execute(f"DELETE FROM {table} WHERE id = %s", [key])  # noqa: S608


def _capture(conn: psycopg.Connection, on: bool) -> None:
    for table in ("memory_items", "memory_entries", "web_ui_memory_entries", "long_term_memory"):
        if on:
            key = None if table == "long_term_memory" else "id"
            conn.execute("SELECT memory_migration_capture_on(%s::regclass, %s)", [table, key])
        else:
            conn.execute("SELECT memory_migration_capture_off(%s::regclass)", [table])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--writes", type=int, default=4000)
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                        help="off: commits do not wait for the WAL flush, so the trigger's own cost shows")
    parser.add_argument("--dsn")
    args = parser.parse_args()
    with scratch_database(server_dsn(args.dsn)) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=args.rows)
        schema.up(conn)
        migrate(conn, MigrationOptions())
        conn.execute("VACUUM ANALYZE")
        workload = Workload(conn, seed=1)
        conn.execute("SELECT set_config('synchronous_commit', %s, false)", [args.synchronous_commit])
        rates: dict[str, list[float]] = {"without_capture": [], "with_capture": []}
        for _ in range(2):
            for mode in ("without_capture", "with_capture"):
                _capture(conn, mode == "with_capture")
                rates[mode].append(workload.run(conn, args.writes))
        waiting = live.lag(conn).waiting
        with maintenance(conn):
            result = live.catch_up(conn, live.Settings())
        best = {mode: max(r) for mode, r in rates.items()}
        print(json.dumps({
            "rows_per_table": args.rows, "writes_per_round": args.writes,
            "synchronous_commit": args.synchronous_commit,
            "writes_per_second": {m: [round(x) for x in r] for m, r in rates.items()},
            "capture_cost": round(1 - best["with_capture"] / best["without_capture"], 3),
            "catch_up": {"changes": result.changes, "waiting_before": waiting, "seconds": round(result.seconds, 2),
                         "changes_per_second": round(result.changes / result.seconds) if result.seconds else None,
                         "inserted": result.inserted, "updated": result.updated, "soft_deleted": result.deleted},
        }, indent=2))


if __name__ == "__main__":
    main()
