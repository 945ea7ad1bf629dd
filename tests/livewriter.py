"""An application writing to the legacy tables: inserts, updates and deletes on all four, in its own thread."""

from __future__ import annotations

import random
import threading
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb

from unified_memory.rollback import row_checksum

TABLES = ("memory_items", "memory_entries", "web_ui_memory_entries", "long_term_memory")
USER = "11111111-2222-3333-4444-555555555555"


def _insert(conn: psycopg.Connection, table: str, n: int) -> None:
    text = f"app wrote {table} {n}"
    if table == "memory_items":
        conn.execute("INSERT INTO memory_items (id, scope, kind, content, metadata, created_at) "
                     "VALUES (%s, %s, 'fact', %s, %s, now())", [uuid.uuid4(), f"user:{USER}", text, Jsonb({"n": n})])
    elif table == "memory_entries":
        conn.execute("INSERT INTO memory_entries (id, vector_id, user_id, content, created_at) "
                     "VALUES (%s, %s, %s, %s, now())", [uuid.uuid4(), f"v-app-{n}", USER, text])
    elif table == "web_ui_memory_entries":
        conn.execute("INSERT INTO web_ui_memory_entries (id, tenant_id, content, user_id, ui_source, memory_type) "
                     "VALUES (%s, 'acme', %s, %s, 'web', 'fact')", [uuid.uuid4(), text, USER])
    else:
        conn.execute("INSERT INTO long_term_memory (user_id, memory_json) VALUES (%s, %s)",
                     [USER, f'[{{"content": "{text} a"}}, "{text} b"]'])


def _pick(conn: psycopg.Connection, table: str, rng: random.Random) -> str | None:
    key = "ctid" if table == "long_term_memory" else "id"
    row = conn.execute(f"SELECT {key}::text FROM {table} TABLESAMPLE SYSTEM (5) REPEATABLE (%s) LIMIT 1",  # noqa: S608
                       [rng.randrange(1 << 30)]).fetchone()
    return str(row[0]) if row else None


def _update(conn: psycopg.Connection, table: str, key: str, n: int) -> None:
    text = f"app edited {table} {n}"
    if table == "long_term_memory":
        conn.execute("UPDATE long_term_memory SET memory_json = %s WHERE ctid = %s::tid",
                     [f'[{{"content": "{text}", "tags": ["edited"]}}]', key])
    else:
        conn.execute(f"UPDATE {table} SET content = %s WHERE id::text = %s", [text, key])  # noqa: S608


def _delete(conn: psycopg.Connection, table: str, key: str) -> None:
    if table == "long_term_memory":
        conn.execute("DELETE FROM long_term_memory WHERE ctid = %s::tid", [key])
    else:
        conn.execute(f"DELETE FROM {table} WHERE id::text = %s", [key])  # noqa: S608


class Writer(threading.Thread):
    """Writes ``rate`` changes a second (insert, update, delete in turn, over all four tables) until stopped."""

    def __init__(self, dsn: str, *, rate: float = 200.0, seed: int = 7) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate, self.rng = dsn, rate, random.Random(seed)
        self.stop_event = threading.Event()
        self.counts = {"I": 0, "U": 0, "D": 0, "failed": 0}
        self.errors: list[str] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            n = 0
            while not self.stop_event.is_set():
                n += 1
                table, op = TABLES[n % 4], "IUD"[(n // 4) % 3]
                try:
                    self.write(conn, table, op, n)
                except psycopg.Error as exc:
                    self.counts["failed"] += 1
                    self.errors.append(f"{exc.sqlstate} {exc.diag.message_primary}")
                time.sleep(1 / self.rate)

    def write(self, conn: psycopg.Connection, table: str, op: str, n: int) -> None:
        if op == "I":
            _insert(conn, table, n)
        else:
            key = _pick(conn, table, self.rng)
            if key is None:
                return
            (_update(conn, table, key, n) if op == "U" else _delete(conn, table, key))
        self.counts[op] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)


def checksums(conn: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """Per legacy table: rows and an order-independent checksum of whole rows."""
    from psycopg import sql

    return {t: row_checksum(conn, sql.Identifier(t)) for t in TABLES
            if conn.execute("SELECT to_regclass(%s)", [t]).fetchone() != (None,)}


def exactness_problems(conn: psycopg.Connection) -> dict[str, int]:
    """Counts of every way memories can differ from the current legacy rows (all zero when exact)."""
    problems: dict[str, int] = {}
    for table in TABLES[:3]:
        problems[f"{table}: stale text"] = _count(conn, (
            f"SELECT count(*) FROM {table} s JOIN memories m ON m.source_table = '{table}' "  # noqa: S608
            "AND m.source_key = s.id::text WHERE m.deleted_at IS NULL AND m.text IS DISTINCT FROM s.content"))
        problems[f"{table}: live memory of a deleted row"] = _count(conn, (
            f"SELECT count(*) FROM memories m WHERE m.source_table = '{table}' AND m.deleted_at IS NULL "  # noqa: S608
            f"AND NOT EXISTS (SELECT 1 FROM {table} s WHERE s.id::text = m.source_key)"))
        problems[f"{table}: row without an outcome"] = _count(conn, (
            f"SELECT count(*) FROM {table} s WHERE NOT EXISTS (SELECT 1 FROM memories m "  # noqa: S608
            f"WHERE m.source_table = '{table}' AND m.source_key = s.id::text AND m.deleted_at IS NULL) "
            "AND NOT EXISTS (SELECT 1 FROM memory_migration_quarantine q "
            f"WHERE q.source_table = '{table}' AND q.source_key = s.id::text)"))
    items = ("SELECT CASE jsonb_typeof(e) WHEN 'string' THEN e #>> '{}' ELSE e ->> 'content' END AS text "
             "FROM long_term_memory s CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof("
             "memory_migration_try_jsonb(s.memory_json)) WHEN 'array' THEN s.memory_json::jsonb ELSE "
             "jsonb_build_array(memory_migration_try_jsonb(s.memory_json)) END) e "
             "WHERE btrim(coalesce(s.user_id, '')) <> '' AND memory_migration_try_jsonb(s.memory_json) IS NOT NULL "
             "AND jsonb_typeof(memory_migration_try_jsonb(s.memory_json)) IN ('array', 'object', 'string')")
    live = "SELECT text FROM memories WHERE source_table = 'long_term_memory' AND deleted_at IS NULL"
    valid = "WHERE text IS NOT NULL AND btrim(text) <> ''"
    problems["long_term_memory: live items not in the table"] = _count(
        conn, f"SELECT count(*) FROM ({live} EXCEPT ALL SELECT text FROM ({items}) i {valid}) d")  # noqa: S608
    problems["long_term_memory: items without a live memory"] = _count(
        conn, f"SELECT count(*) FROM (SELECT text FROM ({items}) i {valid} EXCEPT ALL {live}) d")  # noqa: S608
    return {k: v for k, v in problems.items() if v}


def _count(conn: psycopg.Connection, query: str) -> int:
    row = conn.execute(query.encode()).fetchone()
    return int(row[0]) if row else 0
