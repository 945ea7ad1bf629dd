"""Health: the guide's three health queries, the last run's status, the quarantine and expired-on-arrival counts.

Cheap enough for a busy database: counts over ``memories`` and two small bookkeeping tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .db import maintenance, relation_exists, scalar
from .errors import SchemaError
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


@dataclass
class Health:
    """The health figures; ``healthy`` is false when data quality or the last run is wrong."""

    counts: dict[str, int] = field(default_factory=dict)
    quality: dict[str, int] = field(default_factory=dict)
    top_tenants: list[list[Any]] = field(default_factory=list)
    last_run: dict[str, Any] | None = None
    quarantined: int = 0
    live: dict[str, Any] = field(default_factory=dict)  # change capture: waiting, oldest, conflicts
    seconds: float = 0.0

    @property
    def healthy(self) -> bool:
        run_ok = self.last_run is None or self.last_run["status"] in ("succeeded", "nothing_to_do")
        return run_ok and not any(self.quality.values())

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "counts": self.counts, "quality": self.quality,
                "top_tenants": self.top_tenants, "last_run": self.last_run, "quarantined": self.quarantined,
                "live": self.live, "seconds": round(self.seconds, 3)}


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
        result.live = lag(conn).to_dict()
    result.seconds = time.monotonic() - started
    return result


def _named(cur: psycopg.Cursor[Any]) -> dict[str, int]:
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return {d.name: int(v) for d, v in zip(cur.description, row, strict=True)}
