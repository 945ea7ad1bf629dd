"""The application's way in: a tenant-scoped API over a ``psycopg_pool`` pool, guarded by the database.

    store = Store.open("postgresql://app_login@db/app")        # a LOGIN member of unified_memory_app
    with store.tenant("alice", org_id=None) as t:              # one transaction, one tenant
        m = t.remember("likes green tea", memory_type="preference", tags=["drinks"])
        t.recall(memory_type="preference")

Each ``tenant`` block is one transaction that first declares, with ``set_config(..., true)`` (transaction-local),
the role ``unified_memory_app`` and the tenant (``app.user_id``, ``app.org_id``). Nothing outlives the
transaction, so a pooled connection (here, or behind a transaction-pooling pgbouncer) never carries one
tenant's context into another's work. Row-level security does the filtering; the explicit tenant predicates
in the queries are there for the indexes, not for safety. The org rule (the policy's): a session with an
org sees that org's memories *of its user*; without one, the user's personal memories (``org_id IS NULL``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row, scalar_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from .errors import ConfigError, NotFound, StaleVersion, UnifiedMemoryError

APP_ROLE = "unified_memory_app"
Order = Literal["recent", "importance"]
AccessType = Literal["read", "write", "update", "delete", "search"]

_DECLARE = ("SELECT set_config('role', %s, true), set_config('app.user_id', %s, true), "
            "set_config('app.org_id', %s, true)")
_COLUMNS = ("id", "user_id", "org_id", "text", "memory_type", "neuro_type", "decay_tier", "importance", "tags",
            "meta", "session_id", "conversation_id", "ui_source", "ai_generated", "access_count", "version",
            "created_at", "updated_at", "expires_at", "deleted_at")
_RETURNING = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
_LIVE = sql.SQL("deleted_at IS NULL AND (expires_at IS NULL OR expires_at > now())")
_UPDATABLE = ("text", "memory_type", "neuro_type", "decay_tier", "importance", "tags", "meta", "session_id",
              "conversation_id", "ui_source")


@dataclass(frozen=True)
class Memory:
    """One memory as the tenant sees it."""

    id: uuid.UUID
    user_id: str
    org_id: str | None
    text: str
    memory_type: str
    neuro_type: str
    decay_tier: str
    importance: int
    tags: list[Any]
    meta: dict[str, Any]
    session_id: str | None
    conversation_id: uuid.UUID | None
    ui_source: str
    ai_generated: bool
    access_count: int
    version: int
    created_at: datetime
    updated_at: datetime | None
    expires_at: datetime | None
    deleted_at: datetime | None


@dataclass(frozen=True)
class Hit:
    """A search hit: the memory (read back through row-level security) and its similarity."""

    memory: Memory
    score: float


@dataclass(frozen=True)
class VectorSearch:
    """What ``search`` needs: a Milvus client, the collection and an embedder (see ``vectors``)."""

    client: Any
    spec: Any
    embedder: Any


class Store:
    """A pool of application-role connections handing out tenant-scoped transactions."""

    def __init__(self, pool: ConnectionPool, *, vectors: VectorSearch | None = None) -> None:
        self.pool, self.vectors = pool, vectors

    @classmethod
    def open(cls, conninfo: str, *, min_size: int = 1, max_size: int = 10, vectors: VectorSearch | None = None,
             **kwargs: Any) -> Store:
        """A store over a new pool; refuses a login that could bypass row-level security.

        ``kwargs`` go to each connection (e.g. ``prepare_threshold=None`` behind a pgbouncer older than 1.21).
        """
        with psycopg.connect(conninfo, **kwargs) as conn:
            _refuse_privileged(conn)  # fail now with a clear message, not later with a pool timeout
        pool = ConnectionPool(conninfo, min_size=min_size, max_size=max_size, kwargs=kwargs or None,
                              configure=_refuse_privileged, open=True)
        return cls(pool, vectors=vectors)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def tenant(self, user_id: str, org_id: str | None = None) -> Iterator[Tenant]:
        """One transaction as ``user_id`` (in ``org_id``): committed at the end, rolled back on an error."""
        _check_tenant(user_id, org_id)
        with self.pool.connection() as conn, _pipelined(conn), conn.transaction():
            conn.execute(_DECLARE, [APP_ROLE, user_id, org_id or ""])
            yield Tenant(conn, user_id, org_id, self.vectors)


class Tenant:
    """The operations of one tenant inside one transaction (see ``Store.tenant``)."""

    def __init__(self, conn: psycopg.Connection, user_id: str, org_id: str | None,
                 vectors: VectorSearch | None) -> None:
        self.conn, self.user_id, self.org_id, self._vectors = conn, user_id, org_id, vectors

    def remember(self, text: str, *, memory_type: str = "general", tags: Sequence[str] = (), importance: int = 5,
                 meta: dict[str, Any] | None = None, decay_tier: str = "short", neuro_type: str = "episodic",
                 session_id: str | None = None, conversation_id: uuid.UUID | None = None, ui_source: str = "api",
                 ai_generated: bool = False) -> Memory:
        """Store a new memory of this tenant (the id is the database's)."""
        values = {"user_id": self.user_id, "org_id": self.org_id, "text": text, "memory_type": memory_type,
                  "tags": Jsonb(list(tags)), "importance": importance, "meta": Jsonb(meta or {}),
                  "decay_tier": decay_tier, "neuro_type": neuro_type, "session_id": session_id,
                  "conversation_id": conversation_id, "ui_source": ui_source, "ai_generated": ai_generated}
        query = sql.SQL("INSERT INTO memories ({}) VALUES ({}) RETURNING {}").format(
            sql.SQL(", ").join(map(sql.Identifier, values)), sql.SQL(", ").join(map(sql.Placeholder, values)),
            _RETURNING)
        return self._one(query, values)

    def recall(self, *, memory_type: str | None = None, tags: Sequence[str] = (), min_importance: int | None = None,
               order: Order = "recent", limit: int = 20) -> list[Memory]:
        """Live, unexpired memories: most recent (or most important) first, optionally by type, tags, importance."""
        where = [self._mine(), _LIVE]
        params: dict[str, Any] = {"u": self.user_id, "o": self.org_id, "limit": limit}
        if memory_type is not None:
            where.append(sql.SQL("memory_type = %(type)s"))
            params["type"] = memory_type
        if tags:
            where.append(sql.SQL("tags @> %(tags)s"))
            params["tags"] = Jsonb(list(tags))
        if min_importance is not None:
            where.append(sql.SQL("importance >= %(importance)s"))
            params["importance"] = min_importance
        ordering = "importance DESC, created_at DESC" if order == "importance" else "created_at DESC"
        query = sql.SQL("SELECT {} FROM memories WHERE {} ORDER BY {} LIMIT %(limit)s").format(
            _RETURNING, sql.SQL(" AND ").join(where), sql.SQL(ordering))
        return self._all(query, params)

    def get(self, memory_id: uuid.UUID) -> Memory | None:
        """The memory, or None when it does not exist, is deleted, or is not this tenant's."""
        query = sql.SQL("SELECT {} FROM memories WHERE id = %(id)s AND deleted_at IS NULL").format(_RETURNING)
        found = self._all(query, {"id": memory_id})
        return found[0] if found else None

    def update(self, memory_id: uuid.UUID, *, expected_version: int | None = None, **changes: Any) -> Memory:
        """Change fields of a memory; the database bumps its version. ``expected_version`` guards lost updates.

        Raises:
            NotFound: no such live memory of this tenant.
            StaleVersion: the memory changed since ``expected_version``.
        """
        unknown = set(changes) - set(_UPDATABLE)
        if unknown or not changes:
            raise ConfigError(f"update takes some of {', '.join(_UPDATABLE)}; got {sorted(unknown) or 'nothing'}")
        values = {k: Jsonb(v) if k in ("tags", "meta") else v for k, v in changes.items()}
        sets = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in values)
        query = sql.SQL("UPDATE memories SET {} WHERE id = %(id)s AND deleted_at IS NULL "
                        "AND (%(expected)s::int IS NULL OR version = %(expected)s::int) RETURNING {}").format(
            sets, _RETURNING)
        found = self._all(query, {**values, "id": memory_id, "expected": expected_version})
        if found:
            return found[0]
        if expected_version is not None and self.get(memory_id) is not None:
            raise StaleVersion(f"memory {memory_id} is no longer at version {expected_version}")
        raise NotFound(f"memory {memory_id} not found")

    def forget(self, memory_id: uuid.UUID, *, correlation_id: str | None = None) -> bool:
        """Soft-delete (audited); False when there is no such live memory of this tenant."""
        with self.conn.cursor(row_factory=scalar_row) as cur:
            return bool(cur.execute("SELECT soft_delete_memory(%s::uuid, %s::varchar, %s::varchar, %s::varchar)",
                                    [memory_id, self.user_id, self.org_id, correlation_id]).fetchone())

    def relate(self, source_id: uuid.UUID, derived_id: uuid.UUID, rel_type: str = "semantic_link", *,
               confidence: float = 1.0, metadata: dict[str, Any] | None = None) -> uuid.UUID:
        """Link two of this tenant's memories (idempotent per type); NotFound for any memory it cannot see."""
        row = self._call("SELECT create_memory_relationship(%s::uuid, %s::uuid, %s::varchar, %s::real, %s::jsonb)",
                         [source_id, derived_id, rel_type, confidence, Jsonb(metadata or {})])
        return uuid.UUID(str(row[0]))

    def record_access(self, memory_id: uuid.UUID | None, access_type: AccessType = "read", *,
                      correlation_id: str | None = None, request_path: str | None = None,
                      response_status: int = 200, query_text: str | None = None, results_count: int | None = None,
                      processing_time_ms: int | None = None) -> None:
        """Count an access to a memory (or, with None, a search) and write it to the audit log."""
        self._call("SELECT update_memory_access(%s::uuid, %s::varchar, %s::varchar, %s::varchar, %s::varchar, NULL, "
                   "NULL, %s::text, %s::int, %s::text, %s::int, %s::int)",
                   [memory_id, self.user_id, self.org_id, access_type, correlation_id, request_path,
                    response_status, query_text, results_count, processing_time_ms])

    def search(self, text: str, *, k: int = 5, audit: bool = True) -> list[Hit]:
        """Semantic search: Milvus filtered on this tenant, the hits read back from PostgreSQL through RLS."""
        if self._vectors is None:
            raise ConfigError("this store has no vector search configured (Store(..., vectors=VectorSearch(...)))")
        from .vectors import tenant_filter

        v = self._vectors
        hits = v.client.search(v.spec.name, v.embedder.embed([text]), limit=k, output_fields=["user_id"],
                               filter=tenant_filter(self.user_id, self.org_id, live_at=int(time.time())))[0]
        scores = {uuid.UUID(str(h["id"])): float(h["distance"]) for h in hits}
        query = sql.SQL("SELECT {} FROM memories WHERE id = ANY(%(ids)s) AND {}").format(_RETURNING, _LIVE)
        rows = {m.id: m for m in self._all(query, {"ids": list(scores)})}
        found = [Hit(rows[i], s) for i, s in scores.items() if i in rows]
        if audit:
            self.record_access(None, "search", query_text=text, results_count=len(found))
        return sorted(found, key=lambda h: -h.score)

    def _mine(self) -> sql.Composable:
        return sql.SQL("user_id = %(u)s AND org_id IS NULL" if self.org_id is None
                       else "user_id = %(u)s AND org_id = %(o)s")

    def _one(self, query: sql.Composed, params: dict[str, Any]) -> Memory:
        found = self._all(query, params)
        if not found:
            raise UnifiedMemoryError("the database returned no row")
        return found[0]

    def _all(self, query: sql.Composed, params: dict[str, Any]) -> list[Memory]:
        with self.conn.cursor(row_factory=class_row(Memory)) as cur:
            return cur.execute(query, params).fetchall()

    def _call(self, query: str, params: list[Any]) -> tuple[Any, ...]:
        try:
            with self.conn.transaction():
                row = self.conn.execute(query, params).fetchone()
        except psycopg.errors.NoDataFound as exc:
            raise NotFound(exc.diag.message_primary or "memory not found") from None
        return tuple(row) if row else ()


def _pipelined(conn: psycopg.Connection) -> AbstractContextManager[Any]:
    """Pipeline mode (libpq 14+): BEGIN, the declaration and the first statement travel in one round trip."""
    return conn.pipeline() if psycopg.Pipeline.is_supported() else nullcontext()


def _check_tenant(user_id: str, org_id: str | None) -> None:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ConfigError("a tenant needs a non-blank user_id")
    if org_id is not None and (not isinstance(org_id, str) or not org_id.strip()):
        raise ConfigError("org_id is None (personal memories) or a non-blank organisation id")


def _refuse_privileged(conn: psycopg.Connection) -> None:
    """A pool connection must not be able to bypass row-level security, and must be able to act as the app."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT rolsuper OR rolbypassrls AS bypasses, pg_has_role(current_user, %s, 'MEMBER') "
                          "AS app FROM pg_roles WHERE rolname = current_user", [APP_ROLE]).fetchone()
    conn.rollback()
    if row is None or row["bypasses"] or not row["app"]:
        raise ConfigError(f"the store's login must be a member of {APP_ROLE}, and neither superuser nor BYPASSRLS")


