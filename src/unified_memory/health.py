"""Health: the guide's three health queries, the last run's status, the quarantine and expired-on-arrival counts.

Cheap enough for a busy database: counts over ``memories`` and two small bookkeeping tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg
from psycopg.rows import dict_row

from .checks import RUN_OK, SECONDS, Serialised
from .db import maintenance, relation_exists, scalar
from .errors import SchemaError, ValidationFailed
from .live import lag

RECORD_COUNTS = ("SELECT COUNT(*) AS total_memories, COUNT(DISTINCT user_id) AS unique_users, "
                 "COUNT(DISTINCT org_id) AS unique_orgs FROM memories")
DATA_QUALITY = ("SELECT COUNT(*) FILTER (WHERE text IS NULL OR text = '') AS empty_text, "
                "COUNT(*) FILTER (WHERE user_id IS NULL) AS missing_user_id, "
                "COUNT(*) FILTER (WHERE importance < 1 OR importance > 10) AS invalid_importance, "
                "COUNT(*) FILTER (WHERE migrated_at IS NOT NULL AND expires_at <= migrated_at) AS expired_on_arrival "
                "FROM memories")
TENANT_DISTRIBUTION = ("SELECT user_id, COUNT(*) AS memory_count FROM memories GROUP BY user_id "
                       "ORDER BY memory_count DESC LIMIT 10")
LAST_RUN = ("SELECT run_id, status, started_at::text, finished_at::text FROM memory_migration_runs "
            "ORDER BY run_id DESC LIMIT 1")
QUARANTINE = "SELECT count(*) FROM memory_migration_quarantine"
VECTOR_OUTBOX = ("SELECT count(*) AS queued_changes, "
                 "round(extract(epoch FROM clock_timestamp() - min(queued_at))::numeric, 1)::float8 "
                 "AS oldest_change_seconds FROM memory_vector_outbox")
VECTOR_PENDING = ("SELECT count(*) FROM memories WHERE embedding_id IS NULL AND deleted_at IS NULL "
                  "AND (expires_at IS NULL OR expires_at > now())")


@dataclass
class Health(Serialised):
    """The health figures; ``healthy`` is false when data quality or the last run is wrong."""

    json_derived: ClassVar[dict[str, str]] = {"healthy": "healthy"}
    json_order: ClassVar[tuple[str, ...]] = ("healthy",)

    counts: dict[str, int] = field(default_factory=dict)
    quality: dict[str, int] = field(default_factory=dict)
    top_tenants: list[list[Any]] = field(default_factory=list)
    last_run: dict[str, Any] | None = None
    quarantined: int = 0
    vectors: dict[str, Any] | None = None
    live: dict[str, Any] = field(default_factory=dict)  # change capture: waiting, oldest, conflicts
    seconds: float = field(default=0.0, metadata=SECONDS)

    @property
    def healthy(self) -> bool:
        run_ok = self.last_run is None or self.last_run["status"] in RUN_OK
        return run_ok and not any(self.quality.values())

    def problems(self) -> list[str]:
        """What makes it unhealthy, by name (numbers only)."""
        found = [f"{name} {n}" for name, n in self.quality.items() if n]
        if self.last_run is not None and self.last_run["status"] not in RUN_OK:
            found.append(f"last migration run {self.last_run['run_id']} is {self.last_run['status']}")
        return found

    def raise_for_failure(self) -> None:
        """Raises ValidationFailed naming the problems (the CLI's exit code 10)."""
        if not self.healthy:
            raise ValidationFailed("health found problems: " + ", ".join(self.problems()))


def health(conn: psycopg.Connection) -> Health:
    """Run the health queries (RLS bypassed on purpose: counts are never silently filtered).

    Raises:
        SchemaError: the unified schema is not applied.
    """
    started = time.monotonic()
    result = Health()
    if not relation_exists(conn, "memories"):
        raise SchemaError("the unified schema is not applied: run `unified-memory schema up` first")
    with maintenance(conn):
        cur = conn.execute(RECORD_COUNTS)
        result.counts = _named(cur)
        result.quality = _named(conn.execute(DATA_QUALITY))
        result.top_tenants = [list(r) for r in conn.execute(TENANT_DISTRIBUTION)]
        if relation_exists(conn, "memory_migration_runs"):
            row = conn.execute(LAST_RUN).fetchone()
            if row:
                result.last_run = dict(zip(("run_id", "status", "started_at", "finished_at"), row, strict=True))
            result.quarantined = int(scalar(conn, QUARANTINE))
        result.vectors = vector_lag(conn)
        result.live = lag(conn).to_dict()
    result.seconds = time.monotonic() - started
    return result


def vector_lag(conn: psycopg.Connection) -> dict[str, Any] | None:
    """How far the Milvus collection is behind ``memories``: changes queued in the outbox (migration 021), the
    oldest one's age in seconds, and live memories no vector points at yet; None without the outbox."""
    if not relation_exists(conn, "memory_vector_outbox"):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        lag = cur.execute(VECTOR_OUTBOX).fetchone()
    assert lag is not None
    return {**lag, "memories_without_vector": int(scalar(conn, VECTOR_PENDING))}


def _named(cur: psycopg.Cursor[Any]) -> dict[str, int]:
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return {d.name: int(v) for d, v in zip(cur.description, row, strict=True)}
