"""Metrics: the unified store in the Prometheus exposition format, through ``prometheus_client``.

One *snapshot* is a fixed set of queries run in one REPEATABLE READ, READ ONLY transaction (so every figure
is of the same moment) with row-level security bypassed on purpose (``db.maintenance``) and a
``statement_timeout``; the Milvus collection is counted after it. A :class:`SnapshotCollector` serves the
snapshot to every scrape and takes a new one at most every ``interval`` seconds, under a lock, so concurrent
scrapes never run the queries twice.

Label values are bounded: only the schema's vocabularies (decay tier, memory type, access type, migration
status), the legacy table names, quarantine reasons (a bounded, checked set) and the tool's own tables and
indexes. Never a tenant id, never memory text, never a connection string.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg.rows import dict_row

from .checks import RUN_OK, RUN_STATUSES, SECONDS, Serialised, json_field
from .db import maintenance
from .errors import ConfigError, SchemaError, UnifiedMemoryError, VectorStoreError
from .health import Health
from .mapping import MEMORY_TYPES
from .shapes import LEGACY_TABLES

log = logging.getLogger(__name__)
Metric = GaugeMetricFamily | CounterMetricFamily

PREFIX = "unified_memory"
DECAY_TIERS = ("short", "medium", "long", "pinned")
ACCESS_TYPES = ("read", "write", "update", "delete", "search")
MEMORY_STATES = ("live", "soft_deleted", "expired")
OTHER = "other"
MAX_REASONS = 40  # quarantine reasons are written by the tool; a bound all the same
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")
# the tool's own tables, sized and their indexes listed (bounded: fixed names, never user input)
TABLES = ("memories", "memory_access_log", "memory_relationships", "memory_migration_runs",
          "memory_migration_checkpoints", "memory_migration_quarantine", "memory_legacy_embeddings",
          "memory_migration_changes", "memory_vector_outbox", "memory_validation_runs")
DEFAULT_TIMEOUT_MS = 10_000

# ------------------------------------------------------------------------------------------ queries
_MEMORIES = """
SELECT decay_tier, memory_type,
       count(*) FILTER (WHERE deleted_at IS NULL AND (expires_at IS NULL OR expires_at > now())) AS live,
       count(*) FILTER (WHERE deleted_at IS NOT NULL) AS soft_deleted,
       count(*) FILTER (WHERE deleted_at IS NULL AND expires_at <= now()) AS expired,
       count(*) FILTER (WHERE deleted_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                          AND decay_tier <> 'pinned' AND isfinite(created_at)
                          AND calculate_decay_score(created_at, neuro_type, importance, access_count) < 0.1)
           AS cleanup_candidates,
       count(*) FILTER (WHERE embedding_id IS NOT NULL) AS with_vector,
       count(*) FILTER (WHERE migrated_at BETWEEN %(run_started)s AND %(run_finished)s) AS by_last_run
FROM memories GROUP BY decay_tier, memory_type
"""
_TENANTS = """
SELECT count(*) AS tenants, coalesce(max(n), 0) AS largest, coalesce(sum(n), 0) AS total
FROM (SELECT user_id, count(*) AS n FROM memories WHERE deleted_at IS NULL GROUP BY user_id) AS per_tenant
"""
_QUARANTINE = ("SELECT source_table, reason, count(*) AS n FROM memory_migration_quarantine "
               "GROUP BY source_table, reason")
_LAST_RUN = """
SELECT run_id, status, extract(epoch FROM started_at)::float8 AS started,
       extract(epoch FROM finished_at)::float8 AS finished,
       extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS seconds,
       started_at, coalesce(finished_at, now()) AS until,
       (SELECT count(*) FROM memory_migration_quarantine q WHERE q.run_id = r.run_id) AS quarantined
FROM memory_migration_runs r ORDER BY run_id DESC LIMIT 1
"""
_CHANGES = ("SELECT count(*) AS waiting, coalesce(extract(epoch FROM now() - min(captured_at)), 0)::float8 AS age "
            "FROM memory_migration_changes WHERE applied_at IS NULL")
_OUTBOX = ("SELECT count(*) AS waiting, coalesce(extract(epoch FROM now() - min(queued_at)), 0)::float8 AS age "
           "FROM memory_vector_outbox")
_ACCESS = ("SELECT access_type, count(*) AS n, count(*) FILTER (WHERE response_status >= 400) AS errors "
           "FROM memory_access_log WHERE accessed_at > now() - interval '1 hour' GROUP BY access_type")
_VALIDATION = """
SELECT run_id, status, checks, failed, warnings, extract(epoch FROM finished_at)::float8 AS finished,
       extract(epoch FROM finished_at - started_at)::float8 AS seconds
FROM memory_validation_runs ORDER BY run_id DESC LIMIT 1
"""
_SIZES = """
SELECT t.name, pg_table_size(t.rel) AS table_bytes, pg_indexes_size(t.rel) AS index_bytes
FROM (SELECT name, to_regclass(name) AS rel FROM unnest(%(tables)s::text[]) AS name) AS t WHERE t.rel IS NOT NULL
"""
_INDEXES = """
SELECT s.relname AS table_name, s.indexrelname AS index_name, pg_relation_size(s.indexrelid) AS bytes,
       s.idx_scan AS scans
FROM pg_stat_user_indexes s WHERE s.schemaname = current_schema() AND s.relname = ANY(%(tables)s)
"""
_READABLE = ("SELECT to_regclass(%(name)s) IS NOT NULL AND has_table_privilege(to_regclass(%(name)s), 'SELECT') "
             "AS readable")


# ------------------------------------------------------------------------------------------ snapshot
def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


@dataclass
class Snapshot(Serialised):
    """The metric families of one moment, and how long they took to read."""

    json_derived: ClassVar[dict[str, str]] = {"samples": "samples"}
    json_order: ClassVar[tuple[str, ...]] = ("families", "samples", "seconds")

    families: list[Metric] = field(default_factory=list, metadata=json_field(convert=len))
    seconds: float = field(default=0.0, metadata=SECONDS)
    taken_at: float = field(default=0.0, metadata=json_field(omit=True))

    @property
    def samples(self) -> int:
        return sum(len(f.samples) for f in self.families)


def snapshot(conn: psycopg.Connection, *, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Snapshot:
    """Read every database metric in one read-only REPEATABLE READ transaction (``conn`` is autocommit).

    Raises:
        SchemaError: the unified schema is not applied (psycopg errors as they come, e.g. a statement timeout).
    """
    started, result = time.monotonic(), Snapshot(taken_at=time.time())
    with maintenance(conn), conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(int(timeout_ms))])
        if not _readable(conn, "memories"):
            raise SchemaError("the unified schema is not applied: run `unified-memory schema up` first")
        cur = conn.cursor(row_factory=dict_row)
        run = cur.execute(_LAST_RUN).fetchone() if _readable(conn, "memory_migration_runs") else None
        result.families += _memories(cur, run)
        result.families += _tenants(cur)
        result.families += _quarantine(cur) if _readable(conn, "memory_migration_quarantine") else []
        result.families += _migration(run)
        result.families += _lags(cur, conn)
        result.families += _access(cur)
        result.families += _validation(cur, conn)
        result.families += _sizes(cur)
    result.seconds = time.monotonic() - started
    return result


def _readable(conn: psycopg.Connection, name: str) -> bool:
    row = conn.cursor(row_factory=dict_row).execute(_READABLE, {"name": name}).fetchone()
    return bool(row and row["readable"])


def _memories(cur: psycopg.Cursor[dict[str, Any]], run: dict[str, Any] | None) -> list[Metric]:
    window = {"run_started": run["started_at"] if run else None, "run_finished": run["until"] if run else None}
    counts: dict[tuple[str, str, str], int] = {}
    cleanup: dict[tuple[str, str], int] = {}
    totals = {"with_vector": 0, "by_last_run": 0}
    for row in cur.execute(_MEMORIES, window):
        tier, kind = _bounded(row["decay_tier"], DECAY_TIERS), _bounded(row["memory_type"], MEMORY_TYPES.allowed)
        for state in MEMORY_STATES:
            counts[(state, tier, kind)] = counts.get((state, tier, kind), 0) + int(row[state])
        cleanup[(tier, kind)] = cleanup.get((tier, kind), 0) + int(row["cleanup_candidates"])
        totals["with_vector"] += int(row["with_vector"])
        totals["by_last_run"] += int(row["by_last_run"])
    memories = _gauge("memories", "Memories by state (live, soft_deleted, expired: past expires_at, not yet "
                                  "cleaned), decay tier and memory type.", ("state", "decay_tier", "memory_type"))
    candidates = _gauge("decay_cleanup_candidates", "Live memories whose decay score is below 0.1 (not pinned): "
                                                    "what a decay cleanup would remove.", ("decay_tier", "memory_type"))
    for tier in DECAY_TIERS:
        for kind in MEMORY_TYPES.allowed:
            for state in MEMORY_STATES:
                memories.add_metric([state, tier, kind], counts.get((state, tier, kind), 0))
            candidates.add_metric([tier, kind], cleanup.get((tier, kind), 0))
    with_vector = _gauge("memories_with_vector", "Memories (any state) whose vector is in the collection "
                                                 "(embedding_id set).")
    with_vector.add_metric([], totals["with_vector"])
    if run is not None:
        run["memories_written"] = totals["by_last_run"]
    return [memories, candidates, with_vector]


def _bounded(value: object, allowed: Iterable[str]) -> str:
    return str(value) if value in tuple(allowed) else OTHER


def _tenants(cur: psycopg.Cursor[dict[str, Any]]) -> list[Metric]:
    row = cur.execute(_TENANTS).fetchone()
    assert row is not None
    tenants = _gauge("tenants", "Tenants (distinct user_id) holding at least one memory that is not soft-deleted.")
    tenants.add_metric([], int(row["tenants"]))
    share = _gauge("largest_tenant_share", "The largest tenant's share of memories that are not soft-deleted (0..1).")
    share.add_metric([], int(row["largest"]) / int(row["total"]) if row["total"] else 0.0)
    largest = _gauge("largest_tenant_memories", "Memories (not soft-deleted) of the largest tenant.")
    largest.add_metric([], int(row["largest"]))
    return [tenants, share, largest]


def _quarantine(cur: psycopg.Cursor[dict[str, Any]]) -> list[Metric]:
    rows: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    for row in cur.execute(_QUARANTINE):
        reason = str(row["reason"])
        if _REASON.fullmatch(reason) and (reason in seen or len(seen) < MAX_REASONS):
            seen.add(reason)
        else:
            reason = OTHER
        key = (_bounded(row["source_table"], LEGACY_TABLES), reason)
        rows[key] = rows.get(key, 0) + int(row["n"])
    family = _gauge("quarantine_rows", "Legacy rows or items that did not become memories, by source table and "
                                       "reason (see the README's mapping table).", ("source_table", "reason"))
    for (table, reason), n in sorted(rows.items()):
        family.add_metric([table, reason], n)
    return [family]


def _migration(run: dict[str, Any] | None) -> list[Metric]:
    families: list[Metric] = []
    if run is None:
        return families
    status = _gauge("migration_last_run_status", "1 for the status of the last data migration run, 0 for the "
                                                 "others.", ("status",))
    for name in RUN_STATUSES:
        status.add_metric([name], 1 if run["status"] == name else 0)
    rows = int(run.get("memories_written", 0)) + int(run["quarantined"])
    values = {"id": ("The last data migration run's id.", run["run_id"]),
              "duration_seconds": ("The last run's duration (until now while it runs).", run["seconds"]),
              "rows": ("Memories written and rows quarantined by the last run.", rows),
              "rows_per_second": ("Rows given an outcome per second by the last run.",
                                  rows / run["seconds"] if run["seconds"] else 0.0),
              "started_timestamp_seconds": ("When the last run started (Unix time).", run["started"]),
              "finished_timestamp_seconds": ("When the last run finished (Unix time; 0 while it runs).",
                                             run["finished"] or 0.0)}
    for suffix, (doc, value) in values.items():
        family = _gauge(f"migration_last_run_{suffix}", doc)
        family.add_metric([], float(value))
        families.append(family)
    return [*families, status]


def _lags(cur: psycopg.Cursor[dict[str, Any]], conn: psycopg.Connection) -> list[Metric]:
    families: list[Metric] = []
    for table, name, query, what in (("memory_migration_changes", "live_migration", _CHANGES,
                                      "legacy changes captured and not yet applied"),
                                     ("memory_vector_outbox", "vector_outbox", _OUTBOX,
                                      "memory changes not yet written to the collection")):
        present = _readable(conn, table)
        enabled = _gauge(f"{name}_enabled", f"1 when {table} exists and is readable.")
        enabled.add_metric([], 1 if present else 0)
        families.append(enabled)
        if not present:
            continue
        row = cur.execute(query).fetchone()
        assert row is not None
        waiting = _gauge(f"{name}_waiting", f"Rows of {table}: {what}.")
        waiting.add_metric([], int(row["waiting"]))
        age = _gauge(f"{name}_oldest_age_seconds", f"Age of the oldest of the {what} (0 when none).")
        age.add_metric([], float(row["age"]))
        families += [waiting, age]
    return families


def _access(cur: psycopg.Cursor[dict[str, Any]]) -> list[Metric]:
    found = {str(r["access_type"]): (int(r["n"]), int(r["errors"])) for r in cur.execute(_ACCESS)}
    rows = _gauge("access_log_rows_last_hour", "memory_access_log rows of the last hour by access type.",
                  ("access_type",))
    errors = _gauge("access_log_errors_last_hour", "memory_access_log rows of the last hour with response_status "
                                                   ">= 400, by access type.", ("access_type",))
    for kind in ACCESS_TYPES:
        n, bad = found.get(kind, (0, 0))
        rows.add_metric([kind], n)
        errors.add_metric([kind], bad)
    total, bad_total = sum(n for n, _ in found.values()), sum(b for _, b in found.values())
    ratio = _gauge("access_log_error_ratio_last_hour", "Share of the last hour's accesses with response_status "
                                                       ">= 400 (0 when there were none).")
    ratio.add_metric([], bad_total / total if total else 0.0)
    return [rows, errors, ratio]


def _validation(cur: psycopg.Cursor[dict[str, Any]], conn: psycopg.Connection) -> list[Metric]:
    row = cur.execute(_VALIDATION).fetchone() if _readable(conn, "memory_validation_runs") else None
    if row is None:
        return []
    values = {"passed": ("1 when the last validation had no failed check.", row["status"] == "passed"),
              "checks": ("Checks run by the last validation.", row["checks"]),
              "failed_checks": ("Checks that failed in the last validation.", row["failed"]),
              "warnings": ("Checks that warned in the last validation.", row["warnings"]),
              "duration_seconds": ("The last validation's duration.", row["seconds"]),
              "timestamp_seconds": ("When the last validation finished (Unix time).", row["finished"])}
    families: list[Metric] = []
    for suffix, (doc, value) in values.items():
        family = _gauge(f"validation_last_run_{suffix}", doc)
        family.add_metric([], float(value))
        families.append(family)
    return families


def _sizes(cur: psycopg.Cursor[dict[str, Any]]) -> list[Metric]:
    tables = _gauge("table_size_bytes", "Size of the tool's tables (heap and TOAST, without indexes).", ("table",))
    indexes = _gauge("table_indexes_size_bytes", "Size of all indexes of the tool's tables.", ("table",))
    for row in cur.execute(_SIZES, {"tables": list(TABLES)}):
        tables.add_metric([row["name"]], int(row["table_bytes"]))
        indexes.add_metric([row["name"]], int(row["index_bytes"]))
    size = _gauge("index_size_bytes", "Size of each index of the tool's tables.", ("table", "index"))
    scans = CounterMetricFamily(f"{PREFIX}_index_scans", "Index scans since the statistics were reset "
                                                         "(pg_stat_user_indexes.idx_scan).", labels=["table", "index"])
    for row in cur.execute(_INDEXES, {"tables": list(TABLES)}):
        size.add_metric([row["table_name"], row["index_name"]], int(row["bytes"]))
        scans.add_metric([row["table_name"], row["index_name"]], int(row["scans"] or 0))
    return [tables, indexes, size, scans]


# ------------------------------------------------------------------------------------------ vectors
def vector_families(count_entities: Callable[[], int] | None) -> list[Metric]:
    """The collection's entity count, or ``vectors_up 0`` when Milvus cannot be read (never an exception).

    ``count_entities`` is None when no Milvus is configured: then no vector metric at all.
    """
    if count_entities is None:
        return []
    up = _gauge("vectors_up", "1 when the Milvus collection could be counted.")
    try:
        entities = count_entities()
    except Exception as exc:  # any failure of the vector store is a metric, never a failed scrape
        log.warning("metrics: the Milvus collection could not be counted (%s)", type(exc).__name__)
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    family = _gauge("vectors_collection_entities", "Entities in the Milvus collection.")
    family.add_metric([], entities)
    return [up, family]


def milvus_counter(uri: str | None, collection: str) -> Callable[[], int] | None:
    """A function counting the collection's entities (opened and closed per call), or None without Milvus."""
    if uri is None:
        return None

    def count_entities() -> int:
        from . import vectors  # pymilvus loads in about a second: only when Milvus is configured

        client = vectors.open_client(uri)
        try:
            if not client.has_collection(collection):
                raise VectorStoreError(f"collection {collection} does not exist")
            client.load_collection(collection)
            return vectors.count(client, vectors.CollectionSpec(collection))
        finally:
            client.close()

    return count_entities


# ------------------------------------------------------------------------------------------ serving
Reader = Callable[[], Snapshot]


def reader(connect: Callable[[], AbstractContextManager[psycopg.Connection]], *, timeout_ms: int = DEFAULT_TIMEOUT_MS,
           count_entities: Callable[[], int] | None = None) -> Reader:
    """A snapshot reader that opens its own connection per refresh (from the caller's ``connect``)."""

    def read() -> Snapshot:
        with connect() as conn:
            result = snapshot(conn, timeout_ms=timeout_ms)
        result.families += vector_families(count_entities)
        return result

    return read


class SnapshotCollector(Collector):
    """Serves one cached snapshot to every scrape; refreshes it at most every ``interval`` seconds.

    Thread-safe: the HTTP server answers scrapes on several threads; the first one after the interval takes
    the lock and refreshes, the others wait for it and share its result. With ``tolerate_errors`` (serving),
    a failed refresh becomes ``unified_memory_up 0``; without it (printing once) the error propagates.
    """

    def __init__(self, read: Reader, *, interval: float = 0.0, tolerate_errors: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read, self._interval, self._tolerate, self._clock = read, interval, tolerate_errors, clock
        self._lock = threading.Lock()
        self._cached: list[Metric] | None = None
        self._refreshed_at = 0.0
        self.refreshes = 0
        self.failures = 0

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or self._clock() - self._refreshed_at >= self._interval:
                self._cached = self._refresh()
                self._refreshed_at = self._clock()
            families = self._cached
        return iter(families)

    def _refresh(self) -> list[Metric]:
        self.refreshes += 1
        started = time.monotonic()
        up = _gauge("up", "1 when the last snapshot of the database succeeded.")
        try:
            families = self._read().families
            up.add_metric([], 1)
        except (UnifiedMemoryError, psycopg.Error) as exc:
            if not self._tolerate:
                raise
            self.failures += 1
            log.warning("metrics: snapshot failed (%s %s)", type(exc).__name__, getattr(exc, "sqlstate", "") or "")
            families = []
            up.add_metric([], 0)
        duration = _gauge("snapshot_duration_seconds", "How long the last snapshot took (database and Milvus).")
        duration.add_metric([], time.monotonic() - started)
        taken = _gauge("snapshot_timestamp_seconds", "When the last snapshot was taken (Unix time).")
        taken.add_metric([], time.time())
        refreshes = CounterMetricFamily(f"{PREFIX}_snapshot_refreshes", "Snapshots taken by this exporter.")
        refreshes.add_metric([], self.refreshes)
        return [up, *families, duration, taken, refreshes]


def render(collector: Collector) -> str:
    """The exposition text of one collection (what ``unified-memory metrics`` prints)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


@dataclass
class Server:
    """A running metrics endpoint (``/metrics``, and any path) on its own threads."""

    httpd: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C, or SIGTERM's default exit)."""
        try:
            while self.thread.is_alive():
                self.thread.join(1.0)
        except KeyboardInterrupt:
            self.stop()


def serve(collector: Collector, *, port: int, bind: str = "127.0.0.1") -> Server:
    """Serve ``collector`` on ``bind:port`` (port 0: any free port).

    Raises:
        ConfigError: the address cannot be bound (in use, or not an address of this host).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        httpd, thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {bind}:{port}: {exc.strerror or exc}") from None
    return Server(httpd, thread)


class StaticCollector(Collector):
    """Families computed elsewhere (``health --format prometheus``), rendered as they are."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def health_families(result: Health) -> list[Metric]:
    """``health`` as metrics: the same figures as its JSON, without the per-tenant table (unbounded labels)."""
    healthy = _gauge("health_healthy", "1 when health found no data-quality problem and the last run is fine.")
    healthy.add_metric([], 1 if result.healthy else 0)
    counts = _gauge("health_records", "memories rows, distinct users and distinct orgs.", ("count",))
    for name, value in result.counts.items():
        counts.add_metric([name], value)
    quality = _gauge("health_quality_problems", "Rows failing each data-quality query of the guide.", ("check",))
    for name, value in result.quality.items():
        quality.add_metric([name], value)
    quarantined = _gauge("health_quarantined", "Legacy rows or items in quarantine.")
    quarantined.add_metric([], result.quarantined)
    run_ok = _gauge("health_last_run_ok", "1 when the last migration run succeeded or had nothing to do (or there "
                                          "is none).")
    run_ok.add_metric([], 1 if result.last_run is None or result.last_run["status"] in RUN_OK else 0)
    seconds = _gauge("health_duration_seconds", "How long the health queries took.")
    seconds.add_metric([], result.seconds)
    return [healthy, counts, quality, quarantined, run_ok, seconds]
